"""Showing transfer progress: a bar on a terminal, a line every 2 s otherwise.

What is shown can be trusted:

- bytes count as they arrive (the readers' live count, :mod:`.transfer.meter`),
  not once per 4 MiB buffer;
- the speed is over the last :data:`WINDOW` seconds, not the average since
  the start, so it follows a link that slows down or speeds up, and the ETA
  (bytes left / that speed) with it;
- lines come from a timer, every :data:`LINE_INTERVAL` seconds whether or not
  a chunk completed; the bar is redrawn from the same timer;
- one unit system everywhere (bar, lines, summaries, README): binary (IEC)
  units, KiB/MiB/GiB = powers of 1024, as ``--chunk-size 16M`` means.

:class:`Gauge` is the arithmetic (no I/O, any clock), shared with the
daemon's progress log lines; :class:`ProgressReporter` draws it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:  # annotations only: showing progress loads no transfer engine (issue 13)
    from .transfer import TransferStats

LINE_INTERVAL = 2.0   # seconds between progress lines off a terminal
BAR_INTERVAL = 0.5    # seconds between bar redraws
WINDOW = 8.0          # seconds of history behind the current speed

Clock = Callable[[], float]


def human(n: float) -> str:
    """Bytes as a short human string (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def duration(seconds: float) -> str:
    """A duration as ``45s``, ``2m05s`` or ``1h02m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Gauge:
    """Current speed over a moving window, and the ETA it implies.

    Feed it :meth:`sample` (time, bytes done, bytes fetched) now and then;
    ``bytes done`` includes reused bytes (they count towards the total),
    ``bytes fetched`` only what came over the network (the speed).
    """

    def __init__(self, *, window: float = WINDOW) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()
        self.done = 0
        self.total = 0

    def sample(self, now: float, done: int, fetched: int, total: int) -> None:
        """Record where the transfer stands at ``now``."""
        self.done = max(self.done, done)  # the live count may lag the engine's for a moment: never go back
        self.total = total
        if self._samples and fetched < self._samples[-1][1]:
            fetched = self._samples[-1][1]
        self._samples.append((now, fetched))
        # Keep one sample at or before the window's start, so the span covers the whole window.
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()

    def speed(self) -> float:
        """Bytes per second over the window (0 until two samples are apart)."""
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def eta(self) -> float | None:
        """Seconds left at the current speed; None while the speed is unknown."""
        left = max(0, self.total - self.done)
        if not left:
            return 0.0
        speed = self.speed()
        return left / speed if speed > 0 else None

    def line(self) -> str:
        """``12.0 MiB / 256.0 MiB (5%), 2.0 MiB/s, ETA 2m02s``."""
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = self.eta()
        return (f"{human(self.done)} / {human(self.total)} ({pct:.0f}%), {human(self.speed())}/s, "
                f"ETA {duration(eta) if eta is not None else '?'}")

    def sample_stats(self, now: float, stats: TransferStats) -> None:
        """:meth:`sample` from a transfer's stats, bytes still being received included."""
        done, fetched = stats.bytes_seen()
        self.sample(now, done, fetched, stats.bytes_total)


class ProgressReporter:
    """A transfer progress callback that draws on ``stream``.

    The callback only records the latest stats; a timer thread samples and
    draws them (a rich bar on a TTY, a line every :data:`LINE_INTERVAL`
    seconds elsewhere), so output keeps coming while no chunk completes.
    Call :meth:`close` when the transfer ends. ``clock`` and ``timer=False``
    let tests drive :meth:`tick` by hand.
    """

    def __init__(self, label: str, stream: TextIO | None = None, *, quiet: bool = False,
                 clock: Clock = time.monotonic, timer: bool = True, interval: float = LINE_INTERVAL) -> None:
        self.stream = stream or sys.stderr
        self.label = label
        self.quiet = quiet
        self.interval = interval
        self.gauge = Gauge()
        self._clock = clock
        self._stats: TransferStats | None = None
        self._last_line: float | None = None
        self._lock = threading.Lock()
        self._bar = None
        self._task = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if quiet:
            return
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

            self._bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                TextColumn("{task.fields[speed]}"), TextColumn("ETA {task.fields[eta]}"),
                console=Console(file=self.stream), transient=False, auto_refresh=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(label, total=None, speed="", eta="?")
        if timer:
            every = BAR_INTERVAL if self._bar is not None else min(BAR_INTERVAL, interval)
            self._thread = threading.Thread(target=self._run, args=(every,), name="mc-progress", daemon=True)
            self._thread.start()

    def __call__(self, stats: TransferStats) -> None:
        if self.quiet:
            return
        if self._stats is None:  # the speed's first sample: where the transfer started
            with self._lock:
                self.gauge.sample_stats(self._clock(), stats)
        self._stats = stats

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.tick()

    def tick(self) -> None:
        """Sample the latest stats; redraw the bar, or print a line if one is due."""
        stats = self._stats
        if stats is None or self.quiet:
            return
        with self._lock:
            now = self._clock()
            self.gauge.sample_stats(now, stats)
            if self._bar is not None and self._task is not None:
                eta = self.gauge.eta()
                self._bar.update(self._task, total=stats.bytes_total or None, completed=self.gauge.done,
                                 speed=f"{human(self.gauge.speed())}/s",
                                 eta=duration(eta) if eta is not None else "?")
                self._bar.refresh()
                return
            if self._last_line is None:
                self._last_line = now  # the first line after one interval, with a speed to show
            elif now - self._last_line >= self.interval - 1e-9:
                self._last_line = now
                print(f"{self.label}: {self.gauge.line()}", file=self.stream, flush=True)

    def close(self) -> None:
        """Stop the timer and the bar (drawn once more, as it ended)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._bar is not None:
            self.tick()
            self._bar.stop()
            self._bar = None
