"""Plain tar layers pulled by range from a real registry (issue 13): files straight into their blobs.

Images are made by umoci (decompressed by skopeo's ``dir`` transport and
pushed byte for byte, as skopeo itself always recompresses for a registry)
or by tarfile in pax and GNU formats, never by modelcache. The fault proxy's
request log shows what was fetched: the layers' files and their headers,
never a layer whole, except a layer of thousands of tiny files, which is
read as one stream.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from faultproxy import FaultProxy
from formats_support import ls, pull, registry_blob_file, skopeo_copy, store_blobs, umoci_layer
from support import LAYER_TAR, OCI_MANIFEST, make_tar, resident, run_cli, sha256, tree_digests

from modelcache.sources.tarindex import walk_bytes

MiB = 1 << 20
_rnd = random.Random(1313)
DIR = {"type": tarfile.DIRTYPE}


def _push_dir(registry, repo: str, directory: Path) -> dict:
    """Push an image in skopeo's ``dir`` layout to ``repo:v1`` byte for byte; return its manifest."""
    body = (directory / "manifest.json").read_bytes()
    manifest = json.loads(body)
    for desc in [manifest["config"], *manifest["layers"]]:
        registry.push_blob(repo, (directory / desc["digest"][7:]).read_bytes())
    registry.push_manifest(repo, "v1", body, manifest.get("mediaType", OCI_MANIFEST))
    return manifest


def _umoci_plain(registry, repo: str, tmp_path: Path, layers: list[dict]) -> tuple[dict, Path]:
    """An image of umoci layers (one per spec), made plain tar by skopeo; (manifest, dir holding its blobs)."""
    layout = tmp_path / "layout"
    for spec in layers:
        umoci_layer(layout, "v1", **spec)
    plain = tmp_path / "plain"
    skopeo_copy(f"oci:{layout}:v1", f"dir:{plain}", "--dest-decompress")
    manifest = _push_dir(registry, repo, plain)
    assert {layer["mediaType"] for layer in manifest["layers"]} == {LAYER_TAR}
    return manifest, plain


def _file_bytes(layer: bytes) -> int:
    """Bytes of the files the walk leaves to ranged fetches."""
    return sum(e.member.size for e in walk_bytes(layer).ranged())


def _assert_by_range(proxy: FaultProxy, digest: str, layer: bytes) -> None:
    """Every read of the layer was a range, none of it whole; what was served is its files and a little more."""
    gets = proxy.blob_gets(digest)
    assert gets and all(e.range for e in gets), [e.range for e in gets]
    assert all(e.bytes < len(layer) for e in gets)
    # Each file's bytes were asked for where they start in the layer (not in chunks of the layer from 0).
    assert {e.offset for e in walk_bytes(layer).ranged()} <= {e.range_start for e in gets}
    files = _file_bytes(layer)
    assert files <= proxy.served(digest) <= files + 64 * 1024 * len(walk_bytes(layer).ranged()) + 256 * 1024


