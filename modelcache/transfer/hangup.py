"""Hanging up a reader mid-body, so that an interrupted transfer keeps what its buffers hold.

The lean reader (:mod:`modelcache.sources.rawget`) fills 4 MiB buffers in
threads, one ahead of the piece the engine is writing. When the engine is
cancelled while it waits on its own write, the reader is not the one
cancelled, and the bytes in the buffer being filled would be dropped with
it. So the engine sets :data:`HANGUP` for the task that reads a range; the
reader registers how to drop its connection for as long as its body is
being read. On a cancel the engine calls :meth:`Hangup.now`: the fill in the
thread returns at once with the bytes it has, the reader yields them and
ends with an error, and the engine writes and keeps them (issue 10).
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar


class Hangup:
    """The ways to drop the connections a task is reading a body from."""

    __slots__ = ("_calls",)

    def __init__(self) -> None:
        self._calls: set[Callable[[], None]] = set()

    def add(self, call: Callable[[], None]) -> None:
        """``call()`` drops a connection whose body is being read (event loop thread)."""
        self._calls.add(call)

    def discard(self, call: Callable[[], None]) -> None:
        """That body is over."""
        self._calls.discard(call)

    def armed(self) -> bool:
        """True while a body registered here is being read."""
        return bool(self._calls)

    def now(self) -> None:
        """Drop every registered connection: their readers hand over what they hold, then fail."""
        for call in list(self._calls):
            call()


HANGUP: ContextVar[Hangup | None] = ContextVar("modelcache_hangup", default=None)
