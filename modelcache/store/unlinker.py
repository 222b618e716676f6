"""Unlinking, in the background, the bytes of blobs a pull no longer needs (the layers it unpacked).

Why: on a disk mounted with online discard (this project's VMs; many
nodes), unlinking a big file waits for its blocks to be discarded: 80 ms per
256 MiB, measured. A pull's layers tend to end together, and a 1 GiB pull
of gzip layers spent its last 0.3-0.5 s unlinking them, one after another.

Guarantees:

- :meth:`Unlinker.add` returns at once; a thread of its own unlinks the
  files in the order added, as they come, so the disk gets the space back
  as soon as each layer is done with (a pull of many layers never holds
  more of them than it did before), only not in the pull's own thread. The
  thread ends when nothing waits.
- :meth:`Unlinker.finish` unlinks what still waits, in the caller's thread,
  and waits for the one being unlinked: when it returns, every file added
  before is gone.
- :meth:`Unlinker.hand_off` gives what still waits to an ``rm`` of its own,
  which goes on after this process has exited (a command about to end);
  where no ``rm`` can start, it is :meth:`finish`.
- A file that cannot be unlinked (other than one already gone) is logged
  and left, and the rest still go: it is named for this process, and gc
  removes it once the process is gone.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from pathlib import Path

log = logging.getLogger(__name__)


class Unlinker:
    """Files to unlink, and the thread unlinking them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: deque[Path] = deque()
        self._running = False  # a thread is unlinking (or about to)
        self._busy: Path | None = None  # the file it unlinks now

    def add(self, path: Path) -> None:
        """Unlink ``path`` soon, in the background."""
        with self._cond:
            self._waiting.append(path)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="mc-unlink", daemon=True).start()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._waiting:
                    self._running = False
                    return
                self._busy = path = self._waiting.popleft()
            try:
                _unlink(path)
            finally:
                with self._cond:
                    self._busy = None
                    self._cond.notify_all()

    def _take(self) -> list[Path]:
        with self._cond:
            paths = list(self._waiting)
            self._waiting.clear()
            return paths

    def finish(self) -> None:
        """Unlink what still waits, here, and wait for the one being unlinked."""
        for path in self._take():
            _unlink(path)
        with self._cond:
            while self._busy is not None:
                self._cond.wait()

    def hand_off(self) -> None:
        """Give what still waits to an ``rm`` that outlives this process (here, where none can start)."""
        paths = self._take()
        if not paths:
            return
        import subprocess

        try:
            subprocess.Popen(["rm", "-f", "--", *map(str, paths)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            return
        except OSError:  # no rm here (or too many paths for one command line): unlink them ourselves
            pass
        for path in paths:
            _unlink(path)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not unlink %s (gc removes it once this process is gone): %s", path, e)
