#!/usr/bin/env python3
"""Benchmark sweeps: pull throughput against concurrency and chunk size, and resume waste.

One command::

    python tools/bench_sweep.py               # 1 GiB in 8 files, 2 runs per point

It starts a docker-registry on loopback holding a ModelPack artifact of random
weights, then measures cold pulls (empty store, ``sync`` included):

- throughput against ``--concurrency`` (chunk size fixed at 16M) and against
  ``--chunk-size`` (concurrency fixed at 8), as GB/s and as a fraction of the
  slowest resource alone (8 fsync'd dd writers, measured in the same run);
- resume waste against the point of interruption: a pull is stopped (SIGKILL,
  and SIGINT as Ctrl-C sends it) once a given fraction of the bytes has
  crossed the wire, then pulled again; waste is the bytes sent over both runs
  beyond the model's size, as a fraction of it. A counting proxy in front of
  the registry measures what crossed, since a killed pull reports nothing.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pull import build_layout  # noqa: E402
from benchlib import (  # noqa: E402
    CountingProxy,
    GiB,
    MiB,
    ceiling_disk_write,
    make_weights,
    record,
    rmtree,
    run_timed,
    start_registry,
)

CONCURRENCY = (1, 2, 4, 8, 16, 32)
CHUNK_SIZES = ("1M", "4M", "16M", "64M")
FRACTIONS = (0.1, 0.25, 0.5, 0.75, 0.9)


def pull_cmd(store: Path, ref: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "modelcache", "--store", str(store), "pull", "-q", *flags, ref]


def sweep(work: Path, ref: str, total: int, runs: int) -> None:
    disk = statistics.median(ceiling_disk_write(work, total) for _ in range(runs))
    print(f"ceiling: 8 parallel dd + fsync: {total / 1e9 / disk:.2f} GB/s", flush=True)
    points = [("concurrency", str(c), ["--concurrency", str(c), "--chunk-size", "16M"]) for c in CONCURRENCY]
    points += [("chunk_size", c, ["--concurrency", "8", "--chunk-size", c]) for c in CHUNK_SIZES]
    for param, value, flags in points:
        seconds = []
        for _ in range(runs):
            rmtree(work / "store")
            elapsed, _rss, _ = run_timed(pull_cmd(work / "store", ref, *flags))
            seconds.append(elapsed)
        median = statistics.median(seconds)
        gbps = total / 1e9 / median
        print(f"  {param}={value:<4} {median:6.2f} s  {gbps:5.2f} GB/s  {disk / median:5.2f} of the disk ceiling",
              flush=True)
        record("sweep", param=param, value=value, seconds=median, gbps=gbps, ceiling_fraction=disk / median,
               ceiling_seconds=disk, bytes=total)


def resume_waste(work: Path, proxy: CountingProxy, ref: str, total: int) -> None:
    for sig in (signal.SIGKILL, signal.SIGINT):
        for fraction in FRACTIONS:
            rmtree(work / "store")
            proxy.reset()
            proc = subprocess.Popen(pull_cmd(work / "store", ref, "--concurrency", "8", "--chunk-size", "16M"),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 120
            while proxy.downstream_bytes < fraction * total and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            at = proxy.downstream_bytes
            proc.send_signal(sig)
            proc.wait()
            time.sleep(0.2)  # let the proxy's pumps see the close
            first = proxy.reset()
            subprocess.run(pull_cmd(work / "store", ref), check=True, capture_output=True)
            second = proxy.reset()
            waste = max(0, first + second - total) / total
            print(f"  {signal.Signals(sig).name:<7} at {at / total:4.0%}: first run {first / MiB:7.1f} MiB, "
                  f"resume {second / MiB:7.1f} MiB, waste {waste:6.1%} of the model", flush=True)
            record("resume", signal=signal.Signals(sig).name, fraction=at / total, first=first, second=second,
                   waste=waste, bytes=total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=float, default=1.0, help="total GiB (default 1)")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--runs", type=int, default=2, help="runs per sweep point (median)")
    parser.add_argument("--only", choices=("sweep", "resume"), help="run one part only")
    args = parser.parse_args()

    total = int(args.size * GiB) // args.files // MiB * MiB * args.files
    work = Path(tempfile.mkdtemp(prefix="mc-sweep-", dir="/var/tmp"))
    print(f"workdir {work}; {args.files} files, {total / GiB:.2f} GiB", flush=True)
    weights = make_weights(work / "weights", total, args.files)
    build_layout(weights, work / "layout")
    registry, host = start_registry(work / "registry")
    proxy = CountingProxy(host)
    try:
        subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{work / 'layout'}:bench",
                        f"docker://{host}/bench/model:v1"], check=True, capture_output=True)
        rmtree(work / "layout")
        rmtree(work / "weights")
        os.sync()
        if args.only != "resume":
            print("== throughput against concurrency and chunk size (cold pulls, medians) ==", flush=True)
            sweep(work, f"oci://{host}/bench/model:v1", total, args.runs)
        if args.only != "sweep":
            print("== resume waste against the point of interruption ==", flush=True)
            resume_waste(work, proxy, f"oci://{proxy.address}/bench/model:v1", total)
    finally:
        proxy.close()
        registry.terminate()
        registry.wait()
        rmtree(work)


if __name__ == "__main__":
    main()
