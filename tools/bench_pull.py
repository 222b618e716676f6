#!/usr/bin/env python3
"""Benchmark: ``modelcache pull`` from a local registry vs skopeo vs this machine's ceiling.

One command::

    python tools/bench_pull.py            # 8 files, 2 GiB, 3 runs each

It makes random weights, pushes them to a docker-registry it starts on
loopback (as a ModelPack artifact, copied in by skopeo), then alternates cold
runs (empty target each time, ``sync`` included) of:

- ``modelcache pull oci://…`` into an empty store;
- ``skopeo copy docker://… oci:DIR`` into an empty layout;
- the ceiling: parallel curl GETs of the same blobs to /dev/null, 8
  parallel fsync'd dd writes of the same number of bytes, and hashlib
  sha256 of them on all cores.

and prints medians, GB/s and the ratios: ours against the slowest resource
alone, and the peer's time against ours; plus peak RSS.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
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
    start_registry,
)

from modelcache.package.layout import LayoutWriter, descriptor  # noqa: E402


def build_layout(weights: list[Path], root: Path) -> list[str]:
    """A ModelPack layout of the weights; return the layer digests."""
    layout = LayoutWriter(root)
    layers = []
    for path in weights:
        digest, size = layout.add_file(path)
        layers.append(descriptor("application/vnd.cncf.model.weight.v1.raw", digest, size,
                                 annotations={"org.cncf.model.filepath": path.name}))
    config = layout.add_json({"descriptor": {"name": "bench"}}, "application/vnd.cncf.model.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "artifactType": "application/vnd.cncf.model.manifest.v1+json", "config": config, "layers": layers}
    layout.tag(layout.add_json(manifest, manifest["mediaType"]), "bench")
    return [layer["digest"] for layer in layers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=float, default=2.0, help="total GiB (default 2)")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--chunk-size", default="16M")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir on /var/tmp")
    args = parser.parse_args()

    total = int(args.size * GiB) // args.files // MiB * MiB * args.files
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mc-bench-", dir="/var/tmp"))
    print(f"workdir {work}; making {args.files} files, {total / GiB:.2f} GiB", flush=True)
    weights = make_weights(work / "weights", total, args.files)
    layer_digests = build_layout(weights, work / "layout")
    registry, host = start_registry(work / "registry")
    try:
        subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{work / 'layout'}:bench",
                        f"docker://{host}/bench/model:v1"], check=True, capture_output=True)
        rmtree(work / "layout")
        ref = f"oci://{host}/bench/model:v1"
        urls = [f"http://{host}/v2/bench/model/blobs/{d}" for d in layer_digests]

        ours, skopeo = Timing("modelcache pull"), Timing("skopeo copy")
        net, disk, sha = Timing("ceiling: parallel GET to /dev/null"), Timing("ceiling: 8 parallel dd + fsync"), \
            Timing("ceiling: sha256 (hashlib, all cores)")
        for run in range(args.runs):
            store = work / "store"
            rmtree(store)
            seconds, rss, out = run_timed([sys.executable, "-m", "modelcache", "--store", str(store), "pull", "-q",
                                           "--concurrency", str(args.concurrency), "--chunk-size", args.chunk_size,
                                           ref])
            ours.seconds.append(seconds)
            ours.rss.append(rss)
            view = Path(out.strip().splitlines()[-1])
            rmtree(work / "skopeo")
            seconds, rss, _ = run_timed(["skopeo", "copy", "--src-tls-verify=false", f"docker://{host}/bench/model:v1",
                                         f"oci:{work / 'skopeo'}:bench"])
            skopeo.seconds.append(seconds)
            skopeo.rss.append(rss)
            net.seconds.append(ceiling_http_get(urls))
            disk.seconds.append(ceiling_disk_write(work, total))
            sha.seconds.append(ceiling_sha256(sorted(view.iterdir())))
            print(f"run {run + 1}: ours {ours.seconds[-1]:.2f}s, skopeo {skopeo.seconds[-1]:.2f}s, "
                  f"GET {net.seconds[-1]:.2f}s, dd {disk.seconds[-1]:.2f}s, sha {sha.seconds[-1]:.2f}s", flush=True)
        report("pull from a local registry", total, ours, [skopeo], {"net": net, "disk": disk, "sha": sha})
    finally:
        registry.terminate()
        registry.wait()
        for d in ("store", "skopeo", "registry"):
            rmtree(work / d)
        if not args.workdir:
            rmtree(work)


if __name__ == "__main__":
    main()
