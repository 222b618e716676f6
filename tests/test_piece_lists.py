"""Piece digest lists from `modelcache package` (issue 11): recorded per layer, read back, preferred by the router.

The list covers the blob a puller stores (the file of a single-file tar
layer, else the layer), cut exactly as daemons cut it (:mod:`modelcache.p2p.pieces`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
from pathlib import Path

import pytest

from modelcache.model import Archive, Blob, FileEntry, PieceDigests
from modelcache.p2p.client import PeerClient
from modelcache.p2p.discovery import StaticPeers
from modelcache.p2p.members import Members
from modelcache.p2p.pieces import PieceHasher, digest_list, piece_size
from modelcache.p2p.router import PeerRouter
from modelcache.package.build import PackageOptions, build
from modelcache.package.image import _piece_annotations
from modelcache.package.layers import Layer, read_segments
from modelcache.sources.oci_manifest import (
    PIECES_LENGTH,
    PIECES_SHA256,
    model_from_manifest,
    piece_digests,
)

PIECE = 64 << 10


@pytest.mark.parametrize("size", [0, 1, PIECE - 1, PIECE, PIECE + 1, 5 * PIECE + 17])
def test_one_pass_hasher_cuts_as_daemons_do(size: int) -> None:
    """Fed in uneven blocks, the packager's hasher gives the list a daemon computes from the stored blob."""
    data = random.Random(size).randbytes(size)
    hasher = PieceHasher(size, PIECE)
    at = 0
    rng = random.Random(1)
    while at < size:
        n = rng.randint(1, 3 * PIECE)
        hasher.update(data[at:at + n])
        at += n
    assert hasher.result() == digest_list(lambda o, n: data[o:o + n], size, PIECE)


def _pieces_of(data: bytes, minimum: int = PIECE) -> list[str]:
    return digest_list(lambda o, n: data[o:o + n], len(data), piece_size(len(data), minimum))


def test_package_records_each_layers_list_and_pull_reads_it_onto_the_stored_blob(tmp_path: Path, monkeypatch) -> None:
    """Image format: a single-file layer's list covers the file, a grouped layer's the layer; ModelPack raw
    layers too. The manifest reader puts each list on the blob a pull fetches."""
    monkeypatch.setenv("MODELCACHE_PEER_PIECE_MIN", str(PIECE))
    src = tmp_path / "src"
    src.mkdir()
    files = {"big.bin": os.urandom(5 * PIECE + 99), "small.json": b'{"a": 1}', "tiny.txt": b"hello"}
    for name, data in files.items():
        (src / name).write_bytes(data)
    package = asyncio.run(build(src, PackageOptions(large_file=PIECE)))
    manifest = json.loads(package.manifests[0].body)
    descs = manifest["layers"]
    assert all(d["annotations"][PIECES_LENGTH] == str(PIECE) for d in descs)
    single = next(d for d in descs if d["annotations"].get("io.modelcache.file.path") == "big.bin")
    assert single["annotations"][PIECES_SHA256] == "".join(_pieces_of(files["big.bin"]))  # the file, not the layer
    grouped = next(d for d in descs if "io.modelcache.file.path" not in d["annotations"])
    layer = next(la for la in package.layers if la.digest == grouped["digest"])
    assert grouped["annotations"][PIECES_SHA256] == "".join(_pieces_of(b"".join(read_segments(layer.segments))))

    model = model_from_manifest(manifest, ref="x", digest="sha256:" + "0" * 64)
    [big] = [p for p in model.parts if isinstance(p, FileEntry)]
    assert big.origin is not None and big.blob.digest == "sha256:" + hashlib.sha256(files["big.bin"]).hexdigest()
    assert big.blob.pieces == PieceDigests(PIECE, tuple(_pieces_of(files["big.bin"])))
    assert big.origin.pieces is None  # the layer itself is never fetched whole: no list on it
    [archive] = [p for p in model.parts if isinstance(p, Archive)]
    assert archive.blob.pieces is not None and len(archive.blob.pieces.digests) == 1

    mp = asyncio.run(build(src, PackageOptions(format="modelpack")))
    doc = json.loads(mp.root.body)  # type: ignore[union-attr]
    parts = model_from_manifest(doc, ref="y", digest="sha256:" + "1" * 64).parts
    by_path = {p.path: p.blob for p in parts if isinstance(p, FileEntry)}
    assert by_path["big.bin"].pieces == PieceDigests(PIECE, tuple(_pieces_of(files["big.bin"])))
    assert by_path["tiny.txt"].pieces == PieceDigests(PIECE, (hashlib.sha256(b"hello").hexdigest(),))