def test_umoci_layers_pull_by_range(registry, store: Path, tmp_path: Path) -> None:
    """Two umoci layers (a symlink, a file deleted above) pull byte-exact, each file fetched once by range."""
    a, b, c = (_rnd.randbytes(n) for n in (3 * MiB + 77, 2 * MiB, 3 * MiB // 2))
    manifest, plain = _umoci_plain(registry, "tar/umoci", tmp_path, [
        {"files": {"models/a.bin": a, "models/b.bin": b, "models/config.json": b'{"k": 1}'},
         "symlinks": {"models/latest.bin": "a.bin"}},
        {"files": {"models/c.bin": c}, "remove": ("models/b.bin",)},
    ])
    with FaultProxy(registry.host) as proxy:
        view = pull(f"oci://{proxy.host}/tar/umoci:v1", store)
        for desc in manifest["layers"]:
            _assert_by_range(proxy, desc["digest"], (plain / desc["digest"][7:]).read_bytes())
    expected = {"models/a.bin": sha256(a), "models/c.bin": sha256(c), "models/config.json": sha256(b'{"k": 1}'),
                "models/latest.bin": "-> a.bin"}
    assert tree_digests(view) == expected
    assert (view / "models" / "a.bin").read_bytes() == a
    # The layers are not kept (no copy of the tar on disk), their files are, b.bin too (lower layer's listing).
    assert store_blobs(store) == {sha256(a), sha256(b), sha256(c), sha256(b'{"k": 1}')}
    # A warm pull of the same layers under another name reads their recorded listings: no blob fetched.
    _push_dir(registry, "tar/umoci-again", plain)
    with FaultProxy(registry.host) as proxy:
        again = pull(f"oci://{proxy.host}/tar/umoci-again:v1", store)
        assert proxy.blob_gets() == []
    assert tree_digests(again) == expected


def test_files_by_range_go_past_the_page_cache_and_are_followed_past_it(registry, store: Path,
                                                                         tmp_path: Path) -> None:
    """From the origin alone, each file's bytes go to the disk past the page cache, and the layer's running
    hash reads them back past it too (through the cache, the blobs' pages would be resident after the pull);
    the layer's digest still checks and the files are byte-exact."""
    a, b = _rnd.randbytes(5 * MiB), _rnd.randbytes(3 * MiB + 4096)
    _umoci_plain(registry, "tar/direct", tmp_path, [{"files": {"models/a.bin": a, "models/b.bin": b}}])
    view = pull(f"oci://{registry.host}/tar/direct:v1", store)
    for data in (a, b):
        assert resident(store / "blobs" / "sha256" / sha256(data)[7:]) < 0.1
    assert tree_digests(view) == {"models/a.bin": sha256(a), "models/b.bin": sha256(b)}


def test_pax_and_gnu_long_names_links_and_whiteouts_across_layers(registry, store: Path) -> None:
    """Long names (pax records, GNU long name/link blocks), hardlinks, symlinks and whiteouts, each by range."""
    deep = "models/" + "very-long-directory-name/" * 8 + "shard-00001-of-00002.safetensors"
    big, other, extra = (_rnd.randbytes(n) for n in (2 * MiB + 5, 1 * MiB + 3, 1 * MiB + 11))
    lower = make_tar([("models/", None, DIR), (deep, big, {}), ("models/tok.json", b"tok", {}),
                      ("models/same.json", None, {"type": tarfile.LNKTYPE, "linkname": "models/tok.json"}),
                      ("models/shard.safetensors", None, {"type": tarfile.SYMTYPE, "linkname": deep[7:]}),
                      ("old/", None, DIR), ("old/x.bin", other, {}), ("models/gone.txt", b"bye", {})])
    upper = make_tar([("models/.wh.gone.txt", b"", {}), ("old/.wh..wh..opq", b"", {}),
                      (deep.replace("00001", "00002"), extra, {}),
                      ("models/hard-" + "h" * 120, None, {"type": tarfile.LNKTYPE,
                                                          "linkname": deep.replace("00001", "00002")})],
                     fmt=tarfile.GNU_FORMAT)
    assert len(deep) > 100 and b"././@LongLink" in upper  # really pax records and GNU long names
    registry.push_image("tar/long", "v1", [(lower, LAYER_TAR, None), (upper, LAYER_TAR, None)])
    with FaultProxy(registry.host) as proxy:
        view = pull(f"oci://{proxy.host}/tar/long:v1", store)
        _assert_by_range(proxy, sha256(lower), lower)
        _assert_by_range(proxy, sha256(upper), upper)
    assert tree_digests(view) == {
        deep: sha256(big), "models/tok.json": sha256(b"tok"), "models/same.json": sha256(b"tok"),
        "models/shard.safetensors": "-> " + deep[7:], deep.replace("00001", "00002"): sha256(extra),
        "models/hard-" + "h" * 120: sha256(extra)}
    assert (view / deep).read_bytes() == big


def test_thousands_of_tiny_files_take_one_stream(registry, store: Path) -> None:
    """A layer of 1500 small files is read whole, in one stream, not walked header by header."""
    files = {f"data/{n:04d}.txt": _rnd.randbytes(700 + n % 50) for n in range(1500)}
    layer = make_tar([("data/", None, DIR), *((p, d, {}) for p, d in files.items())])
    assert len(layer) > MiB
    registry.push_image("tar/tiny", "v1", [(layer, LAYER_TAR, None)])
    with FaultProxy(registry.host) as proxy:
        view = pull(f"oci://{proxy.host}/tar/tiny:v1", store)
        gets = proxy.blob_gets(sha256(layer))
    # The walk gave up after a few small reads (64 members), then the layer came whole, in its 1 MiB chunks.
    walked = [e for e in gets if e.bytes < MiB and e.range_start + e.bytes < len(layer)]
    assert 1 <= len(walked) <= 5, [(e.range, e.bytes) for e in gets]
    assert sum(e.bytes for e in gets) - sum(e.bytes for e in walked) == len(layer)
    assert tree_digests(view) == {p: sha256(d) for p, d in files.items()}


def _db(store: Path, sql: str) -> list:
    with sqlite3.connect(store / "index.sqlite") as db:
        return db.execute(sql).fetchall()


def test_tampered_layer_fails_and_records_nothing(registry, store: Path) -> None:
    """A layer whose file bytes were changed at the registry fails its digest; nothing of it is recorded
    or remembered, and once the registry holds the right bytes again the next pull fetches its files anew."""
    a, b = _rnd.randbytes(2 * MiB), _rnd.randbytes(3 * MiB // 2)
    layer = make_tar([("m/a.bin", a, {}), ("m/b.bin", b, {})])
    registry.push_image("tar/tampered", "v1", [(layer, LAYER_TAR, None)])
    stored = registry_blob_file(registry, sha256(layer))
    at = walk_bytes(layer).ranged()[1].offset + 1000  # inside b.bin's bytes
    os.chmod(stored, 0o644)
    stored.write_bytes(layer[:at] + bytes([layer[at] ^ 0xFF]) + layer[at + 1:])
    try:
        with FaultProxy(registry.host) as proxy:
            proc = run_cli("pull", "--chunk-size", "1M", f"oci://{proxy.host}/tar/tampered:v1", store=store)
            starts = {e.range_start for e in proxy.blob_gets(sha256(layer))}
        assert {e.offset for e in walk_bytes(layer).ranged()} <= starts  # it was read by range
        assert proc.returncode == 5, proc.stderr
        assert sha256(layer) in proc.stderr and "Traceback" not in proc.stderr
        assert ls(store) == []
        assert _db(store, "SELECT digest FROM layers") == []
        assert _db(store, "SELECT source_key FROM learned_digests") == []
    finally:
        stored.write_bytes(layer)
    with FaultProxy(registry.host) as proxy:
        view = pull(f"oci://{proxy.host}/tar/tampered:v1", store)
        assert proxy.served(sha256(layer)) >= len(a) + len(b)  # nothing of the bad pull was trusted
    assert tree_digests(view) == {"m/a.bin": sha256(a), "m/b.bin": sha256(b)}
    assert len(_db(store, "SELECT digest FROM layers")) == 1


def _standin(layer: bytes, index: int) -> str:
    """The name the download of the layer's ``index``-th ranged file goes by (tarplace's stand-in digest)."""
    entry = walk_bytes(layer).ranged()[index]
    key = f"tar:{sha256(layer)}@{entry.offset}+{entry.member.size}"
    return hashlib.sha256(key.encode()).hexdigest()


def _durable_chunks(store: Path, hex_: str) -> int:
    try:
        raw = (store / "ingest" / hex_ / "chunks").read_bytes()
    except FileNotFoundError:
        return 0
    return raw[24:].count(1)


def test_killed_pull_resumes_without_fetching_again(registry, store: Path) -> None:
    """SIGKILL midway through a layer's files: the next pull fetches only what was not durable."""
    files = {"w/one.bin": _rnd.randbytes(10 * MiB), "w/two.bin": _rnd.randbytes(10 * MiB + 333)}
    layer = make_tar([(p, d, {}) for p, d in files.items()])
    registry.push_image("tar/resume", "v1", [(layer, LAYER_TAR, None)])
    standins = [_standin(layer, 0), _standin(layer, 1)]
    with FaultProxy(registry.host, rate=8 * MiB) as slow:
        proc = subprocess.Popen([sys.executable, "-m", "modelcache", "--store", str(store), "pull", "--chunk-size",
                                 "1M", "-q", f"oci://{slow.host}/tar/resume:v1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline:
                if sum(_durable_chunks(store, h) for h in standins) >= 6:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
    assert proc.returncode == -signal.SIGKILL, "the pull should have been killed midway"
    durable = sum(_durable_chunks(store, h) for h in standins) * MiB
    assert durable >= 6 * MiB
    with FaultProxy(registry.host) as proxy:
        view = pull(f"oci://{proxy.host}/tar/resume:v1", store)
        served = proxy.served(sha256(layer))
        assert all(e.range for e in proxy.blob_gets(sha256(layer)))
    total = sum(map(len, files.values()))
    assert served <= total - durable + 256 * 1024, (served, total, durable)
    assert tree_digests(view) == {p: sha256(d) for p, d in files.items()}


def test_with_peers_on_files_go_through_the_peer_router(tmp_path: Path) -> None:
    """With a peer router (peers configured), the walk reads the origin and the files, having no sha256
    before download, come from the origin by range: the layer is never fetched whole, the tree is exact."""
    import asyncio

    from test_engine import MemorySource

    from modelcache.model import Archive, Blob, Compression, Model
    from modelcache.p2p.client import PeerClient
    from modelcache.p2p.discovery import StaticPeers
    from modelcache.p2p.members import Members
    from modelcache.p2p.router import PeerRouter
    from modelcache.pull import materialize
    from modelcache.store import Store
    from modelcache.transfer import Engine, TransferConfig
    from modelcache.transfer.routing import PieceRouter
    from modelcache.tree import Filters

    files = {"m/a.bin": _rnd.randbytes(2 * MiB + 1), "m/b.bin": _rnd.randbytes(MiB + 2), "m/c.txt": b"small"}
    layer = make_tar([(p, d, {}) for p, d in files.items()])
    blob = Blob(sha256(layer), len(layer), media_type=LAYER_TAR)
    origin = MemorySource({blob.digest: layer}, name="oci://origin")
    peers = Members(StaticPeers([f"http://127.0.0.1:{p}" for p in (9, 10, 11)]), "me")
    router = PeerRouter(origin, peers, PeerClient(b"k" * 16, "me"), minimum=64 << 10)
    assert isinstance(router, PieceRouter)
    store = Store(tmp_path / "store")
    engine = Engine(store.content, TransferConfig(chunk_size=MiB))
    model = Model(ref="oci://origin/m:v1", digest="sha256:" + "0" * 64, parts=(Archive(blob, Compression.NONE),))
    try:
        result = asyncio.run(materialize(store, engine, model, router, filters=Filters()))
    finally:
        engine.close()
        store.close()
    assert tree_digests(result.path) == {p: sha256(d) for p, d in files.items()}
    ranged = walk_bytes(layer).ranged()
    assert {e.offset for e in ranged} <= {offset for _, offset, _ in origin.requests}
    assert origin.requested() < len(layer) + 64 * 1024 * len(ranged)
    assert not any(offset == 0 and length >= MiB for _, offset, length in origin.requests)


def test_running_hash_is_vouched_for_by_the_blobs_xxh3(tmp_path: Path) -> None:
    """The layer hash taken while files arrive counts only if the bytes read are those committed (same
    xxh3 as the blob's, recorded at commit); else it gives way to reading the layer back from the blobs."""
    import asyncio
    import io

    from modelcache.model import Blob
    from modelcache.store import Store
    from modelcache.tarplace import _follow, _layer_digest

    data = _rnd.randbytes(3 * MiB + 5)
    layer = make_tar([("m/a.bin", data, {}), ("m/b.txt", b"b", {})])
    index = walk_bytes(layer)
    [entry] = index.ranged()
    store = Store(tmp_path / "store")
    try:
        digest, _ = store.content.write_stream(io.BytesIO(data))

        def follow() -> str | None:
            async def run() -> str | None:
                event = asyncio.Event()
                event.set()
                return await _follow(store, Blob(sha256(layer), len(layer)), index, {}, {entry.offset: digest},
                                     {entry.offset: event})
            return asyncio.run(run())

        assert follow() == sha256(layer) == _layer_digest(store, index, {entry.offset: digest})
        _db_set = sqlite3.connect(store.root / "index.sqlite")
        with _db_set:
            _db_set.execute("UPDATE blobs SET xxh3 = ? WHERE digest = ?", ("0" * 32, digest))
        _db_set.close()
        assert follow() is None
    finally:
        store.close()
