"""Running an iterator ahead of its reader, in a thread of its own, through a bounded queue.

Issue 13: a one-layer gzip image (a ``docker build`` with one COPY of the
weights) was unpacked by one thread doing everything in turn: inflate, then
the tar, the files' sha256 and their writes. Inflate cannot be split (a
deflate stream is one chain), but the rest can run beside it: :class:`Handoff`
takes the inflater's blocks in a thread of its own and hands them to the
reader, so each of the two cores carries one half. isal, zlib, zstandard,
hashlib and file writes all release the GIL on large buffers (measured: a
pure-Python thread keeps running during each of those calls).

Guarantees:

- items come out in the order the source gives them, each once;
- at most ``depth`` items wait in the queue (plus one the source is making
  and one the reader holds), so a source that can make far more than it is
  given (a few KiB of gzip that claim gigabytes) is held back by its reader;
- an error of the source is raised in the reader, after the items before it;
- :meth:`Handoff.close` (or leaving the ``with`` block) stops the source at
  its next item and waits for its thread to end: nothing of the source runs
  once ``close`` returns, so the reader may close what the source reads from.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_ITEM, _END, _ERROR = range(3)


class Handoff(Generic[T]):
    """``source`` iterated in a thread named ``name``, at most ``depth`` items ahead of this iterator."""

    def __init__(self, source: Iterable[T], *, depth: int, name: str) -> None:
        if depth < 1:
            raise ValueError("a hand-off holds at least one item")
        self._source = source
        self._queue: queue.Queue[tuple[int, object]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._source:
                if self._stop.is_set():
                    return
                self._queue.put((_ITEM, item))  # blocks while the queue is full: the bound
                if self._stop.is_set():  # close drained the queue to let that put through
                    return
        except BaseException as e:  # handed to the reader, raised there in order
            self._queue.put((_ERROR, e))
        else:
            self._queue.put((_END, None))
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:  # a generator source ends here, in its own thread
                close()

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == _ITEM:
            return value  # type: ignore[return-value]
        self._done = True
        if kind == _ERROR:
            assert isinstance(value, BaseException)
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the source and wait until its thread has ended (it ends at once unless the source is
        waiting for its own input; then as soon as that input comes or ends)."""
        self._stop.set()
        self._done = True
        while True:
            try:  # make room for a put the source may be blocked in
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(0.05)
            if not self._thread.is_alive():
                return

    def __enter__(self) -> Handoff[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
