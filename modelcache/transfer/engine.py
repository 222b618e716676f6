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
  fetched once more; if it is wrong again, the error stands.
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
import logging
import random
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from ..errors import DigestMismatch, RangeIgnored, Unavailable
from ..model import Blob
from ..sources.base import ByteSource
from ..sources.http import STREAMING
from ..store.roles import Ingest, Ingester
from .hangup import HANGUP, Hangup
from .meter import RECEIVING, Meter
from .onestream import OneStream
from .routing import ChunkRouter, OriginOnly
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


class Engine:
    """Fetches blobs into a content store through a chunk router."""

    def __init__(self, content: Ingester, config: TransferConfig | None = None) -> None:
        self.content = content
        self.config = config or TransferConfig()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._leases: dict[str, set[str]] = {}  # digest in flight -> leases of every pull waiting on it
        self._waiting: Counter[str] = Counter()  # digest in flight -> fetch() calls waiting on it
        self._open = asyncio.Semaphore(2 * self.config.concurrency)
        self.learned: dict[str, str] = {}  # stand-in digest -> sha256, for every pull sharing this engine
        self._slots = FairSlots(self.config.concurrency)
        self._pool = ThreadPoolExecutor(max_workers=self.config.concurrency + 4, thread_name_prefix="mc-io")

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
        tasks = []
        waited = []
        for blob in unique.values():
            if self.content.has(blob.digest):
                stats.bytes_done += blob.size
                stats.bytes_reused += blob.size
                continue
            self._leases.setdefault(blob.digest, set()).update(leases)
            task = self._inflight.get(blob.digest)
            if task is None or task.cancelling():  # one being stopped keeps what arrived; a new one resumes
                task = asyncio.create_task(self._fetch_blob(blob, router, stats, progress))
                self._inflight[blob.digest] = task
                task.add_done_callback(self._forget)
            tasks.append(task)
            waited.append(blob.digest)
            self._waiting[blob.digest] += 1
        if progress:
            progress(stats)
        if tasks:
            try:
                # shield: one caller giving up must not cancel a fetch others wait on...
                results = await asyncio.gather(*(asyncio.shield(t) for t in tasks), return_exceptions=True)
            except asyncio.CancelledError:
                # ...but the last one to give up stops it, and waits while it keeps what arrived.
                alone = [t for d, t in zip(waited, tasks, strict=True) if self._unwait(d) and not t.done()]
                for t in alone:
                    t.cancel()
                if alone:
                    await asyncio.wait(alone)
                raise
            for digest in waited:
                self._unwait(digest)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
        return stats

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

    def _unwait(self, digest: str) -> bool:
        """One caller fewer waits on ``digest``; True if it was the last."""
        self._waiting[digest] -= 1
        if self._waiting[digest] > 0:
            return False
        del self._waiting[digest]
        return True

    def _forget(self, task: asyncio.Task[None]) -> None:
        for digest, t in list(self._inflight.items()):
            if t is task:
                del self._inflight[digest]
                self._leases.pop(digest, None)

    async def _fetch_blob(self, blob: Blob, router: ChunkRouter, stats: TransferStats,
                          progress: Progress | None) -> None:
        async with self._open:
            await self._fetch_open(blob, router, stats, progress)

    async def _fetch_open(self, blob: Blob, router: ChunkRouter, stats: TransferStats,
                          progress: Progress | None) -> None:
        for attempt in (1, 2):  # bytes that fail their digest are fetched once more, then refused
            ingest = await self.content.open_ingest(blob, self.config.chunk_size)
            if ingest is None:  # another process committed it meanwhile
                stats.bytes_done += blob.size
                stats.bytes_reused += blob.size
                return
            try:
                resumed = ingest.bytes_done
                stats.bytes_done += resumed
                stats.bytes_reused += resumed
                await self._fill(ingest, router, stats, progress)
                try:
                    await self._io(ingest.commit, tuple(self._leases.get(blob.digest, ())))
                except DigestMismatch as e:  # commit discarded the bytes: none of them counts any more
                    stats.bytes_done -= blob.size
                    if attempt == 2:
                        raise DigestMismatch(f"{e} (fetched twice)") from e
                    log.info("%s; fetching it again", e)
                    continue
                if not blob.verified:
                    stats.learned[blob.digest] = self.learned[blob.digest] = ingest.committed_as
                return
            finally:
                ingest.close()

    async def _fill(self, ingest: Ingest, router: ChunkRouter, stats: TransferStats,
                    progress: Progress | None) -> None:
        """Make every chunk of ``ingest`` durable: chunks in parallel, or one stream if ranges are ignored."""
        todo = deque(ingest.missing())
        workers = [
            asyncio.create_task(self._worker(ingest, todo, router, stats, progress))
            for _ in range(min(self.config.concurrency, len(todo)))
        ]
        try:
            await asyncio.gather(*workers)
        except _WholeBody as e:
            await _stop(workers)
            log.info("%s answers byte ranges with the whole blob: reading %s as one stream",
                     e.source.name, ingest.blob.digest[:19])
            await self._sequential(ingest, e.source, stats, progress)
        except BaseException:
            await _stop(workers)
            raise

    async def _sequential(self, ingest: Ingest, source: ByteSource, stats: TransferStats,
                          progress: Progress | None) -> None:
        """The chunks still missing, in order, from one body read once (reopened only after a failure)."""
        body = OneStream(source)
        streaming = STREAMING.set(True)
        try:
            async with self._slots.slot(ingest.blob.digest):
                for index in ingest.missing():
                    await self._fetch_chunk(ingest, index, OriginOnly(body), stats, progress)
                    await self._io(ingest.mark_done, index)
        finally:
            STREAMING.reset(streaming)
            await body.close()

    async def _worker(self, ingest: Ingest, todo: deque[int], router: ChunkRouter,
                      stats: TransferStats, progress: Progress | None) -> None:
        while todo:
            # The chunk is taken only once a slot is held, so each blob's chunks start in order;
            # the slot is given back before the fdatasync, so the next range is already coming.
            async with self._slots.slot(ingest.blob.digest):
                if not todo:
                    return
                index = todo.popleft()
                await self._fetch_chunk(ingest, index, router, stats, progress)
            await self._io(ingest.mark_done, index)

    async def _fetch_chunk(self, ingest: Ingest, index: int, router: ChunkRouter,
                           stats: TransferStats, progress: Progress | None) -> None:
        """Write chunk ``index`` whole into the ingest (the caller makes it durable).

        It starts after the bytes of the chunk already durable; cancelled, what
        it wrote is kept (in :meth:`_stream`, or here while it waits to retry).
        """
        blob = ingest.blob
        offset, length = ingest.chunk_range(index)
        if length == 0:  # an empty blob: nothing to ask anyone for
            return
        got = ingest.resume_at(index)
        attempt = 0
        sources = list(router.sources(blob, index))
        while True:
            source = sources[attempt % len(sources)]
            try:
                got += await self._stream(ingest, source, offset + got, length - got, stats, progress)
                if got != length:  # a source that ends early without saying so: retry the rest now
                    raise Unavailable(f"{source.name}: range of {blob.digest[:19]} ended after {got} of {length} bytes")
                break
            except RangeIgnored as e:
                raise _WholeBody(source) from e
            except Unavailable as e:
                if isinstance(e, _Partial):
                    got += e.written
                attempt += 1
                if attempt > self.config.retries:
                    raise Unavailable(f"{e} (gave up after {attempt} attempts)") from e
                stats.chunks_retried += 1
                delay = self._backoff(attempt, e.retry_after)
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
                      stats: TransferStats, progress: Progress | None) -> int:
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
                pending = loop.run_in_executor(self._pool, ingest.write, position, pieces)
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


class _Partial(Unavailable):
    """A retryable failure after ``written`` bytes of the range were kept."""

    def __init__(self, written: int, cause: Unavailable) -> None:
        super().__init__(str(cause), retry_after=cause.retry_after)
        self.written = written

