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
Rendezvous hashing gives homes uneven shares (in the namespace test 10 to
15 of 48 pieces), and the home with the most finishes last while its peers
wait on its last pieces. So while a node fetches home pieces ahead, its
share follows its part of the work: ``ORIGIN_STREAMS`` times the fraction of
those blobs' pieces it is home for, rounded (15 of 48: 3 streams, 10 of 48: 2).
The gate holds only the origin read itself. Before it, a home piece asks
the piece's other candidates whether they hold it (after a membership
change an earlier home may): on links full of bulk transfers such a small
request can take a second, so the next pieces ask while the current ones
are read, :data:`LOOKAHEAD` per origin stream (a second gate, the engine's ``pace``).
A piece a peer is waiting on goes in next (:meth:`Gate.hurry`: its home
waited half its wait for it to start), ahead of every other waiter but
within the limit: let in over the limit, as it once was, several waited-on
pieces at once opened a burst of streams on one node, each crawling at 1 to
1.5 MB/s beside its peers' bytes for seconds, while the peers waited on
them (issue 11's namespace test). The requester keeps asking meanwhile (its
patient ask), so it never gives up on its home for the origin.
Waiters go in by priority (a piece's position among the node's home pieces
of its blob), then by arrival, so with several blobs the homes fetch the
``k``-th piece of each before the ``k+1``-th, as requesters walk them.

Shares follow piece counts, not rates: a home whose origin streams crawl
(its download link full of peers' bytes) falls behind while the others
finish their home pieces and leave the origin's link half idle (issue 11's
namespace test: the last home fetched alone for 1.5 to 2 s). So a node whose
home pieces have all started and that has an origin stream to spare
(:meth:`Gate.spare`: fewer than its share plus :data:`SPARE` busy, so its
last pieces need not end first), if it was home for no more than an even
part of the pieces (:meth:`Gate.light`: a home with more has more to upload
to its peers, the other end of its load), says so when it asks a home for a piece, and a home
whose piece still queues here gives it away (:meth:`Gate.give`: the waiting
fetch ends with :class:`Given` and goes back to the engine's queue, to be
had from the taker): the home elects the taker to fetch it, which counts it
as borrowed (:meth:`Gate.borrow`) until its origin read ends.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

from ..errors import NotFound
from ..model import Blob
from ..sources.base import ByteSource

Tag = tuple[str, int]  # (blob digest, piece index)
_URGENT = 10_000  # hurried pieces remembered at most
_FIRST = -1  # the priority of a hurried piece: before any position
ORIGIN_STREAMS = 8  # the cluster's origin streams for home pieces: one node's default --concurrency
LOOKAHEAD = 2  # home pieces under way per origin stream: the next asks its other candidates meanwhile
BORROW_SECONDS = 5.0  # a piece given to us counts against our spare streams this long at most before its read
SPARE = 1  # streams a node whose home pieces have all started may open beyond its share, for pieces homes give it


class Given(NotFound):
    """This home piece's home gave it to a peer with an origin stream to spare: had from that peer instead."""


@dataclass
class _Plan:
    left: int  # pieces still to pass
    total: int  # the blob's pieces
    positions: dict[int, int]  # piece index -> its place among ours
    length: int  # the blob's piece length


def share(members: int, streams: int = ORIGIN_STREAMS) -> int:
    """This node's origin streams for home pieces when ``members`` nodes (itself included) share."""
    return max(1, streams // max(1, members))


class Gate:
    """A counting gate whose size is asked for at every entry and exit (membership changes mid-pull);
    waiters go in lowest priority first, then first come."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self._default = limit
        self._inside = 0
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._work: dict[str, _Plan] = {}  # blob -> its home pieces fetched ahead
        self._tagged: dict[Tag, asyncio.Future[None]] = {}  # waiters by piece
        self._urgent: set[Tag] = set()  # pieces a peer waits on: they go in next
        self._borrowed: dict[Tag, float] = {}  # pieces homes gave us to fetch -> when (until their read ends)
        self._mine = self._total = 0  # pieces we are home for, of all the pieces of the blobs planned since idle

    def plan(self, key: str, pieces: list[int], total: int, length: int) -> None:
        """``pieces`` (indexes) of the ``total`` of blob ``key``, ``length`` bytes each, are fetched ahead, each to
        :meth:`passed` once: until they have, the limit follows our part of the work (module docstring)."""
        if not self._work:  # a new pull (or pulls) after a quiet spell: its share alone counts
            self._mine = self._total = 0
        if pieces and total > 0:
            self._work[key] = _Plan(left=len(pieces), total=total, positions={i: n for n, i in enumerate(pieces)},
                                    length=length)
        self._mine += len(pieces)
        self._total += total

    def tag(self, key: str, offset: int) -> Tag | None:
        """The piece of blob ``key`` holding byte ``offset``, if it is one fetched ahead."""
        plan = self._work.get(key)
        if plan is None or offset // plan.length not in plan.positions:
            return None
        return key, offset // plan.length

    def hurry(self, tag: Tag) -> None:
        """A peer waits on this piece: it goes in next, before every other waiter (also if it comes later)."""
        if len(self._urgent) >= _URGENT:
            self._urgent.clear()
        self._urgent.add(tag)
        waiter = self._tagged.get(tag)
        if waiter is not None and not waiter.done():
            # Queued again, first: its earlier entry is skipped once it is let in.
            heapq.heappush(self._waiting, (_FIRST, next(self._seq), waiter))
            self._wake()

    def give(self, tag: Tag) -> bool:
        """Give up piece ``tag`` if it still waits here (its fetch ends with :class:`Given`); whether it did."""
        waiter = self._tagged.get(tag)
        if waiter is None or waiter.done():
            return False
        waiter.set_exception(Given(f"piece {tag[1]} of {tag[0][:19]} given to a peer"))
        return True

    def waiting(self) -> bool:
        """Whether any fetch waits for its turn here."""
        return any(not waiter.done() for _, _, waiter in self._waiting)

    def borrow(self, tag: Tag, now: float) -> None:
        """A home gave us piece ``tag`` to fetch from the origin: it takes a stream until :meth:`returned`."""
        self._borrowed[tag] = now

    def borrowed(self, tag: Tag) -> bool:
        """Whether piece ``tag`` was given to us to fetch."""
        return tag in self._borrowed

    def returned(self, tag: Tag) -> None:
        """The origin read of a borrowed piece ended."""
        self._borrowed.pop(tag, None)

    def light(self, members: int) -> bool:
        """Whether our part of the pieces planned so far is at most an even one among ``members`` nodes: a home
        with more has more to serve to its peers, and takes no more pieces from the others."""
        return self._mine * members <= self._total

    def busy(self) -> bool:
        """Whether pieces of ours (home pieces, or pieces homes gave us) are being read from the origin."""
        return self._inside > 0 or bool(self._borrowed)

    def spare(self, now: float) -> bool:
        """Every home piece of ours has started, and fewer than our share plus SPARE origin streams are busy
        (pieces homes gave us included): one more may be given to us."""
        for tag, at in list(self._borrowed.items()):
            if now - at > BORROW_SECONDS:
                del self._borrowed[tag]  # given, but never read (another source had it): no longer ours
        return not self.waiting() and self._inside + len(self._borrowed) < self._limit() + SPARE

    def position(self, key: str, index: int) -> int | None:
        """Piece ``index`` of blob ``key``'s place among the pieces fetched ahead, if it is one."""
        plan = self._work.get(key)
        return plan.positions.get(index) if plan is not None else None

    def passed(self, key: str) -> None:
        """One planned piece of blob ``key`` passed (from the origin or a peer, or given up)."""
        plan = self._work.get(key)
        if plan is not None:
            plan.left -= 1
            if plan.left <= 0:
                del self._work[key]
                self._wake()

    def limit(self) -> int:
        """How many may be inside now."""
        return self._limit()

    def _limit(self) -> int:
        if not self._work:
            return self._default()
        mine = sum(len(w.positions) for w in self._work.values())
        total = sum(w.total for w in self._work.values())
        return max(1, int(ORIGIN_STREAMS * mine / total + 0.5))

    @property
    def inside(self) -> int:
        """Holders now."""
        return self._inside

    @asynccontextmanager
    async def turn(self, priority: int = 0, tag: Tag | None = None) -> AsyncIterator[None]:
        """Hold a place for the body of the ``async with`` (for piece ``tag``, which :meth:`hurry` may name)."""
        await self._enter(priority, tag)
        try:
            yield
        finally:
            if tag is not None:
                self._urgent.discard(tag)
            self._leave()

    async def _enter(self, priority: int, tag: Tag | None) -> None:
        if tag is not None and tag in self._urgent:
            priority = _FIRST
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (priority, next(self._seq), waiter))
        if tag is not None:
            self._tagged[tag] = waiter
        self._wake()
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._leave()  # let in, but cancelled before it could go on: give the place back
            else:
                waiter.cancel()  # left in the heap, skipped when its turn comes
            raise
        finally:
            if tag is not None and self._tagged.get(tag) is waiter:
                del self._tagged[tag]

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


class GatedOrigin:
    """The origin as a byte source whose reads pass ``gated(blob, offset)`` (a place in the gate, or none)."""

    def __init__(self, origin: ByteSource, gated: Callable[[Blob, int], AbstractAsyncContextManager[None]]) -> None:
        self.name = origin.name
        self._origin, self._gated = origin, gated
        for attr in ("trusted", "attempts"):
            if hasattr(origin, attr):
                setattr(self, attr, getattr(origin, attr))

    async def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes | memoryview]:
        """The range from the origin, inside its place in the gate (left before the last bytes are handed
        on: a reader that stops at the range's end never resumes us, and the place must not wait for our
        finalizer)."""
        place = self._gated(blob, offset)
        await place.__aenter__()
        inside = True
        try:
            got = 0
            async for block in self._origin.read(blob, offset, length):
                got += len(block)
                if got >= length and inside:
                    inside = False
                    await place.__aexit__(None, None, None)
                yield block
        finally:
            if inside:
                await place.__aexit__(None, None, None)
