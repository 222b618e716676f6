"""Peers for every source (issue 11): packaged piece lists, S3 objects and small Hub files, real daemons.

Same setup as tests/test_p2p_cluster.py: real `modelcache serve` processes
on loopback, a static peer list, 64 KiB pieces; the origin's bytes are
counted by a fault proxy in front of it (or the fake Hub's own logs).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from aiohttp import web
from daemon_support import DaemonProcess, free_port
from faultproxy import BackgroundServer, FaultProxy
from support import run_cli, tree_digests
from test_p2p_cluster import ENV, pull_all, secret, start_peers, stop_all  # noqa: F401 - secret is a fixture

LIED = "failed its digest check after bytes from peers"  # the engine's log line for a commit-time catch


class RandomLiar:
    """A peer that answers every range of every blob with random bytes of the right length."""

    def __init__(self) -> None:
        self.requests = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if "/v1/peer/blobs/" not in request.path:
            return web.Response(status=404)
        self.requests += 1
        first, _, last = request.headers["Range"].removeprefix("bytes=").partition("-")
        return web.Response(status=206, body=os.urandom(int(last) - int(first) + 1))


def bad_pieces(daemons: list[DaemonProcess], peer: str) -> float:
    return sum(d.metric(f'modelcache_peer_bad_pieces_total{{peer="{peer}"}}') for d in daemons)


def logs(daemons: list[DaemonProcess]) -> str:
    return "".join(d.log.read_text(errors="replace") for d in daemons)


def test_packaged_piece_lists_catch_a_lying_peer_per_piece(registry, tmp_path, secret) -> None:  # noqa: F811
    """`modelcache package` records each layer's piece list; 3 daemons and a peer serving random bytes pull
    the package at once: the liar's pieces fail their check as they arrive (never at blob commit), it is
    benched, the registry serves the model about once, every tree is byte-exact."""
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(11)
    files = {"big.bin": rng.randbytes(1536 << 10), "other.bin": rng.randbytes((1 << 20) + 4321),
             "config.json": b'{"model": "lists"}', "tokenizer.json": rng.randbytes(70 << 10)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    expected = tree_digests(src)
    liar = RandomLiar()
    with FaultProxy(registry.host) as proxy, BackgroundServer(liar.handle) as liar_server:
        run_cli("package", str(src), "--to", f"oci://{registry.host}/p2p/lists:v1", "--large-file", "512K",
                store=tmp_path / "pkg", env=ENV, check=True)
        ref = f"oci://{proxy.host}/p2p/lists:v1"
        size = sum(len(d) for d in files.values())  # big files come by range out of their layers
        lying = f"http://{liar_server.host}"
        ports = [free_port() for _ in range(3)]
        daemons = start_peers(tmp_path, secret, ports, extra_urls=(lying,))
        try:
            for job in pull_all(daemons, ref):
                assert job["state"] == "done", job
                assert tree_digests(Path(job["path"])) == expected
            assert liar.requests > 0
            assert bad_pieces(daemons, lying) >= 1  # caught and blamed
            assert LIED not in logs(daemons)  # per piece: no blob ever failed at commit
            origin = sum(e.bytes for e in proxy.blob_gets())
            assert origin <= 1.1 * size, (origin, size)
        finally:
            stop_all(daemons)
