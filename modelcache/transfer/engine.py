"""Fetching blobs into the store as fixed-size chunks, many in parallel.

Guarantees:

- A blob is fetched at most once at a time: in this process through a
  single-flight map of digest -> task, across processes through the store's
  per-blob lock; a blob already committed (from any model or source) is not
  fetched again.
- Chunks go straight from the socket to positional writes in a preallocated
  file (a few MiB buffered per stream, never a whole chunk or file); a chunk
  is recorded done only once durable, so a crash loses at most the chunks
  in flight.
- Failures worth retrying (5xx, 429, resets, stalls, bodies cut short) are
  retried per chunk with exponential backoff and full jitter, honouring
  ``Retry-After``, and the retry resumes at the byte where the previous
  attempt stopped. The stall timeout is the sources' per-read timeout, so a
  hung connection cannot hang a pull.
- Interrupts keep what arrived: when the last caller waiting on a blob is
  cancelled (Ctrl-C, SIGTERM, the daemon draining), every byte received for
  it, partial chunks included and those in the reader's buffers, is written,
  made durable and recorded (:meth:`Ingest.keep`) before the cancellation
  goes on, so the next pull fetches only what never arrived. A write, fsync
  or commit running in a thread is always waited for, never abandoned.
- A source that answers a ranged GET with the whole blob (HTTP 200) switches
  that blob to one sequential stream: the body is read once and every chunk
  written as it passes, instead of N ranges that each restart at byte 0.
- Bytes whose sha256 (or MD5) fails at commit are discarded and the blob is
  fetched once more (from trusted sources only when a peer's bytes went in);
  if it is wrong again, the error stands.
- Retries and backoff are per source: a chunk's sources (the router's, best
  first) are tried in order, each with its own attempt budget
  (``ByteSource.attempts``; else the last source, the origin, gets the
  retries and any before it one try), and a source that misses or
  fails for good hands over to the next at once, at the byte reached.
- Bytes from a source that is not trusted (a peer) are checked per piece
  against the router's digest list when there is one (a bad piece is
  rewound, the router told, and fetched again elsewhere); a blob whose
  sha256 fails at commit after untrusted bytes went in is fetched once more
  from trusted sources only. A peer can cost time, never a wrong byte.
- A fetch shared by several pulls runs in the engine's ``spawn`` (the
  daemon's task group) and reads through the router of a pull still
  waiting on it: one caller leaving (and closing its source) never fails
  another's pull; the fetch stops only when no caller is left.
- A router may name pieces to fetch ahead (``ahead``: those peers ask this
  node for as their home): each is fetched at once in a task of its own,
  inside the router's ``pace`` (the node's origin gate), outside the
  workers' slots, so the peers waiting on it never wait for our workers to
  reach it, and the workers walk the rest meanwhile.
- Hashing, writes and fsync run in a thread pool: the event loop only moves
  bytes between sockets and threads. A chunk's fdatasync runs beside the
  next range's download, not before it (at most ``concurrency`` at once);
  the chunk counts as done only once it returned, and the blob is committed
  only when every chunk has.
- Open files are bounded by the concurrency, not by the number of blobs:
  at most ``2 x concurrency`` ingests (four descriptors each) are open at
  once, so a model of ten thousand files pulls under a small ``ulimit -n``.
- A committed blob is held, from the moment it is linked, by the lease of
  every pull that asked for it (single flight joins their leases).
- Slots are shared fairly between blobs (:mod:`.slots`): with several blobs
  each gets its own stream, in order, so its sha256 is computed from the
  bytes in memory as they are written instead of read back from disk; from
  the origin alone (no peer reads chunks back), those bytes go to the disk
  past the page cache (``Ingest.bypass_cache``, :mod:`..store.direct`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import random
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import DigestMismatch, ModelCacheError, RangeIgnored, Unavailable
from ..model import Blob
from ..sources.base import ByteSource
from ..sources.http import STREAMING
from ..store.etag import checks_for
from ..store.roles import Ingest, Ingester
from .hangup import HANGUP, Hangup
from .meter import RECEIVING, Meter
from .onestream import OneStream
from .routing import ChunkRouter, NotYet, OriginOnly, PieceRouter
from .slots import FairSlots

log = logging.getLogger(__name__)

WRITE_BLOCK = 4 << 20


@dataclass(frozen=True, slots=True)
class TransferConfig:
    """Tuning of the engine (every field has a sane default)."""

    chunk_size: int = 16 << 20
    concurrency: int = 8
    retries: int = 6
    backoff_base: float = 0.25
    backoff_max: float = 15.0


@dataclass(slots=True)
class TransferStats:
    """What a transfer did, for progress lines and the closing summary."""

    bytes_total: int = 0
    bytes_done: int = 0
    bytes_fetched: int = 0
    bytes_reused: int = 0
    chunks_retried: int = 0
    fetched_by_source: dict[str, int] = field(default_factory=dict)
    learned: dict[str, str] = field(default_factory=dict)  # stand-in digest -> sha256 (unverified blobs)
    # Bytes in readers' buffers, not yet in the counts above: for progress only (see meter.py).
    receiving: Meter = field(default_factory=Meter, repr=False, compare=False)

    def bytes_seen(self) -> tuple[int, int]:
        """(done, fetched) including bytes still being received: what progress shows."""
        pending = self.receiving.pending()
        return self.bytes_done + pending, self.bytes_fetched + pending


Progress = Callable[[TransferStats], None]
T = TypeVar("T")
Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]
PIECE_ROUNDS = 3  # a piece failing its check is fetched again, with the liars excluded, this many times at most


class Engine:
    """Fetches blobs into a content store through a chunk router."""

    def __init__(self, content: Ingester, config: TransferConfig | None = None) -> None:
        self.content = content
        self.config = config or TransferConfig()
        self._inflight: dict[str, asyncio.Future[None]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._routers: dict[str, list[ChunkRouter]] = {}  # digest in flight -> routers of the pulls waiting
        self._open_ingests: dict[str, tuple[Ingest, deque[int], TransferStats, Progress | None]] = {}
        self._opened: dict[str, asyncio.Event] = {}
        self._pieces: dict[tuple[str, int], asyncio.Future[None]] = {}  # pieces being fetched now
        self._for_peers: dict[str, set[asyncio.Task[None]]] = {}  # pieces fetched now because a peer asked
        self._digests: dict[str, list[str]] = {}  # blob -> sha256 per piece, when a holder knows them
        self._contributors: dict[str, set[ByteSource]] = {}  # blob -> untrusted sources that gave it bytes
        self._untrusted: dict[str, bool] = {}  # blob -> untrusted bytes went in (a commit mismatch refetches)
        self._deferred: set[tuple[str, int]] = set()  # pieces put back once because their home was not ready
        self._resolving = 0  # pulls resolving their model now (their blobs are not known yet)
        self._wanted: Counter[str] = Counter()  # blobs of models resolved by pulls still running
        self.spawn: Spawn = asyncio.create_task  # the daemon sets its task group's create_task
        self._leases: dict[str, set[str]] = {}  # digest in flight -> leases of every pull waiting on it
        self._open = asyncio.Semaphore(2 * self.config.concurrency)
        self.learned: dict[str, str] = {}  # stand-in digest -> sha256, for every pull sharing this engine
        self._slots = FairSlots(self.config.concurrency)
        # Pieces fetched because a peer asked us as their home get slots of their own: our workers hold
        # theirs while they wait on other homes, which may be waiting on us; one shared pool lets the
        # cluster stall until those waits time out (seen in the namespace test: 2.5 s with no byte moving).
        self._peer_slots = asyncio.Semaphore(self.config.concurrency)
        self._pool = ThreadPoolExecutor(max_workers=self.config.concurrency + 4, thread_name_prefix="mc-io")
        # Chunks being made durable (fdatasync, then recorded) while their workers fetch the next ones;
        # at most ``concurrency`` at once, so writes always find an I/O thread.
        self._syncing: dict[str, set[asyncio.Task[None]]] = {}
        self._sync_slots = asyncio.Semaphore(self.config.concurrency)

    def close(self) -> None:
        """Stop the I/O threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _io(self, fn: Callable, *args: object) -> object:
        """``fn(*args)`` in an I/O thread. Cancelled meanwhile, it waits for the call to end before the
        cancellation goes on: a write, fsync or commit is never left running under a file about to close."""
        call = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            await asyncio.wait([call])
            if not call.cancelled() and call.exception() is not None:  # retrieved: the cancellation goes on
                log.info("%s, interrupted: %s", getattr(fn, "__name__", fn), call.exception())
            raise

    async def fetch(self, blobs: Sequence[Blob], router: ChunkRouter, *,
                    stats: TransferStats | None = None, progress: Progress | None = None,
                    leases: Sequence[str] = ()) -> TransferStats:
        """Make every blob in ``blobs`` committed in the store, held by ``leases`` once committed."""
        stats = stats or TransferStats()
        unique = {b.digest: b for b in blobs}
        stats.bytes_total += sum(b.size for b in unique.values())
        waits: list[asyncio.Future[None]] = []
        joined: list[str] = []
        try:
            for blob in unique.values():
                if self.content.has(blob.digest):
                    stats.bytes_done += blob.size
                    stats.bytes_reused += blob.size
                    continue
                self._leases.setdefault(blob.digest, set()).update(leases)
                self._routers.setdefault(blob.digest, []).append(router)
                joined.append(blob.digest)
                done = self._inflight.get(blob.digest)
                task = self._tasks.get(blob.digest)
                if done is not None and task is not None and task.cancelling():
                    done = None  # stopping because its last caller left a moment ago: start afresh
                if done is None:
                    done = self._inflight[blob.digest] = asyncio.get_running_loop().create_future()
                    self._tasks[blob.digest] = self.spawn(self._run_blob(blob, done, stats, progress))
                waits.append(done)
            if progress:
                progress(stats)
            if waits:
                # shield: one caller giving up must not cancel a fetch others wait on.
                results = await asyncio.gather(*(asyncio.shield(w) for w in waits), return_exceptions=True)
                errors = [r for r in results if isinstance(r, BaseException)]
                if errors:
                    raise errors[0]
            return stats
        except asyncio.CancelledError:
            # The last caller to give up stops the fetch, and waits while it keeps what arrived.
            stopped = [t for t in (self._leave(d, router) for d in joined) if t is not None]
            joined = []
            if stopped:
                await asyncio.wait(stopped)
            raise
        finally:
            for digest in joined:
                self._leave(digest, router)

    def _leave(self, digest: str, router: ChunkRouter) -> asyncio.Task[None] | None:
        """A caller stops waiting on ``digest``: its router (and source) is no longer used; the last one
        to leave stops the fetch (what arrived stays for the next pull); returns the task it stopped."""
        routers = self._routers.get(digest)
        if routers is None:
            return None
        if router in routers:
            routers.remove(router)
        if routers:
            return None
        del self._routers[digest]
        task = self._tasks.get(digest)
        if task is None or task.done():
            return None
        task.cancel()
        return task

    @contextlib.contextmanager
    def resolving(self) -> Iterator[None]:
        """Around a pull's resolve: its blobs are not known yet, but will be wanted in a moment."""
        self._resolving += 1
        try:
            yield
        finally:
            self._resolving -= 1

    @contextlib.contextmanager
    def wanting(self, digests: Iterable[str]) -> Iterator[None]:
        """While a pull that needs ``digests`` runs: this node is about to fetch (or fetches) them."""
        wanted = list(dict.fromkeys(digests))
        self._wanted.update(wanted)
        try:
            yield
        finally:
            self._wanted.subtract(wanted)
            for digest in wanted:
                if self._wanted[digest] <= 0:
                    del self._wanted[digest]

    def router_for(self, digest: str) -> ChunkRouter | None:
        """The router of a pull still waiting on ``digest`` (the newest), if any."""
        routers = self._routers.get(digest)
        return routers[-1] if routers else None

    async def _run_blob(self, blob: Blob, done: asyncio.Future[None], stats: TransferStats,
                        progress: Progress | None) -> None:
        """Fetch one blob for every caller; never raises (it may run in the daemon's task group)."""
        try:
            await self._fetch_blob(blob, stats, progress)
        except asyncio.CancelledError:
            if not done.done():
                done.set_exception(Unavailable(f"the fetch of {blob.digest[:19]} was stopped"))
            done.exception()  # retrieved: no "never retrieved" warning when nobody waits any more
        except BaseException as e:  # handed to the callers, never to the task group
            if not done.done():
                done.set_exception(e)
            done.exception()
        else:
            if not done.done():
                done.set_result(None)
        finally:
            self._opened.pop(blob.digest, None)
            if self._inflight.get(blob.digest) is done:
                del self._inflight[blob.digest]
                self._tasks.pop(blob.digest, None)
                self._leases.pop(blob.digest, None)

    async def retry(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, tried again on :class:`Unavailable` as a chunk is: same backoff, same retry count.

        For the requests around the chunks (resolving a manifest, listing a
        bucket), so a refused connection or a 503 there is as transient as
        one in the middle of a blob.
        """
        attempt = 0
        while True:
            try:
                return await call()
            except Unavailable as e:
                attempt += 1
                if attempt > self.config.retries:
                    raise Unavailable(f"{e} (gave up after {attempt} attempts)", retry_after=e.retry_after) from e
                delay = self._backoff(attempt, e.retry_after)
                log.info("%s: %s; retry %d in %.1fs", what, e, attempt, delay)
                await asyncio.sleep(delay)

    def _router(self, digest: str) -> ChunkRouter:
        router = self.router_for(digest)
        if router is None:  # every caller left: the task is being cancelled
            raise asyncio.CancelledError
        return router

    async def _fetch_blob(self, blob: Blob, stats: TransferStats, progress: Progress | None) -> None:
        async with self._open:
            try:
                await self._fetch_open(blob, stats, progress)
            except DigestMismatch as e:
                # The commit discarded the bytes: once more, from trusted sources only if a peer's went in.
                router = self._router(blob.digest)
                peers = isinstance(router, PieceRouter) and bool(self._untrusted.pop(blob.digest, None))
                if peers:
                    log.warning("%s failed its digest check after bytes from peers: fetching it from the origin",
                                blob.digest[:19])
                else:
                    log.info("%s; fetching it again", e)
                # A multipart ETag or composite CRC32 assumes one part size (see store/etag.py): it gates
                # peers' bytes, but never fails bytes from the origin alone.
                whole_crc = blob.crc32 if blob.crc32 and not blob.crc32[0] else None
                again_blob = dataclasses.replace(blob, md5_parts=None, crc32=whole_crc) \
                    if blob.md5_parts or blob.crc32 != whole_crc else blob
                try:
                    await self._fetch_open(again_blob, stats, progress, trusted_only=peers)
                except DigestMismatch as again:
                    raise DigestMismatch(f"{again} (fetched twice)") from again
            finally:
                self._untrusted.pop(blob.digest, None)

    async def _fetch_open(self, blob: Blob, stats: TransferStats, progress: Progress | None, *,
                          trusted_only: bool = False) -> None:
        router = self._router(blob.digest)
        pieces = isinstance(router, PieceRouter)
        blob = checks_for(blob, peers=pieces and not trusted_only)  # an S3 CRC32 only where no peer gives bytes
        chunk_size = router.piece_size(blob) if isinstance(router, PieceRouter) else self.config.chunk_size
        ingest = await self.content.open_ingest(blob, chunk_size)
        if ingest is None:  # another process committed it meanwhile
            stats.bytes_done += blob.size
            stats.bytes_reused += blob.size
            return
        bypass = getattr(ingest, "bypass_cache", None)  # optional: a store may always write through its cache
        if bypass is not None and getattr(router, "bypass_cache", isinstance(router, OriginOnly)):
            bypass()  # no peer reads this blob's chunks back from the page cache while it arrives
        try:
            resumed = ingest.bytes_done
            stats.bytes_done += resumed
            stats.bytes_reused += resumed
            missing = ingest.missing()
            if isinstance(router, PieceRouter):
                missing = router.order(blob, missing)
                if not trusted_only:
                    digests = await router.piece_digests(blob)
                    if digests is not None and len(digests) == ingest.chunks:
                        self._digests[blob.digest] = digests
            todo = deque(missing)
            self._open_ingests[blob.digest] = (ingest, todo, stats, progress)
            self._opened.setdefault(blob.digest, asyncio.Event()).set()
            extra = self._for_peers.setdefault(blob.digest, set())
            if pieces and not trusted_only:
                self._fetch_ahead(ingest, router, todo, stats, progress)
            workers: list[asyncio.Task[None]] = []
            try:
                while True:
                    workers = [
                        asyncio.create_task(self._worker(ingest, todo, stats, progress, trusted_only))
                        for _ in range(min(self.config.concurrency, len(todo)))
                    ]
                    try:
                        await asyncio.gather(*workers)
                    except _WholeBody as e:
                        await _stop(workers)
                        log.info("%s answers byte ranges with the whole blob: reading %s as one stream",
                                 e.source.name, blob.digest[:19])
                        await self._sequential(ingest, e.source, stats, progress)
                        todo.clear()
                    # Pieces peers asked this node for (as their home) may still be on their way in;
                    # one that failed there went back to the queue.
                    await asyncio.gather(*list(extra), return_exceptions=True)
                    if not todo:
                        break
                await self._synced(blob.digest)
            except BaseException:
                await _stop([*workers, *extra, *self._syncing.get(blob.digest, ())])
                raise
            finally:
                self._syncing.pop(blob.digest, None)
                self._for_peers.pop(blob.digest, None)
                self._open_ingests.pop(blob.digest, None)
                self._opened.pop(blob.digest, None)
                self._digests.pop(blob.digest, None)
            await self._io(ingest.commit, tuple(self._leases.get(blob.digest, ())))
            if not blob.verified:
                stats.learned[blob.digest] = self.learned[blob.digest] = ingest.committed_as
        except DigestMismatch:
            stats.bytes_done -= blob.size  # the commit discarded the bytes: none of them counts any more
            if pieces and not trusted_only:
                for source in self._contributors.pop(blob.digest, ()):
                    router = self._router(blob.digest)
                    if isinstance(router, PieceRouter):
                        router.report(source, blob, -1, "lied")
            raise
        finally:
            self._contributors.pop(blob.digest, None)
            ingest.close()

    async def stream(self, ingest: Ingest, source: ByteSource, stats: TransferStats,
                     progress: Progress | None = None) -> None:
        """Write ``ingest``'s missing chunks in order, from one body of ``source`` (a range from the first
        missing byte), each made durable before the next; retried and kept on interrupt as every chunk is.
        The caller commits. For readers of a blob's bytes in order while it arrives (issue 13)."""
        await self._sequential(ingest, source, stats, progress)

    async def _sequential(self, ingest: Ingest, source: ByteSource, stats: TransferStats,
                          progress: Progress | None) -> None:
        """The chunks still missing, in order, from one body read once (reopened only after a failure)."""
        body = OneStream(source)
        streaming = STREAMING.set(True)
        try:
            async with self._slots.slot(ingest.blob.digest):
                for index in ingest.missing():
                    offset, length = ingest.chunk_range(index)
                    await self._fetch_range(ingest, index, offset, length, OriginOnly(body), [body], [], None,
                                            stats, progress, got=ingest.resume_at(index))
                    await self._io(ingest.mark_done, index)
        finally:
            STREAMING.reset(streaming)
            await body.close()

    async def _worker(self, ingest: Ingest, todo: deque[int], stats: TransferStats,
                      progress: Progress | None, trusted_only: bool) -> None:
        while todo:
            # The chunk is taken only once a slot is held, so each blob's chunks start in order;
            # the slot is given back before the fdatasync, so the next range is already coming.
            async with self._slots.slot(ingest.blob.digest):
                if not todo:
                    return
                index = todo.popleft()
                future = asyncio.get_running_loop().create_future()
                self._pieces[(ingest.blob.digest, index)] = future
                try:
                    await self._fetch_chunk(ingest, index, stats, progress, trusted_only, defer=bool(todo))
                except _Deferred as e:
                    self._settle(ingest.blob.digest, index, e)
                    # A few pieces later (one per slot), then on: at the queue's end, a late home's first pieces
                    # all came back at the end of every peer's pull, from that home alone (issue 11).
                    todo.insert(min(len(todo), self.config.concurrency), index)
                    continue
                except BaseException as e:
                    self._settle(ingest.blob.digest, index, e)
                    raise
            # Made durable beside the next fetch, not before it: on a busy disk an fdatasync takes
            # seconds, and the network would sit idle meanwhile (issue 13: S3 against rclone).
            await self._sync_slots.acquire()
            syncing = self._syncing.setdefault(ingest.blob.digest, set())
            task = asyncio.create_task(self._durable(ingest, index))
            syncing.add(task)
            task.add_done_callback(syncing.discard)
            task.add_done_callback(lambda _: self._sync_slots.release())  # even if cancelled before it ran

    async def _durable(self, ingest: Ingest, index: int) -> None:
        """Make chunk ``index`` durable and recorded (it is done only then); tell whoever waits on it."""
        try:
            await self._io(ingest.mark_done, index)
        except BaseException as e:
            self._settle(ingest.blob.digest, index, e)
            raise
        self._settle(ingest.blob.digest, index, None)

    async def _synced(self, digest: str) -> None:
        """Wait until every chunk of ``digest`` handed to :meth:`_durable` is durable; raise its first failure."""
        pending = list(self._syncing.get(digest, ()))
        results = await asyncio.gather(*pending, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _settle(self, digest: str, index: int, error: BaseException | None) -> None:
        future = self._pieces.pop((digest, index), None)
        if future is not None and not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(Unavailable(f"piece {index} of {digest[:19]} failed: {error}"))
                future.exception()

    def fetches(self, digest: str) -> bool:
        """Whether this engine is fetching ``digest``, or is about to (a pull wants it, or is resolving)."""
        return digest in self._inflight or bool(self._resolving) or digest in self._wanted

    async def ensure_piece(self, digest: str, offset: int, *, wait: float) -> bool:
        """Make the piece of ``digest`` holding byte ``offset`` durable here now, if this engine fetches it.

        For peers asking this node as the piece's home: the piece is taken
        out of the blob's queue and fetched at once (single flight with this
        node's own workers and every other requester). Waits up to ``wait``
        seconds for the blob's ingest to open: while one of this node's
        pulls is still resolving its model, or has resolved one that needs
        the blob, it is about to fetch it (peers pulling the same model at
        the same moment must not all fall back to the origin). False when
        this node is not fetching the blob, or the piece could not be had in time.
        """
        if not self.fetches(digest):
            return False
        try:
            async with asyncio.timeout(wait):
                while digest not in self._inflight:
                    if self.content.has(digest):
                        return True  # a fast fetch opened and committed it between two looks
                    if not self._resolving and digest not in self._wanted:
                        return False
                    await asyncio.sleep(0.05)
                opened = self._opened.setdefault(digest, asyncio.Event())
                await opened.wait()
                entry = self._open_ingests.get(digest)
                if entry is None:
                    return self.content.has(digest)
                ingest, todo, stats, progress = entry
                first = ingest.chunk_range(0)[1] or 1
                index = offset // first
                if index >= ingest.chunks:
                    return False
                future = self._pieces.get((digest, index))
                if future is None and index in todo:
                    future = self._start_for_peer(ingest, todo, index, stats, progress, self._peer_slots)
                if future is None:
                    return True  # durable already (the caller reads it to be sure)
                await asyncio.shield(future)
                return True
        except (TimeoutError, ModelCacheError):
            return False

    def _fetch_ahead(self, ingest: Ingest, router: ChunkRouter, todo: deque[int], stats: TransferStats,
                     progress: Progress | None) -> None:
        """Start the pieces the router wants fetched ahead (``ahead``: those peers ask this node for as their
        home), each in a task of its own paced by the router (``pace``: the node's origin gate), while the
        workers walk the rest: the peers waiting on them never wait for our workers' turn (issue 11)."""
        ahead = getattr(router, "ahead", None)
        pace = getattr(router, "pace", None)
        if ahead is None or pace is None:
            return
        # Right after the ingest opened: nothing of this blob is in flight yet, every index is in ``todo``.
        for index in ahead(ingest.blob, list(todo)):
            self._start_for_peer(ingest, todo, index, stats, progress, pace(ingest.blob, index))

    def _start_for_peer(self, ingest: Ingest, todo: deque[int], index: int, stats: TransferStats,
                        progress: Progress | None, slot: contextlib.AbstractAsyncContextManager[Any]
                        ) -> asyncio.Future[None]:
        """Take piece ``index`` out of the queue and fetch it now in a task of its own, inside ``slot``;
        return the future peers wait on."""
        digest = ingest.blob.digest
        todo.remove(index)
        future = asyncio.get_running_loop().create_future()
        self._pieces[(digest, index)] = future
        task = asyncio.create_task(self._fetch_for_peer(ingest, index, stats, progress, slot))
        extra = self._for_peers.setdefault(digest, set())
        extra.add(task)
        task.add_done_callback(extra.discard)
        return future

    async def _fetch_for_peer(self, ingest: Ingest, index: int, stats: TransferStats,
                              progress: Progress | None, slot: contextlib.AbstractAsyncContextManager[Any]) -> None:
        try:
            async with slot:
                await self._fetch_chunk(ingest, index, stats, progress, False)
            await self._io(ingest.mark_done, index)
        except BaseException as e:
            entry = self._open_ingests.get(ingest.blob.digest)
            if entry is not None:
                entry[1].append(index)  # back to the queue: this node still needs it
            self._settle(ingest.blob.digest, index, e)
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        self._settle(ingest.blob.digest, index, None)

    async def _fetch_chunk(self, ingest: Ingest, index: int, stats: TransferStats,
                           progress: Progress | None, trusted_only: bool, *, defer: bool = False) -> None:
        """Write chunk ``index`` whole into the ingest (the caller makes it durable).

        Sources are tried in the router's order, each with its own attempt
        budget; a piece that contains untrusted bytes and fails its digest is
        rewound and fetched again, the sources that gave it reported.
        """
        blob = ingest.blob
        offset, length = ingest.chunk_range(index)
        if length == 0:  # an empty blob: nothing to ask anyone for
            return
        for _ in range(PIECE_ROUNDS):
            router = self._router(blob.digest)
            sources = list(router.trusted(blob) if trusted_only and isinstance(router, PieceRouter)
                           else router.sources(blob, index))
            kept = ingest.resume_at(index)  # bytes an interrupted pull kept: the rest is asked for
            # A piece's check hash covers it whole; one resumed midway is checked at commit instead.
            expected = self._digests.get(blob.digest) if not kept else None
            check = hashlib.sha256() if expected is not None else None
            used: list[ByteSource] = []
            key = (blob.digest, index)
            defer = defer and key not in self._deferred
            try:
                await self._fetch_range(ingest, index, offset, length, router, sources, used, check, stats, progress,
                                        defer=defer, got=kept)
            except _Deferred:
                self._deferred.add(key)
                raise
            self._deferred.discard(key)
            untrusted = [s for s in used if not getattr(s, "trusted", True)]
            if untrusted:
                self._contributors.setdefault(blob.digest, set()).update(untrusted)
                self._untrusted[blob.digest] = True
            if check is None or expected is None or not untrusted or check.hexdigest() == expected[index]:
                if isinstance(router, PieceRouter):
                    for source in used:
                        router.report(source, blob, index, "ok")
                return
            log.warning("piece %d of %s from %s failed its check: fetching it again elsewhere",
                        index, blob.digest[:19], ", ".join(s.name for s in untrusted))
            for source in untrusted:
                if isinstance(router, PieceRouter):
                    router.report(source, blob, index, "lied")
            await self._io(ingest.rewind, index)
            stats.bytes_done -= length
            stats.bytes_fetched -= length
        raise Unavailable(f"piece {index} of {blob.digest[:19]} failed its check {PIECE_ROUNDS} times")

    async def _fetch_range(self, ingest: Ingest, index: int, offset: int, length: int, router: ChunkRouter,
                           sources: list[ByteSource], used: list[ByteSource], check: Any,
                           stats: TransferStats, progress: Progress | None, *, defer: bool = False,
                           got: int = 0) -> None:
        """Write ``[offset + got, offset + length)`` of chunk ``index`` from ``sources`` in turn.

        Cancelled while it waits to retry, it keeps what it wrote of the chunk
        (:meth:`_keep`); cancelled mid-body, :meth:`_stream` does.
        """
        blob = ingest.blob
        for n, source in enumerate(sources):
            last = n == len(sources) - 1
            # Its own budget, else: the last source (the origin) gets the retries, any before it one try.
            attempts = getattr(source, "attempts", None) or (self.config.retries + 1 if last else 1)
            attempt = 0
            while True:
                try:
                    got += await self._stream(ingest, source, offset + got, length - got, stats, progress, check)
                    if got != length:  # a source that ends early without saying so: retry the rest now
                        raise Unavailable(f"{source.name}: range of {blob.digest[:19]} ended after {got} "
                                          f"of {length} bytes")
                    used.append(source)
                    return
                except RangeIgnored as e:
                    raise _WholeBody(source) from e
                except ModelCacheError as e:
                    if defer and n == 0 and got == 0 and isinstance(e, NotYet):
                        raise _Deferred(str(e)) from e
                    if isinstance(e, _Partial):
                        got += e.written
                        if e.written:
                            used.append(source)
                    if not last and not isinstance(e, Unavailable | _Miss):
                        e = _Miss(str(e))  # a final answer from a peer is a miss: the next source may have it
                    if not isinstance(e, Unavailable | _Miss):
                        raise
                    attempt += 1
                    if isinstance(router, PieceRouter):
                        router.report(source, blob, index, "miss" if isinstance(e, _Miss) else "failed")
                    if attempt >= attempts or isinstance(e, _Miss):
                        if last:
                            raise Unavailable(f"{e} (gave up after {attempt} attempts)") from e
                        log.debug("chunk %d of %s: %s; next source", index, blob.digest[:19], e)
                        break  # the next source, at once, from the byte reached
                    stats.chunks_retried += 1
                    delay = self._backoff(attempt, getattr(e, "retry_after", None))
                    log.info("chunk %d of %s: %s; retry %d in %.1fs", index, blob.digest[:19], e, attempt, delay)
                    try:
                        await asyncio.sleep(delay)
                    except asyncio.CancelledError:
                        await self._keep(ingest, index, offset + got)
                        raise

    async def _keep(self, ingest: Ingest, index: int, end: int) -> None:
        """Interrupted: make chunk ``index``'s bytes, written from its start up to blob offset ``end``,
        durable and recorded, so the next pull resumes there (best effort: the cancellation matters
        more, and bytes not kept are fetched again)."""
        start, _ = ingest.chunk_range(index)
        if end <= start + ingest.resume_at(index):
            return
        try:
            await self._io(ingest.keep, index, end - start)
        except Exception as err:  # noqa: BLE001 - see above
            log.warning("chunk %d of %s: could not keep the bytes received: %s", index, ingest.blob.digest[:19], err)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, 300.0)
        cap = min(self.config.backoff_max, self.config.backoff_base * (2 ** attempt))
        return random.uniform(0, cap)

    async def _stream(self, ingest: Ingest, source: ByteSource, offset: int, length: int,
                      stats: TransferStats, progress: Progress | None, check: Any = None) -> int:
        """Copy one byte range from ``source`` into the ingest; return bytes written.

        On a retryable failure the bytes already received are still written,
        and :class:`_Partial` tells the caller how many, so it resumes after them.
        Cancelled, it writes what arrived (the reader's buffer included) and keeps it.
        """
        pieces: list[bytes | memoryview] = []
        buffered = 0
        written = 0
        position = offset
        pending: asyncio.Future | None = None
        loop = asyncio.get_running_loop()
        fetched = stats.fetched_by_source

        async def settle() -> None:
            # shield: a write cancelled mid-await still runs in its thread; wait for it to end.
            nonlocal pending
            if pending is not None:
                await asyncio.shield(pending)
                pending = None

        async def flush() -> None:
            nonlocal pieces, buffered, written, position, pending
            await settle()
            if buffered:
                pending = loop.run_in_executor(self._pool, _write, ingest, position, pieces, check)
                position += buffered
                written += buffered
                pieces, buffered = [], 0

        remaining = length

        def take(piece: bytes | memoryview) -> None:
            nonlocal remaining, buffered
            if len(piece) >= remaining:  # never write past the range, whatever the source sends
                piece = piece[:remaining]
            remaining -= len(piece)
            pieces.append(piece)
            buffered += len(piece)
            n = len(piece)
            stats.bytes_done += n
            stats.bytes_fetched += n
            fetched[source.name] = fetched.get(source.name, 0) + n

        metering = RECEIVING.set(stats.receiving)  # readers count bytes as they arrive, for progress
        hangup = HANGUP.get()  # one per reading task: a body can outlive one range (OneStream)
        hanging = None
        if hangup is None:
            hangup = Hangup()
            hanging = HANGUP.set(hangup)
        body = aiter(source.read(ingest.blob, offset, length))
        try:
            async for piece in body:
                take(piece)
                if buffered >= WRITE_BLOCK:
                    await flush()
                    if progress:
                        progress(stats)
                if not remaining:
                    break
            await flush()
            await settle()
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Cancelled inside the reader, which handed over what it held instead of raising
                # (and the range happened to be complete): the cancellation still goes on.
                raise asyncio.CancelledError
        except RangeIgnored:
            raise
        except Unavailable as e:
            await flush()
            await settle()
            raise _Partial(written, e) from e
        except asyncio.CancelledError:
            # Interrupted: what arrived is written all the same, and kept. Cancelled
            # while we waited on a write, the reader is still filling a buffer: hang up, take what it has.
            if hangup.armed():
                hangup.now()
                with contextlib.suppress(Exception):  # the reader ends with an error, by design
                    while remaining:
                        take(await anext(body))
            await flush()
            await settle()
            # The range lies in one chunk, written from its start up to here (earlier tries included).
            await self._keep(ingest, offset // max(1, ingest.chunk_range(0)[1]), offset + written)
            raise
        finally:
            RECEIVING.reset(metering)
            if hanging is not None:
                HANGUP.reset(hanging)
        if progress:
            progress(stats)
        return written


async def _stop(workers: Sequence[asyncio.Task[None]]) -> None:
    """Cancel the workers not already being cancelled (a second cancel would cut their cleanup short); wait."""
    for w in workers:
        if not w.done() and not w.cancelling():
            w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)


class _WholeBody(Exception):
    """A source answered a chunk's range with the whole blob: read the blob as one stream from it."""

    def __init__(self, source: ByteSource) -> None:
        super().__init__(source.name)
        self.source = source


def _write(ingest: Ingest, position: int, pieces: list[bytes | memoryview], check: Any) -> None:
    """Write a batch into the ingest, feeding the piece's own check hash (in order) if there is one."""
    ingest.write(position, pieces)
    if check is not None:
        for piece in pieces:
            check.update(piece)


class _Deferred(ModelCacheError):
    """The piece's first source is not ready: fetch the blob's other pieces first."""


class _Miss(ModelCacheError):
    """A source that does not hold the range (or refused it for good): the next source may."""


class _Partial(Unavailable):
    """A retryable failure after ``written`` bytes of the range were kept."""

    def __init__(self, written: int, cause: Unavailable) -> None:
        super().__init__(str(cause), retry_after=cause.retry_after)
        self.written = written