def test_the_lists_of_one_manifest_stay_within_the_budget() -> None:
    """Layers past the budget go without a list (checked whole at commit); the ones before keep theirs."""
    layers = [Layer([], "t", [], piece_length=PIECE, pieces=["ab" * 32] * n) for n in (2, 3, 1)]
    assert [bool(a) for a in _piece_annotations(layers, budget=64 * 5)] == [True, True, False]
    assert [bool(a) for a in _piece_annotations(layers, budget=64 * 4)] == [True, False, False]


@pytest.mark.parametrize("annotations", [
    {},
    {PIECES_LENGTH: "65536"},
    {PIECES_LENGTH: "0", PIECES_SHA256: "ab" * 32},
    {PIECES_LENGTH: "x", PIECES_SHA256: "ab" * 32},
    {PIECES_LENGTH: "65536", PIECES_SHA256: "ab" * 32 * 2},  # two digests for a one-piece blob
    {PIECES_LENGTH: "65536", PIECES_SHA256: "AB" * 32},
    {PIECES_LENGTH: "65536", PIECES_SHA256: 7},
])
def test_a_malformed_or_miscounted_list_is_ignored(annotations: dict) -> None:
    """Never an error: the blob's own digest still checks every byte."""
    assert piece_digests(annotations, 1000) is None


class _Client(PeerClient):
    def __init__(self) -> None:
        super().__init__(b"k" * 16, "me")
        self.asked: list[str] = []

    async def digests(self, url: str, digest: str) -> list[str] | None:
        self.asked.append(url)
        return ["cd" * 32]


def test_the_router_prefers_the_origins_list_and_ignores_one_cut_otherwise() -> None:
    """An origin list cut as this node cuts is used without asking any peer; one made with another minimum
    (another piece length) cannot check our pieces, so peers are asked as before."""
    client = _Client()
    router = PeerRouter(object(), Members(StaticPeers(["http://127.0.0.1:1001"]), "me"),  # type: ignore[arg-type]
                        client, minimum=PIECE)
    listed = Blob("sha256:" + "ef" * 32, 1000, pieces=PieceDigests(PIECE, ("ab" * 32,)))
    assert asyncio.run(router.piece_digests(listed)) == ["ab" * 32]
    assert client.asked == []
    other_cut = Blob("sha256:" + "ef" * 32, 1000, pieces=PieceDigests(4 << 20, ("ab" * 32,)))
    assert asyncio.run(router.piece_digests(other_cut)) == ["cd" * 32]
    assert client.asked == ["http://127.0.0.1:1001"]


def test_a_daemon_serves_a_stand_in_it_learnt_in_an_earlier_run(tmp_path: Path) -> None:
    """A requester that does not know an S3 object's sha256 asks by the stand-in of its source key; a holder
    that learnt the sha256 before a restart (the index's learned digests) still finds and serves the bytes,
    and its piece list."""
    import io

    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from modelcache.model import standin_digest
    from modelcache.p2p import signing
    from modelcache.p2p.limit import RateLimit
    from modelcache.p2p.server import PeerServer
    from modelcache.store import Store

    store = Store(tmp_path / "store")
    data = os.urandom(3 * PIECE + 5)
    sha, _ = store.content.write_stream(io.BytesIO(data))
    key = "s3://bucket/m/w.bin@" + hashlib.md5(data).hexdigest()
    store.index.learn_digest(key, sha, len(data))
    standin = standin_digest(key)

    class _Engine:
        learned: dict[str, str] = {}  # a fresh process: nothing learnt in this run

    secret = b"s" * 16
    server = PeerServer(store, _Engine(), secret, "holder", minimum=PIECE,  # type: ignore[arg-type]
                        limit=RateLimit(0), home_wait=0.5)
    app = web.Application()
    server.add_routes(app)

    async def ask() -> tuple[int, bytes, list[str]]:
        async with TestClient(TestServer(app)) as client:
            path, rng = f"/v1/peer/blobs/{standin}?mode=have", f"bytes={PIECE}-{2 * PIECE - 1}"
            r = await client.get(path, headers={"Range": rng, signing.HEADER: signing.sign(secret, "GET", path, rng)})
            body = await r.read()
            lpath = f"/v1/peer/pieces/{standin}"
            listed = await client.get(lpath, headers={signing.HEADER: signing.sign(secret, "GET", lpath)})
            return r.status, body, await listed.json()

    status, body, listed = asyncio.run(ask())
    store.close()
    assert (status, body) == (206, data[PIECE:2 * PIECE])
    assert listed == _pieces_of(data)
