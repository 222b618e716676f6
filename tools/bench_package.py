#!/usr/bin/env python3
"""Benchmark: `modelcache package` + push vs `skopeo copy oci:… docker://…` vs the machine's ceiling.

One command::

    python tools/bench_package.py         # 8 files, 2 GiB, 3 runs each

Side by side, alternating, each into a fresh repository of a docker-registry
it starts on loopback:

- ``modelcache package DIR --to oci://…`` (hashing, planning, parallel push);
- ``skopeo copy oci:LAYOUT docker://…`` of an equivalent OCI layout made
  beforehand (so skopeo does not even hash);
- the ceiling: parallel monolithic curl PUTs of the same bytes (the
  registry's own ingest speed) and hashlib sha256 of them on all cores.

Then the bytes a re-push uploads after one file changed.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pull import build_layout  # noqa: E402
from benchlib import (  # noqa: E402
    GiB,
    MiB,
    Timing,
    ceiling_sha256,
    make_weights,
    report,
    rmtree,
    run_timed,
    start_registry,
)


def ceiling_put(host: str, repo: str, paths: list[Path]) -> float:
    """Parallel monolithic uploads with curl (POST for a session, PUT the file with its digest)."""
    digests = []
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(8 * MiB):
                h.update(block)
        digests.append("sha256:" + h.hexdigest())
    started = time.perf_counter()
    procs = []
    for p, d in zip(paths, digests, strict=True):
        out = subprocess.run(["curl", "-sf", "-X", "POST", "-D", "-", "-o", "/dev/null",
                              f"http://{host}/v2/{repo}/blobs/uploads/"], capture_output=True, text=True, check=True)
        location = re.search(r"(?im)^location:\s*(\S+)", out.stdout).group(1)  # type: ignore[union-attr]
        url = location if location.startswith("http") else f"http://{host}{location}"
        sep = "&" if "?" in url else "?"
        procs.append(subprocess.Popen(["curl", "-sf", "-X", "PUT", "-T", str(p), "-H",
                                       "Content-Type: application/octet-stream", f"{url}{sep}digest={d}"],
                                      stdout=subprocess.DEVNULL))
    if any(p.wait() for p in procs):
        raise SystemExit("curl PUT failed")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=float, default=2.0, help="total GiB (default 2)")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()

    total = int(args.size * GiB) // args.files // MiB * MiB * args.files
    work = Path(tempfile.mkdtemp(prefix="mc-bench-pkg-", dir="/var/tmp"))
    weights = make_weights(work / "weights", total, args.files)
    build_layout(weights, work / "layout")  # what skopeo pushes: the same bytes as raw layers
    ours, skopeo = Timing("modelcache package + push"), Timing("skopeo copy oci: -> docker://")
    put, sha = Timing("ceiling: parallel curl PUT"), Timing("ceiling: sha256 (hashlib, all cores)")
    try:
        for run in range(args.runs):
            registry, host = start_registry(work / f"registry-{run}")
            try:
                seconds, rss, _ = run_timed([sys.executable, "-m", "modelcache", "--store", str(work / f"s{run}"),
                                             "package", "-q", str(work / "weights"), "--to",
                                             f"oci://{host}/bench/ours:v1", "--concurrency",
                                             str(args.concurrency)], sync=False)
                ours.seconds.append(seconds)
                ours.rss.append(rss)
                seconds, rss, _ = run_timed(["skopeo", "copy", "--dest-tls-verify=false",
                                             f"oci:{work / 'layout'}:bench", f"docker://{host}/bench/skopeo:v1"],
                                            sync=False)
                skopeo.seconds.append(seconds)
                skopeo.rss.append(rss)
                put.seconds.append(ceiling_put(host, "bench/curl", weights))
                sha.seconds.append(ceiling_sha256(weights))
                print(f"run {run + 1}: ours {ours.seconds[-1]:.2f}s, skopeo {skopeo.seconds[-1]:.2f}s, "
                      f"PUT {put.seconds[-1]:.2f}s, sha {sha.seconds[-1]:.2f}s", flush=True)
                if run == args.runs - 1:
                    with open(weights[0], "r+b") as f:
                        f.write(b"changed")
                    out = subprocess.run([sys.executable, "-m", "modelcache", "--store", str(work / f"s{run}"),
                                          "package", str(work / "weights"), "--to", f"oci://{host}/bench/ours:v1"],
                                         capture_output=True, text=True, check=True)
                    repush = out.stderr.strip().splitlines()[-1]
            finally:
                registry.terminate()
                registry.wait()
                rmtree(work / f"registry-{run}")
        report("package and push to a local registry", total, ours, [skopeo], {"put": put, "sha": sha})
        print(f"  re-push after changing one file: {repush.split(': ', 1)[1]}")
    finally:
        rmtree(work)


if __name__ == "__main__":
    main()
