"""Pieces in progress, relayed: a home streams a piece to the peers waiting on it while the origin sends it.

Without it a requester that asks a piece's home for a piece in flight waits
until the piece is whole and durable, then downloads it: every piece costs
its origin time plus its peer time, and the last pieces of the origin phase
reach peers only after it (issue 11). With it, the bytes of a piece this
node fetches from the origin as its home are kept in memory as they arrive
(:class:`RelayedOrigin`), and the peer server streams them to the requesters
as they come (:meth:`LivePiece.read`), so a piece reaches its peers about
when it reaches its home.

What is relayed, and for how long:

- only whole pieces read from their first byte, of blobs peers may serve
  (``Blob.origin_checked``), that this node is home for while it has live
  peers: a node alone relays nothing;
- at most :data:`BUDGET` bytes at once across pieces (beyond it a piece is
  served once durable, as before);
- a piece stays for :data:`KEEP` seconds after its last byte arrived (by
  then it is durable and served from the store), and is dropped at once if
  its read fails (the engine retries from the byte reached, unrelayed; a
  requester streaming it sees its connection closed and moves on);
- the origin's reader hands its bytes over in blocks of :data:`BLOCK` at
  most (its own are 4 MiB: a 4 MiB piece would reach peers after its last
  byte), and a read that crawls beside the other pieces arriving (a starved
  TCP flow) is asked again from the byte reached (:meth:`Relay.lagging`),
  the piece staying live for its readers meanwhile.

The bytes are not checked before they are relayed: a requester checks them
as it checks any peer's bytes (per piece when it knows a digest list, else
at commit), so relaying changes when bytes arrive, never whether they are trusted.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import AsyncIterator, Callable
from contextvars import Token

from ..model import Blob
from ..sources.base import ByteSource
from ..sources.rawget import FILL

BUDGET = 256 << 20  # bytes of pieces in flight kept for peers at most, all pieces together
KEEP = 5.0  # seconds a whole piece stays after its last byte (it is durable by then)
WAIT = 60.0  # seconds a reader waits for the next bytes at most (the origin read stalls out before that)
BLOCK = 256 << 10  # bytes per hand-off from the origin's reader at most while a piece is relayed
SLOW_AFTER = 1.0  # seconds a relayed piece's origin read runs before its pace is judged
SLOW = 0.3  # a read at less than this part of the fastest other piece's pace is asked again...
RESTARTS = 2  # ...this many times at most
WORTH = 1 << 20  # bytes a piece must still have to come to be asked again (less: the restart costs more)

Key = tuple[str, int]  # (blob digest, piece start)


class Broken(Exception):
    """The origin read of a relayed piece failed: its bytes will not all come from here."""


class LivePiece:
    """One piece arriving from the origin: its bytes so far, and a wake-up for readers."""

    def __init__(self, start: int, length: int) -> None:
        self.start, self.length = start, length
        self.size = 0  # bytes arrived, from ``start``
        self.broken = False
        self._blocks: list[bytes] = []
        self._offsets: list[int] = []  # each block's offset from ``start``
        self._changed = asyncio.Event()
        # When the current origin read's first bytes came, and the bytes there were before them (None: none yet)
        self.began: float | None = None
        self.base = 0

    @property
    def whole(self) -> bool:
        """Every byte arrived."""
        return self.size >= self.length

    def add(self, block: bytes) -> None:
        """The next bytes arrived."""
        self._offsets.append(self.size)
        self._blocks.append(block)
        self.size += len(block)
        self._wake()

    def fail(self) -> None:
        """The read failed: wake the readers, which stop."""
        self.broken = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def arrived(self, offset: int, seconds: float) -> bool:
        """Wait up to ``seconds`` for the byte at blob offset ``offset``; whether it is here."""
        at = offset - self.start
        try:
            async with asyncio.timeout(seconds):
                while at >= self.size and not self.broken:
                    await self._changed.wait()
        except TimeoutError:
            return False
        return at < self.size

    async def read(self, offset: int, limit: int) -> bytes:
        """Up to ``limit`` bytes at blob offset ``offset`` (inside the piece), waiting until some arrived;
        raises :class:`Broken` if the read failed first, TimeoutError after :data:`WAIT` seconds of nothing."""
        at = offset - self.start
        while at >= self.size:
            if self.broken:
                raise Broken(f"piece at {self.start} broke off after {self.size} bytes")
            await asyncio.wait_for(self._changed.wait(), WAIT)
        n = bisect.bisect_right(self._offsets, at) - 1
        block, base = self._blocks[n], self._offsets[n]
        return block[at - base:at - base + limit]


class Relay:
    """This node's pieces in flight from the origin that peers may stream (one per node)."""

    def __init__(self, budget: int = BUDGET) -> None:
        self.budget = budget
        self._live: dict[Key, LivePiece] = {}
        self._opened = asyncio.Event()  # replaced at every open: a wake-up for :meth:`started`

    def held(self) -> int:
        """Bytes reserved by the pieces kept now."""
        return sum(p.length for p in self._live.values())

    def find(self, digest: str, offset: int) -> LivePiece | None:
        """The live piece of ``digest`` holding byte ``offset``, if one is relayed now."""
        for (d, _), piece in self._live.items():
            if d == digest and piece.start <= offset < piece.start + piece.length and not piece.broken:
                return piece
        return None

    async def started(self, digest: str, offset: int) -> LivePiece:
        """Wait until a piece of ``digest`` holding byte ``offset`` is relayed (the caller bounds the wait)."""
        while True:
            piece = self.find(digest, offset)
            if piece is not None:
                return piece
            await self._opened.wait()

    def lagging(self, piece: LivePiece, now: float) -> bool:
        """Whether ``piece``'s origin read, :data:`SLOW_AFTER` seconds after its first bytes and with
        :data:`WORTH` bytes still to come at least, goes at less than :data:`SLOW` of the pace of the fastest
        other piece arriving now (its TCP flow starved: ask again). Paces count from a read's first bytes: a
        read whose server or proxy held it before answering is not slow for that."""
        def pace(p: LivePiece, began: float) -> float:
            return (p.size - p.base) / max(now - began, 1e-3)

        if piece.began is None or now - piece.began < SLOW_AFTER or piece.length - piece.size < WORTH:
            return False
        others = [pace(p, p.began) for p in self._live.values() if p is not piece and not p.whole
                  and not p.broken and p.began is not None and now - p.began >= SLOW_AFTER / 2]
        return bool(others) and pace(piece, piece.began) < SLOW * max(others)

    def open(self, digest: str, start: int, length: int) -> LivePiece | None:
        """A new live piece, or None when the budget has no room (it is then served once durable)."""
        if (digest, start) in self._live or self.held() + length > self.budget:
            return None
        piece = self._live[(digest, start)] = LivePiece(start, length)
        self._opened.set()
        self._opened = asyncio.Event()
        return piece

    def close(self, digest: str, piece: LivePiece) -> None:
        """The piece's read ended: whole, kept :data:`KEEP` seconds; otherwise dropped now."""
        key = (digest, piece.start)
        if not piece.whole:
            piece.fail()
            self._drop(key, piece)
            return
        asyncio.get_running_loop().call_later(KEEP, self._drop, key, piece)

    def _drop(self, key: Key, piece: LivePiece) -> None:
        if self._live.get(key) is piece:
            del self._live[key]


