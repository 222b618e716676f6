"""Showing transfer progress: a bar on a terminal, periodic lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .transfer import TransferStats

LINE_INTERVAL = 2.0


def human(n: float) -> str:
    """Bytes as a short human string (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class ProgressReporter:
    """A transfer progress callback that draws on ``stream``.

    On a TTY it drives a rich progress bar; elsewhere (logs, CI) it prints a
    line every couple of seconds. Call :meth:`close` when the transfer ends.
    """

    def __init__(self, label: str, stream: TextIO | None = None, *, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.label = label
        self.quiet = quiet
        self.started = time.monotonic()
        self._last_line = 0.0
        self._bar = None
        self._task = None
        if not quiet and self.stream.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                TransferSpeedColumn(), TimeRemainingColumn(),
                console=Console(file=self.stream), transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(label, total=None)

    def __call__(self, stats: TransferStats) -> None:
        if self.quiet:
            return
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, total=stats.bytes_total or None, completed=stats.bytes_done)
            return
        now = time.monotonic()
        if now - self._last_line >= LINE_INTERVAL:
            self._last_line = now
            self._line(stats, now)

    def _line(self, stats: TransferStats, now: float) -> None:
        rate = stats.bytes_fetched / max(now - self.started, 1e-6)
        pct = 100.0 * stats.bytes_done / stats.bytes_total if stats.bytes_total else 100.0
        print(f"{self.label}: {human(stats.bytes_done)} / {human(stats.bytes_total)} ({pct:.0f}%), "
              f"{human(rate)}/s", file=self.stream, flush=True)

    def close(self) -> None:
        """Stop the bar."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
