"""Progress a person can trust: live bytes, a windowed speed, an ETA, lines on a timer, one unit system."""

from __future__ import annotations

import io
import os
import re
import time

from faultproxy import FaultProxy
from support import MP_ARTIFACT, MP_CONFIG, MP_WEIGHT, run_cli

from modelcache.progress import Gauge, ProgressReporter, duration, human
from modelcache.transfer import TransferStats

MiB = 1 << 20


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_speed_is_over_a_moving_window_and_the_eta_follows_it() -> None:
    """20 s at 1 MiB/s then 10 s at 4 MiB/s: the speed says 4 MiB/s, not the 2 MiB/s average."""
    gauge = Gauge(window=8.0)
    t, done = 0.0, 0
    total = 200 * MiB
    for second in range(30):
        done += (1 if second < 20 else 4) * MiB
        t += 1.0
        gauge.sample(t, done, done, total)
    assert abs(gauge.speed() - 4 * MiB) < 1
    eta = gauge.eta()
    assert eta is not None and abs(eta - (total - done) / (4 * MiB)) < 0.01
    assert "4.0 MiB/s" in gauge.line() and f"ETA {duration((total - done) / (4 * MiB))}" in gauge.line()


def test_eta_unknown_before_a_speed_and_zero_when_done() -> None:
    gauge = Gauge()
    gauge.sample(0.0, 0, 0, 10 * MiB)
    assert gauge.eta() is None and "ETA ?" in gauge.line()
    gauge.sample(1.0, 10 * MiB, 10 * MiB, 10 * MiB)
    assert gauge.eta() == 0.0


def test_lines_come_every_interval_without_callbacks() -> None:
    """One callback, then only the timer: a line every 2 s, each with the live bytes and an ETA."""
    clock, out = FakeClock(), io.StringIO()
    reporter = ProgressReporter("pull x", out, clock=clock, timer=False)
    stats = TransferStats(bytes_total=64 * MiB)
    reporter(stats)
    cell = stats.receiving.open()  # a reader thread filling a 4 MiB buffer: bytes seen before it is handed over
    for step in range(21):  # 10 s of 0.5 s ticks
        cell.n = min(step * MiB // 2, 4 * MiB - 1)
        reporter.tick()
        clock.now += 0.5
    lines = out.getvalue().splitlines()
    assert len(lines) == 5, lines  # at 2, 4, 6, 8 and 10 s
    assert all("ETA" in line and "MiB" in line for line in lines)
    assert lines[0].startswith("pull x: 2.0 MiB / 64.0 MiB (3%), 1.0 MiB/s, ETA 1m02s"), lines[0]
    stats.receiving.close(cell)
    stats.bytes_done = stats.bytes_fetched = 4 * MiB  # handed over: counted once, by the engine
    reporter.tick()
    assert reporter.gauge.done == 4 * MiB


def test_the_timer_thread_prints_lines_on_its_own() -> None:
    out = io.StringIO()
    reporter = ProgressReporter("pull y", out, interval=0.1)
    reporter(TransferStats(bytes_total=MiB))
    deadline = time.monotonic() + 10
    while out.getvalue().count("\n") < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    reporter.close()
    assert out.getvalue().count("\n") >= 3, out.getvalue()


def test_binary_units_throughout() -> None:
    assert human(2 * MiB) == "2.0 MiB" and human(1536) == "1.5 KiB" and human(3 << 30) == "3.0 GiB"
    assert duration(125) == "2m05s" and duration(3725) == "1h02m" and duration(9) == "9s"


_LINE = re.compile(r": ([\d.]+) (B|KiB|MiB|GiB) / ([\d.]+) (B|KiB|MiB|GiB) \(\d+%\), [\d.]+ \S+/s, ETA (\S+)")
_UNIT = {"B": 1, "KiB": 1 << 10, "MiB": MiB, "GiB": 1 << 30}


def test_slow_pull_reports_bytes_before_the_first_4_mib_buffer(registry, tmp_path) -> None:
    """At 1 MiB/s a 6 MiB blob (one chunk) shows bytes and an ETA every 2 s, not 0 until 4 MiB."""
    data = os.urandom(6 * MiB)
    registry.push_image("progress/slow", "v1", [(data, MP_WEIGHT, {"org.cncf.model.filepath": "w.bin"})],
                        config=b"{}", config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)
    with FaultProxy(registry.host, rate=1 * MiB) as proxy:
        proc = run_cli("pull", "--concurrency", "1", f"oci://{proxy.host}/progress/slow:v1", store=tmp_path / "s",
                       timeout=60)
    assert proc.returncode == 0, proc.stderr
    seen = [(float(m[1]) * _UNIT[m[2]], m[5]) for m in _LINE.finditer(proc.stderr)]
    assert len(seen) >= 2, proc.stderr
    early = [done for done, _eta in seen if 0 < done < 4 * MiB]
    assert early, proc.stderr  # bytes were shown before the first 4 MiB buffer was handed over
    assert any(eta not in ("?", "0s") for _done, eta in seen), proc.stderr
