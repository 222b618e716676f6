#!/usr/bin/env python3
"""Benchmark: `modelcache pull` from S3 and from a Hub-compatible server vs the tools people use.

One command::

    python tools/bench_sources.py            # 8 files, 2 GiB, 3 runs each

S3 (a SeaweedFS `weed mini` it starts on loopback): `modelcache pull s3://…`
vs `aws s3 cp --recursive` and `rclone copy` (when installed), and the
ceiling: parallel curl GETs of presigned URLs into files, and sha256.

Hugging Face (the fake Hub from the tests, serving from memory):
`modelcache pull hf://…` vs `huggingface_hub.snapshot_download`, and the
ceiling: parallel curl GETs of the resolve URLs into files.

Every run is cold (empty target), durable (`sync` included), alternating;
medians and ratios are printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from benchlib import GiB, MiB, Timing, ceiling_sha256, make_weights, report, rmtree, run_timed  # noqa: E402
from fake_hub import FakeHub  # noqa: E402
from s3_support import start_seaweed, stop_seaweed  # noqa: E402


def curl_ceiling(urls: list[str], out: Path) -> float:
    """Parallel curl GETs into files, then sync."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    procs = [subprocess.Popen(["curl", "-sfL", "-o", str(out / f"f{i}"), u]) for i, u in enumerate(urls)]
    if any(p.wait() for p in procs):
        raise SystemExit("curl failed on the ceiling run")
    os.sync()
    elapsed = time.perf_counter() - started
    rmtree(out)
    return elapsed


def bench_s3(work: Path, weights: list[Path], total: int, runs: int) -> None:
    server = start_seaweed(work / "seaweed")
    try:
        s3 = server.client()
        s3.create_bucket(Bucket="bench")
        for p in weights:
            s3.upload_file(str(p), "bench", f"model/{p.name}")
        env = server.env()
        os.environ.update(env)
        # Plain HTTP on loopback needs no CA bundle, and rclone's S3 backend fails on one set this way.
        os.environ.pop("AWS_CA_BUNDLE", None)
        urls = [s3.generate_presigned_url("get_object", Params={"Bucket": "bench", "Key": f"model/{p.name}"})
                for p in weights]
        ours, aws, ceiling, sha = Timing("modelcache pull s3://"), Timing("aws s3 cp --recursive"), \
            Timing("ceiling: parallel curl GET to files"), Timing("ceiling: sha256 (hashlib, all cores)")
        rclone = Timing("rclone copy") if shutil.which("rclone") else None
        rclone_env = {"RCLONE_CONFIG_BENCH_TYPE": "s3", "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
                      "RCLONE_CONFIG_BENCH_ENDPOINT": server.endpoint,
                      "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": server.access_key,
                      "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": server.secret_key}
        for run in range(runs):
            rmtree(work / "store")
            seconds, rss, _ = run_timed([sys.executable, "-m", "modelcache", "--store", str(work / "store"),
                                         "pull", "-q", "s3://bench/model"], env=env)
            ours.seconds.append(seconds)
            ours.rss.append(rss)
            rmtree(work / "aws")
            seconds, rss, _ = run_timed(["aws", "s3", "cp", "--recursive", "--quiet", "--endpoint-url",
                                         server.endpoint, "s3://bench/model", str(work / "aws")], env=env)
            aws.seconds.append(seconds)
            aws.rss.append(rss)
            if rclone is not None:
                rmtree(work / "rclone")
                seconds, rss, _ = run_timed(["rclone", "copy", "bench:bench/model", str(work / "rclone")],
                                            env=rclone_env)
                rclone.seconds.append(seconds)
                rclone.rss.append(rss)
            ceiling.seconds.append(curl_ceiling(urls, work / "curl"))
            sha.seconds.append(ceiling_sha256(weights))
            print(f"s3 run {run + 1}: ours {ours.seconds[-1]:.2f}s, aws {aws.seconds[-1]:.2f}s"
                  + (f", rclone {rclone.seconds[-1]:.2f}s" if rclone else "")
                  + f", curl {ceiling.seconds[-1]:.2f}s", flush=True)
        report("pull from S3 (SeaweedFS)", total, ours, [aws] + ([rclone] if rclone else []),
               {"net": ceiling, "sha": sha})
        if rclone is None:
            print("  rclone: not installed here (apt-get install rclone), not measured")
    finally:
        stop_seaweed(server)


def bench_hf(work: Path, weights: list[Path], total: int, runs: int) -> None:
    with FakeHub() as hub:
        hub.repo("bench/model").commit({p.name: p.read_bytes() for p in weights})
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}
        urls = [f"{hub.endpoint}/bench/model/resolve/main/{p.name}" for p in weights]
        ours, peer = Timing("modelcache pull hf://"), Timing("huggingface_hub.snapshot_download")
        ceiling, sha = Timing("ceiling: parallel curl GET to files"), Timing("ceiling: sha256 (hashlib, all cores)")
        snapshot = ("import sys, huggingface_hub; "
                    "huggingface_hub.snapshot_download('bench/model', cache_dir=sys.argv[1])")
        for run in range(runs):
            rmtree(work / "store")
            seconds, rss, _ = run_timed([sys.executable, "-m", "modelcache", "--store", str(work / "store"),
                                         "pull", "-q", "hf://bench/model"], env=env)
            ours.seconds.append(seconds)
            ours.rss.append(rss)
            rmtree(work / "hf")
            seconds, rss, _ = run_timed([sys.executable, "-c", snapshot, str(work / "hf")], env=env)
            peer.seconds.append(seconds)
            peer.rss.append(rss)
            ceiling.seconds.append(curl_ceiling(urls, work / "curl"))
            sha.seconds.append(ceiling_sha256(weights))
            print(f"hf run {run + 1}: ours {ours.seconds[-1]:.2f}s, snapshot_download {peer.seconds[-1]:.2f}s, "
                  f"curl {ceiling.seconds[-1]:.2f}s", flush=True)
        report("pull from a Hub-compatible server (the tests' fake, in Python)", total, ours, [peer],
               {"net": ceiling, "sha": sha})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=float, default=2.0, help="total GiB (default 2)")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", choices=("s3", "hf"), default=None)
    args = parser.parse_args()
    total = int(args.size * GiB) // args.files // MiB * MiB * args.files
    work = Path(tempfile.mkdtemp(prefix="mc-bench-src-", dir="/var/tmp"))
    try:
        weights = make_weights(work / "weights", total, args.files)
        if args.only in (None, "s3"):
            bench_s3(work, weights, total, args.runs)
        if args.only in (None, "hf"):
            bench_hf(work, weights, total, args.runs)
    finally:
        rmtree(work)


if __name__ == "__main__":
    main()
