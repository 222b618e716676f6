"""Bytes received but not yet handed over, for progress between a reader's large buffers.

The lean reader (:mod:`modelcache.sources.rawget`) fills 4 MiB buffers in
threads and hands each over whole, so the engine's own count
(``TransferStats.bytes_done``, exact and only of bytes it holds) moves in
4 MiB steps per stream; at 2 MB/s that is a step every two seconds or more.
A :class:`Meter` fills the gap for display only: each buffer being filled
has a :class:`Cell` whose count its one reader thread overwrites after
every ``recv`` (a plain store, no lock, no sum on the hot path), and the
cell is dropped on the event loop right before the buffer is handed over,
so a byte is counted by the meter or by the engine, not by both.

Who meters: the engine sets :data:`RECEIVING` in the task that reads a
range; the reader picks it up on the loop when it starts a fill.
"""

from __future__ import annotations

from contextvars import ContextVar


class Cell:
    """The bytes one buffer holds so far; written by one thread, read by any."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class Meter:
    """The cells of the buffers being filled for one transfer."""

    __slots__ = ("_cells",)

    def __init__(self) -> None:
        self._cells: set[Cell] = set()

    def open(self) -> Cell:
        """A cell for a buffer about to be filled (event loop thread)."""
        cell = Cell()
        self._cells.add(cell)
        return cell

    def close(self, cell: Cell | None) -> None:
        """The buffer is handed over (or given up): its bytes are no longer ours to show."""
        if cell is not None:
            self._cells.discard(cell)

    def pending(self) -> int:
        """Bytes received into buffers not yet handed over (from any thread)."""
        # tuple() of a set copies it in one C call under the GIL: safe against the loop adding a cell.
        return sum(c.n for c in tuple(self._cells))


RECEIVING: ContextVar[Meter | None] = ContextVar("modelcache_receiving", default=None)
