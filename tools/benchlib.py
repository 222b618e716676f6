"""Shared pieces of the benchmarks in tools/: timing commands, ceilings, reports.

Each benchmark measures side by side in one run (these machines are shared
and noisy): ours, the peer tool a user would otherwise run, and the ceiling
of this machine (each resource alone), alternating and taking medians.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

GiB = 1 << 30
MiB = 1 << 20
# Our CLI timed as a pip install leaves it, byte-compiled: where the environment sets
# PYTHONDONTWRITEBYTECODE (as these machines do), every run would compile modelcache from
# source, 0.1-0.2 s that no installed copy pays. The cache goes under /tmp, not the checkout.
PYTHON_ENV = {"PYTHONDONTWRITEBYTECODE": "",
              "PYTHONPYCACHEPREFIX": os.path.join(tempfile.gettempdir(), "modelcache-bench-pycache")}


@dataclass
class Timing:
    """Seconds and peak RSS (bytes) of each run of one contender."""

    name: str
    seconds: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def run_timed(cmd: Sequence[str], *, env: dict | None = None, sync: bool = True,
              cpu: list[float] | None = None) -> tuple[float, int, str]:
    """Run a command as a user would, plus ``sync``; return (seconds, its peak RSS in bytes, stdout).

    Python commands run byte-compiled (:data:`PYTHON_ENV`). ``cpu``: its CPU seconds (user and system,
    its children included) are appended there.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, env={**os.environ, **PYTHON_ENV, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if cpu is not None:
            cpu.append(usage.ru_utime + usage.ru_stime)
        if sync:
            os.sync()
        elapsed = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise SystemExit(f"{cmd[0]} failed ({proc.returncode}):\n{err.read().decode(errors='replace')[-2000:]}")
        return elapsed, usage.ru_maxrss * 1024, out.read().decode()


def process_cpu(pid: int) -> float:
    """CPU seconds (user and system) a running process has used so far (Linux: /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_registry(root: Path) -> tuple[subprocess.Popen, str]:
    """A docker-registry on loopback with storage under ``root``."""
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yml").write_text(
        f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n")
    proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("docker-registry did not start")


def make_weights(directory: Path, total: int, files: int) -> list[Path]:
    """``files`` random files summing to ``total`` bytes (incompressible, like weights)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    per = total // files
    for n in range(files):
        path = directory / f"model-{n + 1:05d}-of-{files:05d}.safetensors"
        if not path.exists() or path.stat().st_size != per:
            with open(path, "wb") as f:
                left = per
                while left:
                    block = os.urandom(min(left, 8 * MiB))
                    f.write(block)
                    left -= len(block)
        paths.append(path)
    return paths


def ceiling_http_get(urls: Sequence[str], *, ranges: Sequence[str | None] = (None,)) -> float:
    """Seconds for parallel curl GETs of every URL into /dev/null (one process each).

    With ``ranges`` (``"0-1023"``, …), every URL is asked once per range, all at once.
    """
    started = time.perf_counter()
    procs = [subprocess.Popen(["curl", "-sfL", "-o", "/dev/null", *(["-r", r] if r else []), u])
             for u in urls for r in ranges]
    for p in procs:
        if p.wait():
            raise SystemExit("curl failed on the ceiling run")
    return time.perf_counter() - started


def ceiling_disk_write(directory: Path, total: int, streams: int = 8) -> float:
    """Seconds for ``streams`` parallel dd writers of ``total`` bytes in all, each fsync'd.

    Parallel, because one dd stream understates what the disk takes from
    several writers at once (and a pull writes several files at once).
    """
    count = max(1, total // streams // (4 * MiB))
    paths = [directory / f"dd-{n}.out" for n in range(streams)]
    started = time.perf_counter()
    procs = [subprocess.Popen(["dd", "if=/dev/zero", f"of={p}", "bs=4M", f"count={count}", "conv=fsync"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for p in paths]
    if any(p.wait() for p in procs):
        raise SystemExit("dd failed on the ceiling run")
    elapsed = time.perf_counter() - started
    for p in paths:
        p.unlink()
    return elapsed


def ceiling_sha256(paths: Sequence[Path]) -> float:
    """Seconds to sha256 the files with hashlib on as many threads as cores."""
    def one(path: Path) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(8 * MiB):
                h.update(block)
        return h.hexdigest()

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        list(pool.map(one, paths))
    return time.perf_counter() - started


def rmtree(path: Path) -> None:
    """Remove a tree even where modelcache made it read-only."""
    if path.exists():
        subprocess.run(["chmod", "-R", "u+w", str(path)], check=False)
        shutil.rmtree(path)


def record(kind: str, **fields: object) -> None:
    """Append one JSON result to ``$MODELCACHE_BENCH_JSON`` when set (tools/bench_report.py reads it)."""
    path = os.environ.get("MODELCACHE_BENCH_JSON")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"kind": kind, **fields}) + "\n")


def report(title: str, total: int, ours: Timing, peers: Sequence[Timing], ceilings: dict[str, Timing]) -> None:
    """Print medians, rates and the ratios the closing notes quote (and record them)."""
    ceiling_of = max(ceilings.values(), key=lambda t: t.median)
    record("comparison", title=title, bytes=total, runs=len(ours.seconds),
           ours={"name": ours.name, "median": ours.median, "rss": max(ours.rss, default=0)},
           peers=[{"name": p.name, "median": p.median, "rss": max(p.rss, default=0)} for p in peers],
           ceilings={k: {"name": t.name, "median": t.median} for k, t in ceilings.items()},
           ceiling=ceiling_of.name)
    gb = total / 1e9
    print(f"\n== {title}: {total / GiB:.2f} GiB, medians of {len(ours.seconds)} runs ==")
    rows = [ours, *peers, *ceilings.values()]
    for t in rows:
        rss = f"  peak RSS {max(t.rss) / MiB:6.0f} MiB" if t.rss else ""
        print(f"  {t.name:<34} {t.median:7.2f} s  {gb / t.median:6.2f} GB/s{rss}")
    ceiling = max(ceilings.values(), key=lambda t: t.median)
    print(f"  ceiling = slowest resource alone: {ceiling.name} ({gb / ceiling.median:.2f} GB/s)")
    print(f"  ours / ceiling (throughput)       {ceiling.median / ours.median:6.2f}")
    for p in peers:
        print(f"  {p.name} time / ours time{' ' * max(0, 14 - len(p.name))}  {p.median / ours.median:6.2f}x")
    sys.stdout.flush()


class CountingProxy:
    """A TCP proxy on loopback that counts the bytes the upstream sends back.

    Benchmarks put it between a client and a server to learn how many bytes
    really crossed the wire (a killed pull cannot report what it received).
    """

    def __init__(self, upstream: str) -> None:
        import threading

        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self.downstream_bytes = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> int:
        """Return the count so far and start again from zero."""
        with self._lock:
            count, self.downstream_bytes = self.downstream_bytes, 0
        return count

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        import threading

        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._upstream)
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        buf = bytearray(1 << 20)
        try:
            while n := src.recv_into(buf):
                dst.sendall(memoryview(buf)[:n])
                if count:
                    with self._lock:
                        self.downstream_bytes += n
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
