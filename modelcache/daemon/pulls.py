"""Pull jobs: one pull per (reference, filters) at a time, however many ask.

Guarantees:

- Single flight: while a job for a model (reference and include/exclude
  filters) is pending or running, every request for that model joins it;
  under it, the transfer engine shares blobs between jobs of different models.
- A job runs in the background and outlives whoever started it: an HTTP
  client that only wanted a 202, or a CSI call whose deadline ran out
  (kubelet calls again and finds the same job further along).
- A job always ends ``done`` or ``failed`` with an error, whatever went
  wrong; it never raises into the daemon's task group. A failed job is
  replaced by the next request for the same model, which retries; its
  partial chunks stay in the store's ingest area, so the retry resumes.
- Finished jobs are remembered for a while (bounded) so their state can be read.
- A view is handed out only already leased: :meth:`PullManager.view_for`
  looks the model up and leases its view in one index transaction, so gc
  or the budget never delete it between lookup and mount.
- With a budget, each job reserves its space before fetching (evicting LRU
  models no lease holds) and the budget is enforced again when it ends.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelCacheError, Unavailable
from ..pull import pull
from ..refs import parse
from ..sources import SourceOptions
from ..store import Store
from ..store.budget import Budget, enforce
from ..transfer import Engine, TransferStats
from ..tree import Filters
from .metrics import Metrics

log = logging.getLogger(__name__)

_KEEP_FINISHED = 200

Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]


@dataclass
class PullJob:
    """One pull and what is known about it."""

    id: str
    ref: str
    filters: Filters
    state: str = "pending"  # pending | running | done | failed
    stats: TransferStats = field(default_factory=TransferStats)
    path: Path | None = None
    error: ModelCacheError | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def as_json(self) -> dict:
        """What the HTTP API shows."""
        err = None
        if self.error is not None:
            err = {"code": type(self.error).__name__, "message": str(self.error)}
        return {"id": self.id, "ref": self.ref, "include": list(self.filters.include),
                "exclude": list(self.filters.exclude), "state": self.state,
                "bytes_done": self.stats.bytes_done, "bytes_total": self.stats.bytes_total,
                "bytes_fetched": self.stats.bytes_fetched, "path": str(self.path) if self.path else None,
                "error": err, "started": self.started, "finished": self.finished}


class PullManager:
    """Starts, deduplicates and tracks pull jobs on one store.

    ``spawn`` starts a job's task; the daemon sets it to its task group's
    ``create_task`` so that shutdown cancels every running pull.
    """

    def __init__(self, store: Store, engine: Engine, options: SourceOptions, metrics: Metrics) -> None:
        self.store, self.engine, self.options, self.metrics = store, engine, options, metrics
        self.spawn: Spawn = asyncio.create_task
        self.accepting = True
        self._jobs: dict[str, PullJob] = {}
        self._by_key: dict[tuple[str, str], PullJob] = {}
        self._ids = itertools.count(1)
        self.budget = Budget()

    def start(self, ref: str, filters: Filters) -> PullJob:
        """The running job for this model, or a new one. Bad references raise at once."""
        if not self.accepting:
            raise Unavailable("the daemon is shutting down; ask again after it restarts")
        canonical = str(parse(ref))
        key = (canonical, filters.key())
        job = self._by_key.get(key)
        if job is not None and job.state in ("pending", "running"):
            return job
        job = PullJob(id=f"p{next(self._ids)}-{int(time.time())}", ref=canonical, filters=filters)
        self._jobs[job.id] = job
        self._by_key[key] = job
        job.task = self.spawn(self._run(job))
        self._forget_old()
        return job

    def get(self, job_id: str) -> PullJob | None:
        """A job by id."""
        return self._jobs.get(job_id)

    def jobs(self) -> list[PullJob]:
        """Every job still remembered, newest first."""
        return sorted(self._jobs.values(), key=lambda j: j.started, reverse=True)

    def cached(self, ref: str, filters: Filters, lease: str | None = None, view: str | None = None) -> Path | None:
        """The view ``ref`` was last pulled into (or ``view``), if it is still there; marks it used (blocks).

        With ``lease`` (a volume id), the view is leased for a mount in the
        same transaction as the lookup; the lease is dropped again if the
        tree is not there.
        """
        index = self.store.index
        if lease is not None:
            found = index.lease_view(lease, view or "", kind="mount", owner="daemon",
                                     ref=None if view else (ref, filters.key()))
        else:
            row = index.lookup(ref, filters.key())
            found = row[0] if row else None
            if found:
                index.touch(found)
        if found is None:
            return None
        path = self.store.view_path(found)
        if not path.is_dir():
            if lease is not None:
                index.release(lease, view=found)
            return None
        return path

    async def view_for(self, ref: str, filters: Filters, *, lease: str | None = None) -> Path:
        """The model's view: from the store if cached, else once its pull job finishes; leased by ``lease``.

        A model already in the store is served from the index without asking
        its origin, so a warm mount costs the same whatever the model's size.
        Raises the job's error when it failed. A caller that stops waiting
        (a deadline, a cancellation) leaves the job running for the next one.
        """
        canonical = str(parse(ref))
        view = await asyncio.to_thread(self.cached, canonical, filters, lease)
        if view is not None:
            self.metrics.hits.inc()
            return view
        for _ in range(3):  # the view can be evicted between its job's end and our lease: pull again
            job = self.start(canonical, filters)
            assert job.task is not None
            # asyncio.wait never cancels the job when we are cancelled, nor raises its outcome.
            await asyncio.wait({job.task})
            if job.error is not None:
                raise job.error
            assert job.path is not None
            if lease is None:
                return job.path
            view = await asyncio.to_thread(self.cached, canonical, filters, lease, "sha256:" + job.path.name)
            if view is not None:
                return view
        raise Unavailable(f"{canonical} was evicted each time before it could be mounted: the budget is too tight")

    async def _run(self, job: PullJob) -> None:
        job.state = "running"
        started = time.monotonic()

        def progress(stats: TransferStats) -> None:
            job.stats = stats

        try:
            result = await pull(self.store, self.engine, job.ref, filters=job.filters, options=self.options,
                                progress=progress, owner="daemon", budget=self.budget)
            await asyncio.to_thread(enforce, self.store, self.budget)
        except ModelCacheError as e:
            job.state, job.error = "failed", e
        except asyncio.CancelledError:
            job.state, job.error = "failed", Unavailable("the daemon stopped before the pull finished")
            raise
        except OSError as e:
            job.state, job.error = "failed", ModelCacheError(f"{e.strerror or e}: {e.filename or ''}".rstrip(": "))
        except Exception as e:  # a bug or an unexpected library error: fail this job, keep the daemon
            log.exception("pull %s failed unexpectedly", job.ref)
            job.state, job.error = "failed", ModelCacheError(f"internal error: {type(e).__name__}: {e}")
        else:
            job.state, job.path, job.stats = "done", result.path, result.stats
        finally:
            job.finished = time.time()
            self.metrics.record_pull(job.stats, time.monotonic() - started, job.state)
            if job.state == "failed":
                log.warning("pull %s failed: %s", job.ref, job.error)

    def _forget_old(self) -> None:
        finished = sorted((j for j in self._jobs.values() if j.finished is not None), key=lambda j: j.started)
        for job in finished[:max(0, len(finished) - _KEEP_FINISHED)]:
            del self._jobs[job.id]
            key = (job.ref, job.filters.key())
            if self._by_key.get(key) is job:
                del self._by_key[key]

    async def drain(self) -> None:
        """Stop taking work and cancel running pulls (their durable chunks stay for resume)."""
        self.accepting = False
        tasks = [j.task for j in self._jobs.values() if j.task is not None and not j.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
