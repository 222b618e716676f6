"""Pull jobs: one pull per (reference, filters) at a time, however many ask.

A job runs in the background and outlives whoever started it: an HTTP
client that only wanted a 202, or a CSI call whose deadline ran out (kubelet
calls again and finds the same job). A finished job is kept for a while so
its state can be read; a failed one is replaced by the next request for the
same model, which retries.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelCacheError, Unavailable
from ..pull import pull
from ..refs import parse
from ..sources import SourceOptions
from ..store import Store
from ..transfer import Engine, TransferStats
from ..tree import Filters
from .metrics import Metrics

_KEEP_FINISHED = 200


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
    """Starts, deduplicates and tracks pull jobs on one store."""

    def __init__(self, store: Store, engine: Engine, options: SourceOptions, metrics: Metrics) -> None:
        self.store, self.engine, self.options, self.metrics = store, engine, options, metrics
        self._jobs: dict[str, PullJob] = {}
        self._by_key: dict[tuple[str, str], PullJob] = {}
        self._ids = itertools.count(1)
        self.accepting = True

    def start(self, ref: str, filters: Filters) -> PullJob:
        """The running job for this model, or a new one. Bad references raise at once."""
        if not self.accepting:
            raise Unavailable("the daemon is shutting down")
        canonical = str(parse(ref))
        key = (canonical, filters.key())
        job = self._by_key.get(key)
        if job is not None and job.state in ("pending", "running"):
            return job
        job = PullJob(id=f"p{next(self._ids)}-{int(time.time())}", ref=canonical, filters=filters)
        self._jobs[job.id] = job
        self._by_key[key] = job
        job.task = asyncio.create_task(self._run(job), name=f"pull {canonical}")
        self._forget_old()
        return job

    def get(self, job_id: str) -> PullJob | None:
        """A job by id."""
        return self._jobs.get(job_id)

    def jobs(self) -> list[PullJob]:
        """Every job still remembered, newest first."""
        return sorted(self._jobs.values(), key=lambda j: j.started, reverse=True)

    async def _run(self, job: PullJob) -> None:
        job.state = "running"
        started = time.monotonic()

        def progress(stats: TransferStats) -> None:
            job.stats = stats

        try:
            result = await pull(self.store, self.engine, job.ref, filters=job.filters, options=self.options,
                                progress=progress)
        except ModelCacheError as e:
            job.state, job.error = "failed", e
        except asyncio.CancelledError:
            job.state, job.error = "failed", Unavailable("the daemon stopped before the pull finished")
            raise
        except OSError as e:
            job.state, job.error = "failed", ModelCacheError(f"{e.strerror or e}: {e.filename or ''}".rstrip(": "))
        else:
            job.state, job.path, job.stats = "done", result.path, result.stats
        finally:
            job.finished = time.time()
            self.metrics.record_pull(job.stats, time.monotonic() - started, job.state)

    def _forget_old(self) -> None:
        finished = sorted((j for j in self._jobs.values() if j.finished is not None), key=lambda j: j.started)
        for job in finished[:max(0, len(finished) - _KEEP_FINISHED)]:
            del self._jobs[job.id]

    async def drain(self) -> None:
        """Stop taking work and cancel running pulls (their chunks stay for resume)."""
        self.accepting = False
        tasks = [j.task for j in self._jobs.values() if j.task is not None and not j.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
