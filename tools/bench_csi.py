#!/usr/bin/env python3
"""Benchmark: CSI publish latency (warm) and time-to-mount (cold) against a cold `modelcache pull`.

One command, as root (it makes real bind mounts)::

    python tools/bench_csi.py                 # 40 MiB and 4 GiB models

It starts a docker-registry and a `modelcache serve` on loopback, then reports:

- warm publish latency: NodePublishVolume of a model already in the store,
  median of many calls, for a small and a large model (a warm mount must not
  depend on the model's size: target within 1.5x of each other, under 50 ms);
- cold time-to-mount: NodePublishVolume of the large model into an empty
  store, against `modelcache pull` of it into an empty store (target:
  overhead under 10%), medians, alternating.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench_pull import build_layout  # noqa: E402
from benchlib import GiB, MiB, make_weights, rmtree, run_timed, start_registry  # noqa: E402
from daemon_support import publish_request, start_daemon, unmount_all_below  # noqa: E402

from modelcache.csi import csi_pb2 as pb  # noqa: E402


def push(work: Path, host: str, name: str, total: int, files: int) -> str:
    weights = make_weights(work / f"{name}-weights", total, files)
    build_layout(weights, work / f"{name}-layout")
    subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{work / f'{name}-layout'}:bench",
                    f"docker://{host}/bench/{name}:v1"], check=True, capture_output=True)
    rmtree(work / f"{name}-layout")
    rmtree(work / f"{name}-weights")
    return f"oci://{host}/bench/{name}:v1"


def warm_latency(daemon, model: str, targets: Path, calls: int) -> list[float]:
    node = daemon.node()
    node.NodePublishVolume(publish_request("warmup", targets / "warmup", model), timeout=600)
    node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="warmup", target_path=str(targets / "warmup")))
    seconds = []
    for i in range(calls):
        target = targets / f"v{i}"
        started = time.perf_counter()
        node.NodePublishVolume(publish_request(f"v{i}", target, model), timeout=60)
        seconds.append(time.perf_counter() - started)
        node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=f"v{i}", target_path=str(target)))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", type=float, default=40, help="small model MiB (default 40)")
    parser.add_argument("--large", type=float, default=4, help="large model GiB (default 4)")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mc-bench-csi-", dir="/var/tmp"))
    registry, host = start_registry(work / "registry")
    try:
        small = push(work, host, "small", int(args.small * MiB) // MiB * MiB, 2)
        large_bytes = int(args.large * GiB) // (8 * MiB) * 8 * MiB
        large = push(work, host, "large", large_bytes, 8)
        daemon = start_daemon(work / "node", "--chunk-size", "16M")
        try:
            warm_small = warm_latency(daemon, small, work / "t-small", args.calls)
            warm_large = warm_latency(daemon, large, work / "t-large", args.calls)
        finally:
            daemon.stop()
            unmount_all_below(work)

        cold_mount, cold_pull = [], []
        for run in range(args.runs):
            rmtree(work / "cold")
            d = start_daemon(work / "cold", "--chunk-size", "16M")
            try:
                started = time.perf_counter()
                d.node().NodePublishVolume(publish_request("cold", work / "cold" / "t", large), timeout=1800)
                cold_mount.append(time.perf_counter() - started)
            finally:
                d.stop()
                unmount_all_below(work)
            rmtree(work / "cold-pull")
            seconds, _, _ = run_timed([sys.executable, "-m", "modelcache", "--store", str(work / "cold-pull"),
                                       "pull", "-q", large], sync=False)
            cold_pull.append(seconds)
            print(f"run {run + 1}: cold mount {cold_mount[-1]:.2f}s, cold pull {cold_pull[-1]:.2f}s", flush=True)
    finally:
        registry.terminate()
        registry.wait()
        rmtree(work)

    ms = statistics.median(warm_small) * 1000
    ml = statistics.median(warm_large) * 1000
    print(f"\n== CSI publish, medians of {args.calls} warm calls and {args.runs} cold runs ==")
    print(f"  warm publish, {args.small:.0f} MiB model      {ms:7.1f} ms")
    print(f"  warm publish, {args.large:.0f} GiB model       {ml:7.1f} ms")
    print(f"  large / small                   {ml / ms:7.2f}x   (target <= 1.5x, both < 50 ms)")
    cm, cp = statistics.median(cold_mount), statistics.median(cold_pull)
    print(f"  cold time-to-mount ({args.large:.0f} GiB)       {cm:7.2f} s")
    print(f"  cold `modelcache pull` ({args.large:.0f} GiB)   {cp:7.2f} s   (process start included)")
    print(f"  mount / pull                    {cm / cp:7.2f}x   (target <= 1.10x)")


if __name__ == "__main__":
    main()
