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
- Failures worth retrying (5xx, 429, resets, stalls) are retried per chunk
  with exponential backoff and full jitter, honouring ``Retry-After``, and the
  retry resumes at the byte where the previous attempt stopped. The stall
  timeout is the sources' per-read timeout, so a hung connection cannot hang
  a pull.
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
- Hashing, writes and fsync run in a thread pool: the event loop only moves
  bytes between sockets and threads.
- Open files are bounded by the concurrency, not by the number of blobs:
  at most ``2 x concurrency`` ingests (three descriptors each) are open at
  once, so a model of ten thousand files pulls under a small ``ulimit -n``.
- A committed blob is held, from the moment it is linked, by the lease of
  every pull that asked for it (single flight joins their leases).
- Slots are shared fairly between blobs (:mod:`.slots`): with several blobs
  each gets its own stream, in order, so its sha256 is computed from the
  bytes in memory as they are written instead of read back from disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import DigestMismatch, ModelCacheError, Unavailable
from ..model import Blob
from ..sources.base import ByteSource
from ..store.roles import Ingest, Ingester
from .meter import RECEIVING, Meter
from .routing import ChunkRouter, NotYet, PieceRouter
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
        self._pool = ThreadPoolExecutor(max_workers=self.config.concurrency + 4, thread_name_prefix="mc-io")

    def close(self) -> None:
        """Stop the I/O threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _io(self, fn: Callable, *args: object) -> object:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

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
        finally:
            for digest in joined:
                self._leave(digest, router)

    def _leave(self, digest: str, router: ChunkRouter) -> None:
        """A caller stops waiting on ``digest``: its router (and source) is no longer used; the last one
        to leave stops the fetch (its durable chunks stay for the next pull)."""
        routers = self._routers.get(digest)
        if routers is None:
            return
        if router in routers:
            routers.remove(router)
        if not routers:
            del self._routers[digest]
            task = self._tasks.get(digest)
            if task is not None and not task.done():
                task.cancel()

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
            except DigestMismatch:
                router = self._router(blob.digest)
                if not isinstance(router, PieceRouter) or not self._untrusted.pop(blob.digest, None):
                    raise
                # Bytes from peers went in and the blob failed its sha256: once more, trusted sources only.
                log.warning("%s failed its digest check after bytes from peers: fetching it from the origin",
                            blob.digest[:19])
                await self._fetch_open(blob, stats, progress, trusted_only=True)
            finally:
                self._untrusted.pop(blob.digest, None)

    async def _fetch_open(self, blob: Blob, stats: TransferStats, progress: Progress | None, *,
                          trusted_only: bool = False) -> None:
        router = self._router(blob.digest)
        pieces = isinstance(router, PieceRouter)
        chunk_size = router.piece_size(blob) if isinstance(router, PieceRouter) else self.config.chunk_size
        ingest = await self.content.open_ingest(blob, chunk_size)
        if ingest is None:  # another process committed it meanwhile
            stats.bytes_done += blob.size
            stats.bytes_reused += blob.size
            return
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
            workers: list[asyncio.Task[None]] = []
            try:
                while True:
                    workers = [
                        asyncio.create_task(self._worker(ingest, todo, stats, progress, trusted_only))
                        for _ in range(min(self.config.concurrency, len(todo)))
                    ]
                    await asyncio.gather(*workers)
                    # Pieces peers asked this node for (as their home) may still be on their way in;
                    # one that failed there went back to the queue.
                    await asyncio.gather(*list(extra), return_exceptions=True)
                    if not todo:
                        break
            except BaseException:
                for w in [*workers, *extra]:
                    w.cancel()
                await asyncio.gather(*workers, *extra, return_exceptions=True)
                raise
            finally:
                self._for_peers.pop(blob.digest, None)
                self._open_ingests.pop(blob.digest, None)
                self._opened.pop(blob.digest, None)
                self._digests.pop(blob.digest, None)
            await self._io(ingest.commit, tuple(self._leases.get(blob.digest, ())))
            if not blob.verified:
                stats.learned[blob.digest] = self.learned[blob.digest] = ingest.committed_as
        except DigestMismatch:
            if pieces and not trusted_only:
                for source in self._contributors.pop(blob.digest, ()):
                    router = self._router(blob.digest)
                    if isinstance(router, PieceRouter):
                        router.report(source, blob, -1, "lied")
            raise
        finally:
            self._contributors.pop(blob.digest, None)
            ingest.close()

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
                    todo.append(index)  # the other pieces first; this one comes back once, then goes on
                    continue
                except BaseException as e:
                    self._settle(ingest.blob.digest, index, e)
                    raise
            try:
                await self._io(ingest.mark_done, index)
            except BaseException as e:
                self._settle(ingest.blob.digest, index, e)
                raise
            self._settle(ingest.blob.digest, index, None)

    def _settle(self, digest: str, index: int, error: BaseException | None) -> None:
        future = self._pieces.pop((digest, index), None)
        if future is not None and not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(Unavailable(f"piece {index} of {digest[:19]} failed: {error}"))
                future.exception()

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
        if digest not in self._inflight and not self._resolving and digest not in self._wanted:
            return False
        try:
            async with asyncio.timeout(wait):
                while digest not in self._inflight:
                    if not self._resolving and digest not in self._wanted:
                        return False
                    await asyncio.sleep(0.05)
                opened = self._opened.setdefault(digest, asyncio.Event())
                await opened.wait()
                entry = self._open_ingests.get(digest)
                if entry is None:
                    return False
                ingest, todo, stats, progress = entry
                first = ingest.chunk_range(0)[1] or 1
                index = offset // first
                if index >= ingest.chunks:
                    return False
                future = self._pieces.get((digest, index))
                if future is None and index in todo:
                    todo.remove(index)
                    future = asyncio.get_running_loop().create_future()
                    self._pieces[(digest, index)] = future
                    task = asyncio.create_task(self._fetch_for_peer(ingest, index, stats, progress))
                    extra = self._for_peers.setdefault(digest, set())
                    extra.add(task)
                    task.add_done_callback(extra.discard)
                if future is None:
                    return True  # durable already (the caller reads it to be sure)
                await asyncio.shield(future)
                return True
        except (TimeoutError, ModelCacheError):
            return False

    async def _fetch_for_peer(self, ingest: Ingest, index: int, stats: TransferStats,
                              progress: Progress | None) -> None:
        try:
            async with self._slots.slot(ingest.blob.digest):
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
            expected = self._digests.get(blob.digest)
            check = hashlib.sha256() if expected is not None else None
            used: list[ByteSource] = []
            key = (blob.digest, index)
            defer = defer and key not in self._deferred
            try:
                await self._fetch_range(ingest, index, offset, length, router, sources, used, check, stats, progress,
                                        defer=defer)
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
                           stats: TransferStats, progress: Progress | None, *, defer: bool = False) -> None:
        blob = ingest.blob
        got = 0
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
                    await asyncio.sleep(delay)

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
        """
        pieces: list[bytes | memoryview] = []
        buffered = 0
        written = 0
        position = offset
        pending: asyncio.Future | None = None
        loop = asyncio.get_running_loop()
        fetched = stats.fetched_by_source

        async def flush() -> None:
            nonlocal pieces, buffered, written, position, pending
            if pending is not None:
                await pending
                pending = None
            if buffered:
                pending = loop.run_in_executor(self._pool, _write, ingest, position, pieces, check)
                position += buffered
                written += buffered
                pieces, buffered = [], 0

        remaining = length
        metering = RECEIVING.set(stats.receiving)  # readers count bytes as they arrive, for progress
        try:
            async for piece in source.read(ingest.blob, offset, length):
                if len(piece) >= remaining:  # never write past the range, whatever the source sends
                    piece = piece[:remaining]
                remaining -= len(piece)
                pieces.append(piece)
                buffered += len(piece)
                n = len(piece)
                stats.bytes_done += n
                stats.bytes_fetched += n
                fetched[source.name] = fetched.get(source.name, 0) + n
                if buffered >= WRITE_BLOCK:
                    await flush()
                    if progress:
                        progress(stats)
                if not remaining:
                    break
        except Unavailable as e:
            await flush()
            if pending is not None:
                await pending
            raise _Partial(written, e) from e
        finally:
            RECEIVING.reset(metering)
        await flush()
        if pending is not None:
            await pending
        if progress:
            progress(stats)
        return written


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

