#!/usr/bin/env python3
"""Benchmark: `modelcache pull` from S3 and from a Hub-compatible server vs the tools people use.

One command::

    python tools/bench_sources.py            # 8 files, 2 GiB, 3 runs each
    python tools/bench_sources.py --only s3 --quick --peers rclone   # 0.25 GiB, 5 runs, against rclone

S3 (a SeaweedFS `weed mini` it starts on loopback): `modelcache pull s3://…`
vs `aws s3 cp --recursive` and `rclone copy` (when installed); and the same
pull with the bytes read through boto3's ``get_object`` in threads instead
of presigned URLs on our reader (the choice the S3 source made, measured).

Hugging Face (the tests' fake Hub, its CDN serving the files from disk with
sendfile): `modelcache pull hf://…` vs `huggingface_hub.snapshot_download`.

Each against this machine's ceiling, every resource alone on the same bytes
(../shared/MEASURING.md): parallel range GETs of the same objects to
/dev/null (4 ranges per object, all at once), 8 parallel dd writers with
fsync, sha256 with hashlib on every core. Every run is cold (empty target),
durable (`sync` included), alternating; medians and ratios are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from benchlib import (  # noqa: E402
    GiB,
    MiB,
    Timing,
    ceiling_disk_write,
    ceiling_http_get,
    ceiling_sha256,
    make_weights,
    report,
    rmtree,
    run_timed,
)
from fake_hub import FakeHub  # noqa: E402
from s3_support import start_seaweed, stop_seaweed  # noqa: E402

RANGES = 4  # ranges per object in the network ceiling


def _ranges(size: int) -> list[str]:
    step = -(-size // RANGES)
    return [f"{i}-{min(size, i + step) - 1}" for i in range(0, size, step)]


def _ceilings(urls: list[str], size: int, work: Path, total: int, weights: list[Path],
              net: Timing, disk: Timing, sha: Timing) -> None:
    net.seconds.append(ceiling_http_get(urls, ranges=_ranges(size)))
    disk.seconds.append(ceiling_disk_write(work, total))
    sha.seconds.append(ceiling_sha256(weights))


def _ceiling_timings() -> tuple[Timing, Timing, Timing]:
    return (Timing(f"ceiling: {RANGES} range GETs/object to /dev/null"), Timing("ceiling: 8 parallel dd + fsync"),
            Timing("ceiling: sha256 (hashlib, all cores)"))


def _bytecode_cached(work: Path) -> dict[str, str]:
    """Environment that lets Python cache bytecode (outside the tree), as a user's install has it:
    some shells here set PYTHONDONTWRITEBYTECODE, which made every timed run compile every module."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    return {"PYTHONPYCACHEPREFIX": str(work / "pycache")}


def _warm_up(urls: list[str], work: Path, total: int) -> None:
    """Untimed: on these VMs whoever first reads fresh uploads, or first fills fresh page cache,
    pays for it (seen: the first run 40% slower, whoever ran first); and the upload's own dirty
    pages must be on disk before anything is timed."""
    os.sync()
    ceiling_http_get(urls)
    ceiling_disk_write(work, total)
    os.sync()


def bench_s3(work: Path, weights: list[Path], total: int, runs: int,
             peers: frozenset[str] = frozenset({"boto3", "aws", "rclone"})) -> None:
    server = start_seaweed(work / "seaweed")
    try:
        s3 = server.client()
        s3.create_bucket(Bucket="bench")
        for p in weights:
            s3.upload_file(str(p), "bench", f"model/{p.name}")
        env = {**server.env(), **_bytecode_cached(work)}
        os.environ.update(env)
        # Plain HTTP on loopback needs no CA bundle, and rclone's S3 backend fails on one set this way.
        os.environ.pop("AWS_CA_BUNDLE", None)
        urls = [s3.generate_presigned_url("get_object", Params={"Bucket": "bench", "Key": f"model/{p.name}"})
                for p in weights]
        ours, boto = Timing("modelcache pull s3://"), Timing("same, bytes via boto3 get_object")
        aws = Timing("aws s3 cp --recursive")
        net, disk, sha = _ceiling_timings()
        rclone = Timing("rclone copy") if shutil.which("rclone") and "rclone" in peers else None
        rclone_env = {"RCLONE_CONFIG_BENCH_TYPE": "s3", "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
                      "RCLONE_CONFIG_BENCH_ENDPOINT": server.endpoint,
                      "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": server.access_key,
                      "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": server.secret_key}
        pull = [sys.executable, "-m", "modelcache", "--store", str(work / "store"), "pull", "-q", "s3://bench/model"]
        _warm_up(urls, work, total)
        run_timed(pull, env=env)  # untimed: compiles and caches our bytecode, as an installed package has it
        for run in range(runs):
            for timing, cmd in ((ours, pull), (boto, [sys.executable, __file__, "_pull_boto3", str(work / "store")])):
                if timing is boto and "boto3" not in peers:
                    continue
                rmtree(work / "store")
                seconds, rss, _ = run_timed(cmd, env=env)
                timing.seconds.append(seconds)
                timing.rss.append(rss)
            if "aws" in peers:
                rmtree(work / "aws")
                seconds, rss, _ = run_timed(["aws", "s3", "cp", "--recursive", "--quiet", "--endpoint-url",
                                             server.endpoint, "s3://bench/model", str(work / "aws")], env=env)
                aws.seconds.append(seconds)
                aws.rss.append(rss)
                rmtree(work / "aws")
            if rclone is not None:
                rmtree(work / "rclone")
                seconds, rss, _ = run_timed(["rclone", "copy", "bench:bench/model", str(work / "rclone")],
                                            env=rclone_env)
                rclone.seconds.append(seconds)
                rclone.rss.append(rss)
                rmtree(work / "rclone")
            _ceilings(urls, weights[0].stat().st_size, work, total, weights, net, disk, sha)
            others = [t for t in (boto, aws, rclone) if t is not None and t.seconds]
            print(f"s3 run {run + 1}: ours {ours.seconds[-1]:.2f}s"
                  + "".join(f", {t.name} {t.seconds[-1]:.2f}s" for t in others)
                  + f", GET {net.seconds[-1]:.2f}s, dd {disk.seconds[-1]:.2f}s, sha {sha.seconds[-1]:.2f}s",
                  flush=True)
        report("pull from S3 (SeaweedFS)", total, ours, [t for t in (boto, aws, rclone) if t is not None and t.seconds],
               {"net": net, "disk": disk, "sha": sha})
        if rclone is None:
            print("  rclone: not installed here (apt-get install rclone), not measured")
    finally:
        rmtree(work / "store")
        stop_seaweed(server)


