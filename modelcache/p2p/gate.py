"""How many of its home pieces a node fetches from the origin at once while it shares with peers.

Every node pulling a model with peers fetches the pieces it is home for from
the origin and serves them on; a piece is served once it is whole. If each
of ``n`` nodes opened its full ``--concurrency`` of origin streams for them,
the origin's bandwidth would be split ``n x 8`` ways, every piece would
finish late and at about the same moment, and peers would sit idle until
then (issue 11's namespace test: 4 nodes at 40 MB/s took 1.7x one node
alone, the peer exchange following the origin phase instead of overlapping
it). So the cluster as a whole opens about :data:`ORIGIN_STREAMS` streams
for home pieces, as many as one node alone: each node
``ORIGIN_STREAMS // members`` (at least one), and its home pieces complete
one after another from the start, flowing on to peers while the origin
sends the next.

Only home pieces fetched ahead pass the gate (the engine's ``ahead``
pieces): a piece a node fetches from the origin because its home elected it
(the home does not pull the model) or because peers missed it is fetched on
the engine's own slots, so a node pulling a model no peer pulls keeps all
its streams. A node with no live peers has no home pieces to fetch ahead.
Waiters go in by priority (a piece's position among the node's home pieces
of its blob), then by arrival, so with several blobs the homes fetch the
``k``-th piece of each before the ``k+1``-th, as requesters walk them.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

ORIGIN_STREAMS = 8  # the cluster's origin streams for home pieces: one node's default --concurrency


def share(members: int, streams: int = ORIGIN_STREAMS) -> int:
    """This node's origin streams for home pieces when ``members`` nodes (itself included) share."""
    return max(1, streams // max(1, members))


class Gate:
    """A counting gate whose size is asked for at every entry and exit (membership changes mid-pull);
    waiters go in lowest priority first, then first come."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self._inside = 0
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    @property
    def inside(self) -> int:
        """Holders now."""
        return self._inside

    @asynccontextmanager
    async def turn(self, priority: int = 0) -> AsyncIterator[None]:
        """Hold a place for the body of the ``async with``."""
        await self._enter(priority)
        try:
            yield
        finally:
            self._leave()

    async def _enter(self, priority: int) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (priority, next(self._seq), waiter))
        self._wake()
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._leave()  # let in, but cancelled before it could go on: give the place back
            else:
                waiter.cancel()  # left in the heap, skipped when its turn comes
            raise

    def _leave(self) -> None:
        """Go out, letting waiters in while there is room (synchronous: safe in any ``finally``)."""
        self._inside -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiting and self._inside < max(1, self._limit()):
            _, _, waiter = heapq.heappop(self._waiting)
            if not waiter.done():
                self._inside += 1
                waiter.set_result(None)
