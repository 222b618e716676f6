"""Pull jobs: one pull per (reference, filters) at a time, however many ask.

Guarantees:

- Single flight: while a job for a model (reference and include/exclude
  filters, pulled with the daemon's credentials or one pod's) is pending or
  running, every request for that model with those credentials joins it;
  under it, the transfer engine shares blobs between jobs of different models.
- A job runs in the background and outlives whoever started it: an HTTP
  client that only wanted a 202, or a CSI call whose deadline ran out
  (kubelet calls again and finds the same job further along).
- A job always ends ``done`` or ``failed`` with an error, whatever went
  wrong; it never raises into the daemon's task group. A failed job is
  replaced by the next request for the same model, which retries; its
  partial chunks stay in the store's ingest area, so the retry resumes.
- Bounded work: at most ``max_jobs`` jobs are pending or running; a request
  that would start one more raises :class:`Busy` (HTTP 429 with Retry-After,
  CSI RESOURCE_EXHAUSTED). Joining a job already under way is always allowed.
- Only references the :class:`RefPolicy` admits become jobs (no host path
  unless the operator allowed it); both the HTTP API (:meth:`start`) and the
  CSI driver (:meth:`view_for`) come through it.
- Finished jobs are remembered for a while so their state can be read: at
  most ``keep_finished`` of them, none older than ``keep_seconds``, trimmed
  as each job finishes.
- A running job logs where it stands every ``progress_interval`` seconds
  (bytes, windowed speed, ETA: the CLI's progress line), so ``kubectl logs``
  shows a long pull moving.
- A view is handed out only already leased: :meth:`PullManager.view_for`
  looks the model up and leases its view in one index transaction, so gc
  or the budget never delete it between lookup and mount.
- Whoever waits on a job for its view is never left with a view nobody
  holds: the job pulls under a lease of its own, takes on its view every
  lease its waiters registered (a mount lease per volume, a pin per owner:
  :class:`Hold`) while that lease still holds it, and only then lets go and
  ends. A job that fails leaves none of them; a waiter that stops waiting
  (kubelet gave up, a pre-warm no longer wanted) takes nothing, or gives back
  what the job took for it (a mount lease only while no volume was published
  under that id).
- A refusal by the access gate gives back only a mount lease this call took
  for a volume not published yet: a volume already published (kubelet calls
  NodePublishVolume again, e.g. after its restart) keeps its lease, since its
  view is still bind-mounted into a running pod. The refusal still stands:
  kubelet hears PERMISSION_DENIED for that publish, the existing mount is
  neither touched nor dropped, and its lease goes with NodeUnpublishVolume.
- With a budget, each job reserves its space before fetching (evicting LRU
  models no lease holds) and the budget is enforced again when it ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Busy, ModelCacheError, Unavailable
from ..progress import Gauge
from ..pull import pull
from ..sources import SourceCredentials, SourceOptions
from ..store import Store, liveness
from ..store.budget import Budget, enforce
from ..store.crash import crash_point
from ..store.index import Index
from ..transfer import Engine, TransferStats
from ..tree import Filters
from .access import AccessGate
from .metrics import Metrics
from .policy import RefPolicy
from .settled import settled

log = logging.getLogger(__name__)

_KEEP_FINISHED = 200
_KEEP_SECONDS = 3600.0
BUSY_RETRY_AFTER = 5.0  # seconds a refused caller is told to wait (pulls take at least that long)
PROGRESS_INTERVAL = 10.0  # seconds between a running pull's progress log lines
_SAMPLE = 1.0  # seconds between speed samples (the window needs more than one per line)

Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]


@dataclass(frozen=True)
class Hold:
    """A lease a job takes on its view for a waiter before it lets go: a volume's mount lease, or an owner's pin."""

    kind: str  # "mount" | "pin"
    name: str  # the volume id, or the pin's owner

    @classmethod
    def mount(cls, volume: str) -> Hold:
        return cls("mount", volume)

    @classmethod
    def pin(cls, owner: str) -> Hold:
        return cls("pin", owner)

    def take(self, index: Index, view: str) -> bool:
        """Lease ``view`` (blocks); False when it is not recorded."""
        if self.kind == "pin":
            return index.pin(view, owner=self.name)
        # As view_for takes mount leases (owned by the daemon, no process): publish records the target in
        # them, and a restart drops those whose target is not mounted.
        return index.lease_view(self.name, view, kind="mount", owner="daemon") is not None

    def give_back(self, index: Index, view: str) -> None:
        """Undo :meth:`take` for a waiter that left (blocks): a mount lease only while nothing was published
        under that volume id (kubelet asking again for a published volume must not unroot its view)."""
        if self.kind == "pin":
            index.unpin(view, owner=self.name)
        else:
            index.release(self.name, view=view, if_holder="")


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
    credentials: SourceCredentials | None = field(default=None, repr=False)  # a pod's; None: the daemon's
    # Leases its waiters want on its view -> how many wait for each (view_for calls for a volume, pre-warms
    # for a pin), and those it took (-> the view), before its own lease lets go.
    waiting: dict[Hold, int] = field(default_factory=dict, repr=False)
    handed: dict[Hold, str] = field(default_factory=dict, repr=False)

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

    def __init__(self, store: Store, engine: Engine, options: SourceOptions, metrics: Metrics, *,
                 policy: RefPolicy | None = None, max_jobs: int = 16, keep_finished: int = _KEEP_FINISHED,
                 keep_seconds: float = _KEEP_SECONDS, progress_interval: float = PROGRESS_INTERVAL) -> None:
        self.store, self.engine, self.options, self.metrics = store, engine, options, metrics
        self.policy = policy or RefPolicy()
        self.max_jobs, self.keep_finished, self.keep_seconds = max_jobs, keep_finished, keep_seconds
        self.progress_interval = progress_interval
        self.spawn: Spawn = asyncio.create_task
        self.accepting = True
        self._jobs: dict[str, PullJob] = {}
        self._by_key: dict[tuple[str, str, str], PullJob] = {}
        self._ids = itertools.count(1)
        self.gate: AccessGate | None = None  # checks a pod's credentials before a mount (None: no check)
        self.budget = Budget()
        self.routing: Callable[[Any], Any] | None = None  # wraps each pull's origin in the peer router

    async def admit(self, ref: str) -> str:
        """The canonical form of ``ref`` if the policy admits it; raises Forbidden or InvalidReference."""
        # A local path is checked against the filesystem (realpath, stat): in a thread.
        return str(await asyncio.to_thread(self.policy.admit, ref))

    async def start(self, ref: str, filters: Filters, *, credentials: SourceCredentials | None = None,
                    hold: Hold | None = None) -> PullJob:
        """The running job for this model (pulled with these credentials), or a new one.

        Bad or refused references raise at once. Jobs with different credentials
        never merge: each proves its own access at the origin. With ``hold``
        (a pin), the job takes that lease on its view before its own lets go
        (a job that fails takes none); :meth:`withdraw` cancels it.
        """
        job = self._start(await self.admit(ref), filters, credentials)
        if hold is not None:  # no await since _start: the job cannot have handed over yet
            self._wait(job, hold)
        return job

    @staticmethod
    def _wait(job: PullJob, hold: Hold) -> None:
        job.waiting[hold] = job.waiting.get(hold, 0) + 1

    async def withdraw(self, job: PullJob, hold: Hold) -> None:
        """One waiter of ``job`` no longer wants ``hold``: the last one gives back what the job took for it."""
        if job.waiting.get(hold, 0) <= 0:
            return
        job.waiting[hold] -= 1
        if job.waiting[hold] > 0 or hold not in job.handed:
            return  # another waiter still wants it, or nothing was taken (or it is in flight: _hand_over
            # gives back what it took for a hold nobody waits for any more)
        view = job.handed.pop(hold)
        # Awaited before the caller answers: the CSI edge runs one operation per volume at a time (another
        # is ABORTED), so a retry comes after this, never beside it.
        await asyncio.to_thread(hold.give_back, self.store.index, view)

    def _start(self, canonical: str, filters: Filters, credentials: SourceCredentials | None) -> PullJob:
        if not self.accepting:
            raise Unavailable("the daemon is shutting down; ask again after it restarts")
        key = (canonical, filters.key(), _fingerprint(credentials))
        job = self._by_key.get(key)
        if job is not None and job.state in ("pending", "running"):
            return job
        active = sum(1 for j in self._jobs.values() if j.state in ("pending", "running"))
        if active >= self.max_jobs:
            raise Busy(f"{active} pulls are queued or running, as many as this daemon takes "
                       f"(serve --max-pulls {self.max_jobs}); ask again later", retry_after=BUSY_RETRY_AFTER)
        job = PullJob(id=f"p{next(self._ids)}-{int(time.time())}", ref=canonical, filters=filters,
                      credentials=credentials)
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

    async def view_for(self, ref: str, filters: Filters, *, credentials: SourceCredentials | None = None,
                       lease: str | None = None) -> Path:
        """The model's view: from the store if cached, else once its pull job finishes; leased by ``lease``.

        A model already in the store is served from the index; the gate (if
        any) decides whether these credentials may have it, which for a public
        model under the default policy costs no origin round trip. A pull made
        with the caller's own credentials proves access by itself.
        Raises the job's error when it failed. A caller that stops waiting
        (a deadline, a cancellation) leaves the job running for the next one.
        """
        canonical = await self.admit(ref)
        view = await settled(self.cached, canonical, filters, lease)
        if view is not None:
            self.metrics.hits.inc()
            await self._check_access(canonical, credentials, view, lease)
            return view
        job = self._start(canonical, filters, credentials)
        assert job.task is not None
        hold = Hold.mount(lease) if lease is not None else None
        if hold is not None:  # joined with no await since _start: the job leases its view for us (_hand_over)
            self._wait(job, hold)
        try:
            # asyncio.wait never cancels the job when we are cancelled, nor raises its outcome.
            await asyncio.wait({job.task})
            if job.error is not None:
                raise job.error
        except BaseException:
            if hold is not None:
                await self.withdraw(job, hold)
            raise
        assert job.path is not None
        if credentials is None:  # pulled with the daemon's own credentials: the pod proves nothing yet
            await self._check_access(canonical, credentials, job.path, lease)
        return job.path

    async def _check_access(self, canonical: str, credentials: SourceCredentials | None, view: Path,
                            lease: str | None) -> None:
        """The gate's say on a view already leased; a refusal gives the lease back unless its volume is published.

        A volume published already (its holder records the target) is kubelet
        asking again: its view is bind-mounted into a running pod, so the lease
        stays until NodeUnpublishVolume whatever the gate says now; only the
        lease of a volume not published yet, which this call took, goes back.
        """
        if self.gate is None:
            return
        try:
            await self.gate.check(canonical, credentials)
        except BaseException:
            if lease is not None:
                await asyncio.to_thread(Hold.mount(lease).give_back, self.store.index, "sha256:" + view.name)
            raise

    async def _run(self, job: PullJob) -> None:
        job.state = "running"
        started = time.monotonic()

        def progress(stats: TransferStats) -> None:
            job.stats = stats

        logger = asyncio.create_task(self._log_progress(job))
        # The job's own pull lease (not pull()'s): it still holds the view when pull() returns, until the
        # leases its waiters want on it hold it too. Tied to this process, so a daemon killed meanwhile leaves
        # nothing that outlives it but the mount leases (which its restart checks as always) and pins.
        lease = f"pull:daemon:{secrets.token_hex(8)}"
        try:
            await asyncio.to_thread(self.store.index.add_lease, lease, kind="pull", owner="daemon",
                                    process=liveness.me())
            options = dataclasses.replace(self.options, credentials=job.credentials)
            result = await pull(self.store, self.engine, job.ref, filters=job.filters, options=options,
                                progress=progress, owner="daemon", budget=self.budget, routing=self.routing,
                                # The layers it drops are unlinked in the background (store/unlinker.py), not
                                # before its waiters are answered: on a disk with online discard that is slow.
                                lease=lease, drops_later=True)
            await self._hand_over(job, result.path)
            # No await since _hand_over found nobody left to lease for: from here no waiter joins this job.
            job.state, job.path, job.stats = "done", result.path, result.stats
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
        finally:
            logger.cancel()
            try:
                # In the same step of the loop as the state above: whoever sees the job ended (GET /v1/pulls)
                # finds its end time and its metrics recorded too.
                job.finished = time.time()
                self.metrics.record_pull(job.stats, time.monotonic() - started, job.state)
                if job.state == "failed":
                    log.warning("pull %s failed: %s", job.ref, job.error)
            finally:
                await self._let_go(job, lease)
            self._forget_old()

    async def _hand_over(self, job: PullJob, view: Path) -> None:
        """Take each lease ``job``'s waiters registered on ``view``, while the job's lease still holds it.

        Waiters may join while a round runs in its thread, so rounds go on until
        one finds nobody new; a lease whose waiters all left while it was being
        taken is given back at once. If a lease cannot be taken the job fails,
        and gives back every lease it took.
        """
        digest = "sha256:" + view.name
        try:
            while holds := [h for h, n in job.waiting.items() if n > 0 and h not in job.handed]:
                taken: list[Hold] = []
                try:
                    await asyncio.to_thread(self._take, holds, digest, taken)
                finally:  # what the thread took is recorded, even if it (or we) stopped half way
                    job.handed.update(dict.fromkeys(taken, digest))
                left = [h for h in taken if job.waiting[h] == 0]
                for hold in left:
                    del job.handed[hold]
                if left:
                    await asyncio.to_thread(self._give_back, left, digest)
        except BaseException:
            handed, job.handed = list(job.handed), {}
            await asyncio.to_thread(self._give_back, handed, digest)
            raise

    def _take(self, holds: list[Hold], view: str, taken: list[Hold]) -> None:
        for hold in holds:
            if not hold.take(self.store.index, view):
                # Not while the job's lease holds the view; were it ever so, a failed job (kubelet retries)
                # beats a mount of a view nobody holds.
                raise Unavailable(f"view {view} went before its waiters could hold it; ask again")
            taken.append(hold)
        crash_point("mount-handed-over")

    def _give_back(self, holds: list[Hold], view: str) -> None:
        for hold in holds:
            hold.give_back(self.store.index, view)

    async def _let_go(self, job: PullJob, lease: str) -> None:
        """Drop the job's lease (its waiters hold the view by now); a job done enforces the budget again."""
        try:
            await asyncio.to_thread(self.store.index.drop_lease, lease)
            if job.state == "done":
                await asyncio.to_thread(enforce, self.store, self.budget)
        except Exception as e:  # the pull itself is over (its waiters hold the view): keep its outcome, say so
            log.warning("pull %s: letting go of its lease or enforcing the budget failed: %s: %s", job.ref,
                        type(e).__name__, e)

    async def _log_progress(self, job: PullJob) -> None:
        """Log the job's progress line every ``progress_interval`` seconds until cancelled."""
        gauge = Gauge()
        every = min(_SAMPLE, self.progress_interval)
        next_line = time.monotonic() + self.progress_interval
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            gauge.sample_stats(now, job.stats)
            if now >= next_line - 1e-6:
                next_line = now + self.progress_interval
                log.info("pull %s: %s", job.ref, gauge.line(),
                         extra={"pull": job.id, "bytes_done": gauge.done, "bytes_total": gauge.total,
                                "speed": round(gauge.speed()), "eta": gauge.eta()})

    def _forget_old(self) -> None:
        finished = sorted((j for j in self._jobs.values() if j.finished is not None), key=lambda j: j.started)
        cutoff = time.time() - self.keep_seconds
        excess = max(0, len(finished) - self.keep_finished)
        for n, job in enumerate(finished):
            if n >= excess and job.finished is not None and job.finished > cutoff:
                continue
            del self._jobs[job.id]
            key = (job.ref, job.filters.key(), _fingerprint(job.credentials))
            if self._by_key.get(key) is job:
                del self._by_key[key]

    async def drain(self) -> None:
        """Stop taking work and cancel running pulls (their durable chunks stay for resume)."""
        self.accepting = False
        tasks = [j.task for j in self._jobs.values() if j.task is not None and not j.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _fingerprint(credentials: SourceCredentials | None) -> str:
    return "" if credentials is None else credentials.fingerprint()