class RelayedOrigin:
    """The origin as a byte source that relays the pieces ``relayed(blob, offset, length)`` picks."""

    def __init__(self, origin: ByteSource, relay: Relay, relayed: Callable[[Blob, int, int], bool]) -> None:
        self.name = origin.name
        self._origin, self._relay, self._relayed = origin, relay, relayed
        for attr in ("trusted", "attempts"):
            if hasattr(origin, attr):
                setattr(self, attr, getattr(origin, attr))

    async def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes | memoryview]:
        """The range from the origin; a relayed piece's bytes are kept for peers as they pass."""
        piece = self._relay.open(blob.digest, offset, length) if self._relayed(blob, offset, length) else None
        if piece is None:
            async for block in self._origin.read(blob, offset, length):
                yield block
            return
        loop = asyncio.get_running_loop()
        try:
            for again in range(RESTARTS + 1):
                piece.began = None
                # Small hand-offs from the origin's reader, so peers get the bytes as they come (it reads the
                # variable as its body starts: set for our first block only, in this task's context).
                token: Token[int] | None = FILL.set(BLOCK)
                reader = self._origin.read(blob, offset + piece.size, length - piece.size)
                lagging = False
                try:
                    async for block in reader:
                        if token is not None:
                            FILL.reset(token)
                            token = None
                        if piece.began is None:
                            piece.began, piece.base = loop.time(), piece.size
                        piece.add(bytes(block[:length - piece.size]))  # a copy: the reader may reuse its buffers
                        if piece.whole:
                            self._relay.close(blob.digest, piece)  # before the last yield: a reader may stop there
                        yield block
                        if again < RESTARTS and not piece.whole and self._relay.lagging(piece, loop.time()):
                            lagging = True  # a new request (a new connection) for the rest, from the byte reached
                            break
                finally:
                    if token is not None:
                        FILL.reset(token)
                    closing = getattr(reader, "aclose", None)
                    if closing is not None:
                        await closing()
                if not lagging:
                    return
        finally:
            if not piece.whole:
                self._relay.close(blob.digest, piece)
