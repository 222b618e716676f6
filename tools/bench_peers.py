#!/usr/bin/env python3
"""Benchmark: do peers add speed? N capped daemons pulling at once against one alone (issue 11).

One command (as root, with iproute2; not part of the test suite)::

    python tools/bench_peers.py                          # 4 nodes, 40 MB/s, 192 MiB model, 3 solo runs
    python tools/bench_peers.py --nodes 6 --rate 20M --size 256M

It builds the same private network as ``tests/test_p2p_netns.py`` (shared
code: ``tests/netns_support.py``): a bridge in a namespace of its own, the
registry and every daemon in their own namespace with a veth whose two ends
are capped with ``tc`` at ``--rate`` bytes per second (the node's upload and
download). It pushes a model of random files, times one node alone pulling
it (``--solo-runs`` times, fresh store each, median taken), then all
``--nodes`` daemons pulling it at once with peer sharing (fresh stores), and
prints the makespan over the solo median (the issue's bar: at most 1.5) and
the registry's blob bytes over the model's size (at most 1.1), from its access log.
Everything it made (namespaces, processes, files) is removed when it ends.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from netns_support import peer_scenario, timeline, unavailable  # noqa: E402

_BINARY = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_DECIMAL = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}


def _parse(text: str, units: dict[str, int]) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1:] if text[-1:] in units else ""
    return int(float(text[: len(text) - len(unit)]) * units[unit])


def size(text: str) -> int:
    """``192M``, ``1G`` (binary units, as file sizes go) or plain bytes."""
    return _parse(text, _BINARY)


def rate(text: str) -> int:
    """``40M`` = 40 MB/s (decimal units, as link speeds go) or plain bytes per second."""
    return _parse(text, _DECIMAL)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=4, help="daemons pulling at once (default 4)")
    p.add_argument("--rate", type=rate, default=40_000_000,
                   help="bytes/s each way for every node and the registry, decimal units (default 40M: 40 MB/s)")
    p.add_argument("--size", type=size, default=192 << 20, help="model size (default 192M)")
    p.add_argument("--files", type=int, default=2, help="files the model is cut into (default 2)")
    p.add_argument("--solo-runs", type=int, default=3, help="runs of one node alone (default 3, median taken)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds any one pull may take (default 300)")
    p.add_argument("--trace", action="store_true",
                   help="print each node's origin and peer MB/s over time (the daemons' MODELCACHE_PEER_TRACE)")
    args = p.parse_args()
    if args.trace:
        os.environ["MODELCACHE_PEER_TRACE"] = "1"  # the daemons inherit it
    why = unavailable()
    if why:
        print(f"bench_peers: {why}", file=sys.stderr)
        return 2
    sizes = [args.size // args.files] * args.files
    sizes[-1] += args.size - sum(sizes)
    with tempfile.TemporaryDirectory(prefix="bench-peers-", dir="/var/tmp") as tmp:
        run = peer_scenario(Path(tmp), nodes=args.nodes, rate=args.rate, file_sizes=sizes,
                            solo_runs=args.solo_runs, timeout=args.timeout)
        for job in run.jobs:
            if job["state"] != "done":
                print(f"bench_peers: a pull failed: {job.get('error')}", file=sys.stderr)
                return 1
        traced = timeline(run.logs[-args.nodes:]) if args.trace else ""
    mb = args.rate / 1e6
    print(f"model            {run.model_bytes / (1 << 20):.0f} MiB in {args.files} files; cap {mb:g} MB/s each way")
    print(f"one node alone   {run.solo_median:.2f} s median of {len(run.solo)} "
          f"({', '.join(f'{s:.2f}' for s in run.solo)}); at the cap: {run.model_bytes / args.rate:.2f} s")
    print(f"{args.nodes} nodes at once   {run.makespan:.2f} s, {run.ratio:.2f}x one node alone (bar: 1.5x)")
    print(f"origin bytes     {run.origin_ratio:.3f}x the model (bar: 1.1x)")
    print(f"daemon CPU       {run.cpu:.1f} s in all during the {args.nodes}-node run")
    if traced:
        print(traced)
    return 0


if __name__ == "__main__":
    sys.exit(main())
