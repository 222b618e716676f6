"""This node as a piece's home: pieces peers ask for are fetched at once, single flight with our workers.

Guarantees:

- :meth:`Homes.ensure_piece` makes the piece holding a byte durable here
  now if this engine fetches (or is about to fetch) its blob: taken out of
  the blob's queue and fetched in a task of its own, once, whoever asks
  (peers, and this node's own workers share one future per piece).
- Those pieces get slots of their own (``peer_slots``), outside the
  workers': our workers hold theirs while they wait on other homes, which
  may be waiting on us; one shared pool lets the cluster stall.
- A router may name pieces to fetch ahead (``ahead``): each is started at
  once inside the router's ``pace`` (the node's origin gate), so the peers
  waiting on it never wait for our workers to reach it (issue 11).
- A piece fetched for a peer that fails goes back to the blob's queue: this
  node still needs it. A piece counts as done only once durable.
- While a pull resolves its model, or runs with a model that needs a blob,
  the blob counts as about to be fetched (:meth:`Homes.fetches`), so peers
  pulling the same model at the same moment do not all go to the origin.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

from ..errors import ModelCacheError, Unavailable
from ..store.roles import Ingest
from .iothreads import IOThreads
from .routing import ChunkRouter
from .stats import Progress, TransferStats

FetchChunk = Callable[[Ingest, int, TransferStats, "Progress | None", bool], Awaitable[None]]
OpenIngest = tuple[Ingest, deque[int], TransferStats, "Progress | None"]


class Homes:
    """The pieces of the blobs this engine fetches now, as peers see them."""

    def __init__(self, threads: IOThreads, fetch_chunk: FetchChunk, inflight: dict[str, Any],
                 has: Callable[[str], bool], concurrency: int) -> None:
        self._threads = threads
        self._fetch_chunk = fetch_chunk
        self._inflight = inflight  # the engine's single-flight map: digest -> future of its fetch
        self._has = has  # whether the store holds a committed blob
        self.open_ingests: dict[str, OpenIngest] = {}
        self.opened: dict[str, asyncio.Event] = {}
        self.pieces: dict[tuple[str, int], asyncio.Future[None]] = {}  # pieces being fetched now
        self.for_peers: dict[str, set[asyncio.Task[None]]] = {}  # pieces fetched now because a peer asked
        self._resolving = 0  # pulls resolving their model now (their blobs are not known yet)
        self._wanted: Counter[str] = Counter()  # blobs of models resolved by pulls still running
        # Pieces fetched because a peer asked us as their home get slots of their own: our workers hold
        # theirs while they wait on other homes, which may be waiting on us; one shared pool lets the
        # cluster stall until those waits time out (seen in the namespace test: 2.5 s with no byte moving).
        self._peer_slots = asyncio.Semaphore(concurrency)

    def open(self, ingest: Ingest, todo: deque[int], stats: TransferStats, progress: Progress | None) -> None:
        """The blob's ingest is open and its queue known: peers' asks for its pieces can be served."""
        digest = ingest.blob.digest
        self.open_ingests[digest] = (ingest, todo, stats, progress)
        self.opened.setdefault(digest, asyncio.Event()).set()

    def close(self, digest: str) -> None:
        """The blob's ingest is closing."""
        self.for_peers.pop(digest, None)
        self.open_ingests.pop(digest, None)
        self.opened.pop(digest, None)

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
                    if self._has(digest):
                        return True  # a fast fetch opened and committed it between two looks
                    if not self._resolving and digest not in self._wanted:
                        return False
                    await asyncio.sleep(0.05)
                opened = self.opened.setdefault(digest, asyncio.Event())
                await opened.wait()
                entry = self.open_ingests.get(digest)
                if entry is None:
                    return self._has(digest)
                ingest, todo, stats, progress = entry
                first = ingest.chunk_range(0)[1] or 1
                index = offset // first
                if index >= ingest.chunks:
                    return False
                future = self.pieces.get((digest, index))
                if future is None and index in todo:
                    future = self._start_for_peer(ingest, todo, index, stats, progress, self._peer_slots)
                if future is None:
                    return True  # durable already (the caller reads it to be sure)
                await asyncio.shield(future)
                return True
        except (TimeoutError, ModelCacheError):
            return False

    def fetch_ahead(self, ingest: Ingest, router: ChunkRouter, todo: deque[int], stats: TransferStats,
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
        self.pieces[(digest, index)] = future
        task = asyncio.create_task(self._fetch_for_peer(ingest, index, stats, progress, slot))
        extra = self.for_peers.setdefault(digest, set())
        extra.add(task)
        task.add_done_callback(extra.discard)
        return future

    async def _fetch_for_peer(self, ingest: Ingest, index: int, stats: TransferStats,
                              progress: Progress | None, slot: contextlib.AbstractAsyncContextManager[Any]) -> None:
        try:
            async with slot:
                await self._fetch_chunk(ingest, index, stats, progress, False)
            await self._threads.run(ingest.mark_done, index)
        except BaseException as e:
            entry = self.open_ingests.get(ingest.blob.digest)
            if entry is not None:
                entry[1].append(index)  # back to the queue: this node still needs it
            self.settle(ingest.blob.digest, index, e)
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        self.settle(ingest.blob.digest, index, None)

    def settle(self, digest: str, index: int, error: BaseException | None) -> None:
        """Piece ``index`` of ``digest`` is durable (``error`` None) or failed: tell whoever waits on it."""
        future = self.pieces.pop((digest, index), None)
        if future is not None and not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(Unavailable(f"piece {index} of {digest[:19]} failed: {error}"))
                future.exception()