def bench_hf(work: Path, weights: list[Path], total: int, runs: int) -> None:
    with FakeHub() as hub:
        hub.repo("bench/model").commit({p.name: p for p in weights})
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1",
               **_bytecode_cached(work)}
        # The fake hashes each file once, on the first listing: not part of any timed run.
        urllib.request.urlopen(f"{hub.endpoint}/api/models/bench/model/tree/main", timeout=300).read()
        urls = [f"{hub.endpoint}/bench/model/resolve/main/{p.name}" for p in weights]
        _warm_up(urls, work, total)
        ours, peer = Timing("modelcache pull hf://"), Timing("huggingface_hub.snapshot_download")
        net, disk, sha = _ceiling_timings()
        snapshot = ("import sys, huggingface_hub; "
                    "huggingface_hub.snapshot_download('bench/model', cache_dir=sys.argv[1])")
        for run in range(runs):
            rmtree(work / "store")
            seconds, rss, _ = run_timed([sys.executable, "-m", "modelcache", "--store", str(work / "store"),
                                         "pull", "-q", "hf://bench/model"], env=env)
            ours.seconds.append(seconds)
            ours.rss.append(rss)
            rmtree(work / "store")
            rmtree(work / "hf")
            seconds, rss, _ = run_timed([sys.executable, "-c", snapshot, str(work / "hf")], env=env)
            peer.seconds.append(seconds)
            peer.rss.append(rss)
            rmtree(work / "hf")
            _ceilings(urls, weights[0].stat().st_size, work, total, weights, net, disk, sha)
            print(f"hf run {run + 1}: ours {ours.seconds[-1]:.2f}s, snapshot_download {peer.seconds[-1]:.2f}s, "
                  f"GET {net.seconds[-1]:.2f}s, dd {disk.seconds[-1]:.2f}s, sha {sha.seconds[-1]:.2f}s", flush=True)
        report("pull from a Hub-compatible server (the tests' fake, files sent with sendfile)", total, ours, [peer],
               {"net": net, "disk": disk, "sha": sha})


def pull_via_boto3(store_dir: str) -> None:
    """`modelcache pull s3://bench/model`, but each range read with boto3's get_object in a thread."""
    from modelcache.model import Blob
    from modelcache.pull import pull
    from modelcache.sources import SourceOptions, s3_client
    from modelcache.sources import s3 as s3_source
    from modelcache.store import Store
    from modelcache.transfer import Engine

    threads = ThreadPoolExecutor(16, thread_name_prefix="boto3")
    s3 = s3_client.client(16)

    async def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes]:
        key, etag = self._objects[blob.digest]
        loop = asyncio.get_running_loop()
        body = (await loop.run_in_executor(threads, lambda: s3.get_object(
            Bucket=self.ref.bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}",
            IfMatch=f'"{etag}"')))["Body"]
        try:
            while piece := await loop.run_in_executor(threads, body.read, 4 << 20):
                yield piece
        finally:
            body.close()

    s3_source.S3Source.read = read  # type: ignore[method-assign]
    store = Store(Path(store_dir))
    engine = Engine(store.content)
    try:
        asyncio.run(pull(store, engine, "s3://bench/model", options=SourceOptions()))
    finally:
        engine.close()
        store.close()
        threads.shutdown()


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_pull_boto3":
        pull_via_boto3(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=float, default=2.0, help="total GiB (default 2)")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", choices=("s3", "hf"), default=None)
    parser.add_argument("--quick", action="store_true", help="0.25 GiB and 5 runs: a first look on a shared machine")
    parser.add_argument("--peers", default="boto3,aws,rclone",
                        help="the S3 peers to run, of boto3, aws, rclone (default all)")
    args = parser.parse_args()
    if args.quick:
        args.size, args.runs = 0.25, max(args.runs, 5)
    total = int(args.size * GiB) // args.files // MiB * MiB * args.files
    work = Path(tempfile.mkdtemp(prefix="mc-bench-src-", dir="/var/tmp"))
    started = time.monotonic()
    try:
        weights = make_weights(work / "weights", total, args.files)
        if args.only in (None, "s3"):
            bench_s3(work, weights, total, args.runs, frozenset(args.peers.split(",")))
        if args.only in (None, "hf"):
            bench_hf(work, weights, total, args.runs)
    finally:
        rmtree(work)
    print(f"\n(benchmark took {time.monotonic() - started:.0f}s)")


if __name__ == "__main__":
    main()
