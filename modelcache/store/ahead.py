"""Bytes written ahead of a blob's running hash, held in memory (bounded) until the hash reaches them.

Why: a blob fetched by two or more streams gets bytes ahead of where its
sha256 stands. Read back later, they must stay in the page cache, and a
buffered write plus the read back cost more CPU than the hash itself on a
2-core node. Held here instead (the receive buffers themselves, no copy),
they are written past the page cache at once (:mod:`.direct`) and hashed
from memory when their turn comes.

Guarantees: at most ``limit`` bytes are held (a write that would go over is
not held: it is read back as before); a buffer is held by reference, so the
reader that filled it must not reuse it while referenced (the lean HTTP
reader recycles a buffer only once nothing else refers to it). Not
thread-safe: the ingest calls it under its hash lock.
"""

from __future__ import annotations

LIMIT = 32 << 20  # per blob: two streams on one blob stay within a 16 MiB chunk of each other


class Ahead:
    """Buffers by blob offset, not yet hashed."""

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self.held = 0  # bytes held or reserved
        self._by_offset: dict[int, list[memoryview]] = {}

    def reserve(self, n: int) -> bool:
        """Make room for ``n`` bytes about to be written; False (nothing reserved) when over the limit."""
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def release(self, n: int) -> None:
        """Give back a reservation that was never :meth:`put` (the write failed)."""
        self.held -= n

    def put(self, offset: int, buffers: list[memoryview]) -> None:
        """Hold ``buffers`` (reserved before), written at ``offset``."""
        self._by_offset[offset] = buffers

    def take(self, offset: int, limit: int) -> list[memoryview] | None:
        """The buffers held at ``offset``, at most ``limit`` bytes of them (the rest stays held), or None."""
        buffers = self._by_offset.pop(offset, None)
        if buffers is None:
            return None
        out: list[memoryview] = []
        taken = 0
        for i, buf in enumerate(buffers):
            if taken + len(buf) > limit:
                head = limit - taken
                if head:
                    out.append(buf[:head])
                rest = [buf[head:], *buffers[i + 1:]]
                self._by_offset[offset + limit] = rest
                taken = limit
                break
            out.append(buf)
            taken += len(buf)
        self.held -= taken
        return out

    def next_after(self, offset: int) -> int | None:
        """The lowest offset held past ``offset`` (a read back must stop there), or None."""
        return min((o for o in self._by_offset if o > offset), default=None)

    def drop(self, start: int, end: int) -> None:
        """Forget what is held at offsets in ``[start, end)`` (those bytes are written again)."""
        for offset in [o for o in self._by_offset if start <= o < end]:
            self.held -= sum(len(b) for b in self._by_offset.pop(offset))

    def clear(self) -> None:
        """Forget everything held."""
        self._by_offset.clear()
        self.held = 0
