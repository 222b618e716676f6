"""Peers add speed, not just savings (issue 11): capped nodes in network namespaces.

The registry and 4 daemons each get a namespace of their own, joined by
veth pairs to a bridge in another, and every link is capped with ``tc`` at
40 MB/s each way (tests/netns_support.py draws the network). One node
alone pulls a 192 MiB model; then 4 nodes with fresh stores pull it at
once. Together they must finish within 1.5x the time one needs alone, while
the registry sends the model's bytes about once (from its access log), and
every node's files must be byte-exact. At these caps the daemons need
little CPU, so the links, not this shared machine's cores, should set the
pace. Homes pace their origin fetches and relay pieces in small hand-offs as
they arrive, give queued pieces to peers with a stream to spare, and read few
peer bodies while their own origin reads run (p2p/gate.py, p2p/relay.py,
p2p/client.py), so the peer exchange overlaps the origin phase: 1.20x to 1.36x
measured here at load 2 to 7 (1.24x to 1.43x at load 7 to 11, traced).
``MODELCACHE_PEER_TRACE=1`` in the environment makes the daemons log
per-piece timelines (``netns_support.timeline`` tabulates them).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from netns_support import peer_scenario, unavailable
from support import tree_digests

RATE = 40_000_000  # bytes per second, each direction of every node and of the registry
FILES = [96 << 20, 96 << 20]  # one node alone needs about 5 s at the cap


def test_four_capped_nodes_at_once_finish_within_1_5x_one_node_alone(tmp_path: Path) -> None:
    why = unavailable()
    if why:
        pytest.skip(f"no network namespaces here: {why}")
    try:
        run = peer_scenario(tmp_path, nodes=4, rate=RATE, file_sizes=FILES, timeout=60)
        for job in run.jobs:
            assert job["state"] == "done", job
            assert tree_digests(Path(job["path"])) == run.expected
        # At least once (fresh stores: a log that counted nothing would pass a bare upper bound), about once.
        assert run.model_bytes <= run.origin_bytes <= 1.1 * run.model_bytes, (run.origin_bytes, run.model_bytes)
        assert run.ratio <= 1.5, (f"4 nodes took {run.makespan:.2f} s, {run.ratio:.2f}x one alone "
                                  f"({run.solo_median:.2f} s); issue 11's bar is 1.5x")
    finally:
        for big in tmp_path.iterdir():  # about 1.2 GB of stores and registry: not kept for pytest's last 3 runs
            if big.is_dir():
                shutil.rmtree(big, ignore_errors=True)
