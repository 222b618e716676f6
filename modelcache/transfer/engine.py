"""Fetching blobs into the store as fixed-size chunks, many in parallel: the engine that ties the parts together.

Guarantees of this module (the parts state their own: :mod:`.failover`
retries per source with :mod:`.backoff`, :mod:`.rangecopy` moves bytes from
the socket to the file and keeps them on interrupt, :mod:`.pieces` checks
untrusted bytes, :mod:`.parallel` and :mod:`.sequential` walk a blob's
chunks, :mod:`.durable` makes them durable beside the next fetch,
:mod:`.homes` serves peers asking this node as a piece's home):

- A blob is fetched at most once at a time: in this process through a
  single-flight map of digest -> task, across processes through the store's
  per-blob lock; a blob already committed (from any model or source) is not
  fetched again.
- A fetch shared by several pulls runs in the engine's ``spawn`` (the
  daemon's task group) and reads through the router of a pull still
  waiting on it: one caller leaving (and closing its source) never fails
  another's pull; the fetch stops only when no caller is left, and then
  keeps every byte received before the cancellation goes on.
- A source that answers a ranged GET with the whole blob (HTTP 200) switches
  that blob to one sequential stream (:mod:`.sequential`).
- Bytes whose sha256 (or MD5) fails at commit are discarded and the blob is
  fetched once more (from trusted sources only when a peer's bytes went in);
  if it is wrong again, the error stands. A peer can cost time, never a wrong byte.
- The blob is committed only when every chunk is durable.
- Open files are bounded by the concurrency, not by the number of blobs:
  at most ``2 x concurrency`` ingests (four descriptors each) are open at
  once, so a model of ten thousand files pulls under a small ``ulimit -n``.
- A committed blob is held, from the moment it is linked, by the lease of
  every pull that asked for it (single flight joins their leases).
- From the origin alone (no peer reads chunks back), a blob's bytes go to
  the disk past the page cache (``Ingest.bypass_cache``, :mod:`..store.direct`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from ..errors import DigestMismatch, Unavailable
from ..model import Blob
from ..sources.base import ByteSource
from ..store.etag import checks_for
from ..store.roles import Ingest, Ingester
from . import backoff
from .config import TransferConfig
from .durable import Durability
from .homes import Homes
from .iothreads import IOThreads
from .outcomes import WholeBody
from .parallel import stop, work
from .pieces import PieceChecks
from .routing import ChunkRouter, OriginOnly, PieceRouter
from .sequential import read_in_order
from .slots import FairSlots
from .stats import Progress, TransferStats

log = logging.getLogger(__name__)

T = TypeVar("T")
Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]


class Engine:
    """Fetches blobs into a content store through a chunk router."""

    def __init__(self, content: Ingester, config: TransferConfig | None = None) -> None:
        self.content = content
        self.config = config or TransferConfig()
        self._inflight: dict[str, asyncio.Future[None]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._routers: dict[str, list[ChunkRouter]] = {}  # digest in flight -> routers of the pulls waiting
        self.spawn: Spawn = asyncio.create_task  # the daemon sets its task group's create_task
        self._leases: dict[str, set[str]] = {}  # digest in flight -> leases of every pull waiting on it
        self._open = asyncio.Semaphore(2 * self.config.concurrency)
        self.learned: dict[str, str] = {}  # stand-in digest -> sha256, for every pull sharing this engine
        self._slots = FairSlots(self.config.concurrency)
        # A write may wait in its thread for a layer's unpacking to catch up (store/streamunpack.py), and a
        # pull streams at most ``concurrency`` layers at once (pull.py): as many threads again, so the other
        # writes and syncs do not queue behind those waits (each of which ends within STALL seconds anyway).
        self._threads = IOThreads(2 * self.config.concurrency + 4)
        self._checks = PieceChecks(self._threads, self.config, self._router)
        self._homes = Homes(self._threads, self._checks.fetch_chunk, self._inflight, self.content.has,
                            self.config.concurrency)
        # Chunks being made durable (fdatasync, then recorded) while their workers fetch the next ones;
        # at most ``concurrency`` at once, so writes always find an I/O thread.
        self._durability = Durability(self._threads, self.config.concurrency, self._homes.settle)

    def close(self) -> None:
        """Stop the I/O threads."""
        self._threads.close()

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
            self._homes.opened.pop(blob.digest, None)
            if self._inflight.get(blob.digest) is done:
                del self._inflight[blob.digest]
                self._tasks.pop(blob.digest, None)
                self._leases.pop(blob.digest, None)

    def resolving(self) -> AbstractContextManager[None]:
        """Around a pull's resolve: its blobs are not known yet, but will be wanted in a moment."""
        return self._homes.resolving()

    def wanting(self, digests: Iterable[str]) -> AbstractContextManager[None]:
        """While a pull that needs ``digests`` runs: this node is about to fetch (or fetches) them."""
        return self._homes.wanting(digests)

    def fetches(self, digest: str) -> bool:
        """Whether this engine is fetching ``digest``, or is about to (a pull wants it, or is resolving)."""
        return self._homes.fetches(digest)

    async def ensure_piece(self, digest: str, offset: int, *, wait: float) -> bool:
        """Make the piece of ``digest`` holding byte ``offset`` durable here now, if this engine fetches it
        (for peers asking this node as the piece's home; see :meth:`.homes.Homes.ensure_piece`)."""
        return await self._homes.ensure_piece(digest, offset, wait=wait)

    async def retry(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, tried again on :class:`Unavailable` as a chunk is: same backoff, same retry count.

        For the requests around the chunks (resolving a manifest, listing a
        bucket), so a refused connection or a 503 there is as transient as
        one in the middle of a blob.
        """
        return await backoff.retry(self.config, what, call)

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
                peers = isinstance(router, PieceRouter) and bool(self._checks.untrusted.pop(blob.digest, None))
                if peers:
                    log.warning("%s failed its digest check after bytes from peers: fetching it from the origin",
                                blob.digest[:19])
                else:
                    log.info("%s; fetching it again", e)
                # A multipart ETag or composite CRC assumes one part size (see store/etag.py): it gates
                # peers' bytes, but never fails bytes from the origin alone.
                whole_crc = blob.crc if blob.crc and not blob.crc.part_size else None
                again_blob = dataclasses.replace(blob, md5_parts=None, crc=whole_crc) \
                    if blob.md5_parts or blob.crc != whole_crc else blob
                try:
                    await self._fetch_open(again_blob, stats, progress, trusted_only=peers)
                except DigestMismatch as again:
                    raise DigestMismatch(f"{again} (fetched twice)") from again
            finally:
                self._checks.untrusted.pop(blob.digest, None)

    async def _fetch_open(self, blob: Blob, stats: TransferStats, progress: Progress | None, *,
                          trusted_only: bool = False) -> None:
        router = self._router(blob.digest)
        pieces = isinstance(router, PieceRouter)
        blob = checks_for(blob, peers=pieces and not trusted_only)  # an S3 CRC only where no peer gives bytes
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
                        self._checks.digests[blob.digest] = digests
            todo = deque(missing)
            self._homes.open(ingest, todo, stats, progress)
            extra = self._homes.for_peers.setdefault(blob.digest, set())
            if pieces and not trusted_only:
                self._homes.fetch_ahead(ingest, router, todo, stats, progress)
            workers: list[asyncio.Task[None]] = []
            try:
                while True:
                    workers = [
                        asyncio.create_task(work(self._slots, self._checks, self._homes, self._durability, ingest, todo,
                                                stats, progress, trusted_only, self.config.concurrency))
                        for _ in range(min(self.config.concurrency, len(todo)))
                    ]
                    try:
                        await asyncio.gather(*workers)
                    except WholeBody as e:
                        await stop(workers)
                        log.info("%s answers byte ranges with the whole blob: reading %s as one stream",
                                 e.source.name, blob.digest[:19])
                        await read_in_order(self._threads, self.config, self._slots, self._durability, ingest,
                                            e.source, stats, progress)
                        todo.clear()
                    # Pieces peers asked this node for (as their home) may still be on their way in;
                    # one that failed there went back to the queue.
                    await asyncio.gather(*list(extra), return_exceptions=True)
                    if not todo:
                        break
                await self._durability.synced(blob.digest)
            except BaseException:
                await stop([*workers, *extra, *self._durability.pending(blob.digest)])
                raise
            finally:
                self._durability.forget(blob.digest)
                self._homes.close(blob.digest)
                self._checks.digests.pop(blob.digest, None)
            await self._threads.run(ingest.commit, tuple(self._leases.get(blob.digest, ())))
            if not blob.verified:
                stats.learned[blob.digest] = self.learned[blob.digest] = ingest.committed_as
        except DigestMismatch:
            stats.bytes_done -= blob.size  # the commit discarded the bytes: none of them counts any more
            if pieces and not trusted_only:
                for source in self._checks.contributors.pop(blob.digest, ()):
                    router = self._router(blob.digest)
                    if isinstance(router, PieceRouter):
                        router.report(source, blob, -1, "lied")
            raise
        finally:
            self._checks.contributors.pop(blob.digest, None)
            ingest.close()

    async def stream(self, ingest: Ingest, source: ByteSource, stats: TransferStats,
                     progress: Progress | None = None) -> None:
        """Write ``ingest``'s missing chunks in order, from one body of ``source`` (a range from the first
        missing byte), each made durable beside the next one's download (every one durable on return);
        retried and kept on interrupt as every chunk is. The caller commits. For readers of a blob's
        bytes in order while it arrives (issue 13)."""
        await read_in_order(self._threads, self.config, self._slots, self._durability, ingest, source, stats,
                            progress)
