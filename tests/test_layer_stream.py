"""Layers unpacked while they download (issue 13): one stream per layer, byte-exact, verified, resumable.

Images come from umoci and skopeo (tests/formats_support.py) or are built by
hand from the OCI specs; the fault proxy in front of the real registry logs
every blob GET, so "one stream per layer" and "only the non-durable rest is
fetched again" are counted, not assumed. Weights are bf16-like (normal
float32 values truncated to bf16), which gzip really compresses.
"""

from __future__ import annotations

import array
import asyncio
import functools
import os
import random
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import pytest
from faultproxy import FaultProxy
from formats_support import (
    compress,
    image_layer,
    ls,
    registry_blob_file,
    skopeo_copy,
    skopeo_raw,
    umoci_layer,
)
from support import LAYER_GZIP, run_cli, sha256, tree_digests

MiB = 1 << 20
RECORD_HEADER = struct.Struct("<8sQQ")  # store/content.py: magic, blob size, chunk size
DIR = {"type": tarfile.DIRTYPE}


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in [n for n in os.environ if n.startswith("MODELCACHE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))


@functools.cache
def _bf16_pool() -> bytes:
    rnd = random.Random(13)
    values = array.array("f", (rnd.gauss(0.0, 0.02) for _ in range(4 << 20)))
    return array.array("H", values.tobytes())[1::2].tobytes()  # little-endian: the high half of each float32


def bf16_like(size: int, seed: int) -> bytes:
    """``size`` bytes of normally distributed float32 values truncated to bf16 (the top 16 bits);
    ``seed`` picks where in one 8 MiB pool they start (layers of one test differ)."""
    pool = _bf16_pool()
    start = (seed * 7919 * 2) % (len(pool) - size) if size < len(pool) else 0
    return (pool * (1 + size // len(pool)))[start:start + size]


def _pull(ref: str, store: Path, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli("pull", "-q", "--chunk-size", "1M", *flags, ref, store=store, env=env)


def _view(proc: subprocess.CompletedProcess) -> Path:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return Path(proc.stdout.strip().splitlines()[-1])


def _layers(registry, repo: str) -> list[dict]:
    return skopeo_raw(f"docker://{registry.host}/{repo}:v1")["layers"]


def _one_stream_each(proxy: FaultProxy, layers: list[dict]) -> None:
    """Each layer came in one GET from byte 0, every byte once (the chunked path asks one range per MiB)."""
    for layer in layers:
        gets = proxy.blob_gets(layer["digest"])
        assert [g.range_start for g in gets] == [0], (layer, [g.range for g in gets])
        assert proxy.served(layer["digest"]) == layer["size"]


# -- byte-exact, one stream per layer ----------------------------------------------------------------


@pytest.mark.parametrize("maker", ["umoci-gzip", "skopeo-zstd"])
def test_compressed_layers_stream_byte_exact(registry, store: Path, tmp_path: Path, maker: str) -> None:
    """gzip layers from umoci and zstd layers recompressed by skopeo: one stream each, every file exact."""
    # Bytes of each maker's own: skopeo's blob-info cache would otherwise reuse the other maker's gzip
    # layer of the same tar in this registry instead of compressing it to zstd (seen in CI).
    seed = 10 * ["umoci-gzip", "skopeo-zstd"].index(maker)
    files = {"models/model.safetensors": bf16_like(3 * MiB + 333, seed=seed + 1),
             "models/config.json": b'{"hidden_size": 64}'}
    upper = {"models/extra.safetensors": bf16_like(MiB + 5, seed=seed + 2)}
    layout = tmp_path / "layout"
    umoci_layer(layout, "v1", files=files)
    umoci_layer(layout, "v1", files=upper)
    source = f"oci:{layout}:v1"
    flags: tuple[str, ...] = ()
    if maker == "skopeo-zstd":
        flags = ("--dest-compress", "--dest-compress-format=zstd")
    repo = f"stream/{maker}"
    skopeo_copy(source, f"docker://{registry.host}/{repo}:v1", *flags)
    layers = _layers(registry, repo)
    kind = maker.partition("-")[2]
    assert {m["mediaType"] for m in layers} == {f"application/vnd.oci.image.layer.v1.tar+{kind}"}
    assert max(m["size"] for m in layers) > 2 * MiB  # over two chunks: the chunked path would ask three ranges
    with FaultProxy(registry.host) as proxy:
        view = _view(_pull(f"oci://{proxy.host}/{repo}:v1", store))
        _one_stream_each(proxy, layers)
    want = {p: sha256(d) for p, d in {**files, **upper}.items()}
    assert tree_digests(view) == want
    # The layers themselves are not kept; their listings are, so a warm pull fetches nothing.
    assert {"sha256:" + p.name for p in (store / "blobs" / "sha256").iterdir()} == set(want.values())
    with FaultProxy(registry.host) as proxy:
        assert tree_digests(_view(_pull(f"oci://{proxy.host}/{repo}:v1", store))) == want
        assert proxy.blob_gets() == []


def test_plain_layer_of_thousands_of_tiny_files(registry, store: Path) -> None:
    """A plain tar of 3000 tiny files streams in one GET into 3000 blobs (no copy of the tar kept)."""
    rnd = random.Random(7)
    files = {f"tok/{i // 100:02d}/piece-{i:04d}.txt": rnd.randbytes(rnd.randrange(0, 300)) for i in range(3000)}
    dirs = sorted({p.rpartition("/")[0] for p in files} | {"tok"})
    layer = image_layer([(d + "/", None, DIR) for d in dirs] + [(p, d, {}) for p, d in files.items()], "tar")
    registry.push_image("stream/tiny", "v1", [layer])
    with FaultProxy(registry.host) as proxy:
        view = _view(_pull(f"oci://{proxy.host}/stream/tiny:v1", store))
        (info,) = _layers(registry, "stream/tiny")
        gets = proxy.blob_gets(info["digest"])
        # The range path's header walk looks at the first few small ranges, sees a layer of tiny files and
        # gives it to the stream: one GET from byte 0 for all of it, the probes a bounded extra.
        probes, stream = gets[:-1], gets[-1]
        assert stream.range_start in (0, None) and len(probes) <= 4, [g.range for g in gets]
        assert all(g.range_start is not None for g in probes)
        assert info["size"] <= proxy.served(info["digest"]) <= info["size"] + 256 * 1024
    assert tree_digests(view) == {p: sha256(d) for p, d in files.items()}
    assert sha256(layer[0])[7:] not in {p.name for p in (store / "blobs" / "sha256").iterdir()}


# -- the layer digest --------------------------------------------------------------------------------


def test_a_corrupt_layer_fails_cleanly_and_records_nothing(registry, store: Path) -> None:
    """A layer whose bytes at the origin differ from its digest: fetched twice, refused, nothing recorded."""
    good = bf16_like(2 * MiB, seed=11)
    data, media_type, _ = image_layer([("w.bin", good, {})], "gzip")
    registry.push_image("stream/corrupt", "v1", [(data, media_type, None)])
    digest = sha256(data)
    path = registry_blob_file(registry, digest)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # the registry serves what it stored; only our check can notice
    path.write_bytes(bytes(raw))
    with FaultProxy(registry.host) as proxy:
        proc = _pull(f"oci://{proxy.host}/stream/corrupt:v1", store)
        gets = proxy.blob_gets(digest)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and digest[:19] in proc.stderr, proc.stderr
    assert len(gets) == 2  # streamed once more, as the engine fetches a blob once more
    assert ls(store) == []
    from modelcache.store import Store

    s = Store(store)
    try:
        assert s.index.layer_entries(digest) is None
        assert not s.content.has(digest)
        assert [i.digest for i in s.content.ingests()] == []  # the bad bytes are not kept for a resume
    finally:
        s.close()


# -- SIGKILL midway, then resume ---------------------------------------------------------------------


def _chunks_done(store: Path, digest: str) -> int:
    try:
        raw = (store / "ingest" / digest[7:] / "chunks").read_bytes()
    except FileNotFoundError:
        return 0
    return raw[RECORD_HEADER.size:].count(1)


def test_sigkill_midway_through_a_gzip_layer_resumes_after_the_durable_bytes(registry, store: Path) -> None:
    """Killed midway, the next pull asks the origin only for the bytes after the durable prefix."""
    files = {"w.safetensors": bf16_like(6 * MiB, seed=21)}
    data, media_type, _ = image_layer([(p, d, {}) for p, d in files.items()], "gzip")
    registry.push_image("stream/resume", "v1", [(data, media_type, None)])
    digest = sha256(data)
    assert len(data) > 4 * MiB
    with FaultProxy(registry.host, rate=2 * MiB) as slow:
        cmd = [sys.executable, "-m", "modelcache", "--store", str(store), "pull", "-q", "--chunk-size", "1M",
               f"oci://{slow.host}/stream/resume:v1"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline:
                if _chunks_done(store, digest) >= 2:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "the pull should have been killed midway"
    from modelcache.store import Store

    s = Store(store)
    try:
        [status] = [i for i in s.content.ingests() if i.digest == digest]
    finally:
        s.close()
    durable = status.bytes_done
    assert 2 * MiB <= durable < len(data)

    with FaultProxy(registry.host) as proxy:
        view = _view(_pull(f"oci://{proxy.host}/stream/resume:v1", store))
        gets = proxy.blob_gets(digest)
        served = proxy.served(digest)
    assert [g.range_start for g in gets] == [durable]
    assert served == len(data) - durable
    assert tree_digests(view) == {p: sha256(d) for p, d in files.items()}
    assert not (store / "ingest" / digest[7:]).exists()


# -- isal, and the zlib fallback ---------------------------------------------------------------------


@pytest.mark.parametrize("isal", [True, False])
def test_gzip_inflates_with_isal_or_falls_back_to_zlib(registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     isal: bool) -> None:
    """With isal off (as where its wheel is missing), the standard library's zlib inflates the same bytes."""
    from isal import isal_zlib

    from modelcache.pull import pull
    from modelcache.store import Store, inflate
    from modelcache.transfer import Engine

    used: list[str] = []

    def spy(name: str, make):
        def decompressobj(*args, **kwargs):
            used.append(name)
            return make(*args, **kwargs)
        return decompressobj

    monkeypatch.setattr(inflate, "ISAL", isal)
    monkeypatch.setattr(inflate.zlib, "decompressobj", spy("zlib", zlib.decompressobj))
    monkeypatch.setattr(inflate._isal_zlib, "decompressobj", spy("isal", isal_zlib.decompressobj))
    files = {"a.bin": bf16_like(MiB + 17, seed=31 + isal), "b/c.json": b"{}"}
    layer = compress(_tar_of(files), "gzip")
    registry.push_image(f"stream/inflate-{int(isal)}", "v1", [(layer, LAYER_GZIP, None)])
    store = Store(tmp_path / "s")

    async def go() -> Path:
        engine = Engine(store.content)
        try:
            return (await pull(store, engine, f"oci://{registry.host}/stream/inflate-{int(isal)}:v1")).path
        finally:
            engine.close()

    try:
        view = asyncio.run(go())
    finally:
        store.close()
    assert set(used) == {"isal" if isal else "zlib"}  # one inflater per gzip member
    assert inflate.inflater() == ("isal" if isal else "zlib")
    assert tree_digests(view) == {p: sha256(d) for p, d in files.items()}


def _tar_of(files: dict[str, bytes]) -> bytes:
    from support import make_tar

    return make_tar([(p, d, {}) for p, d in files.items()])


def test_the_streamed_layers_own_bytes_get_no_xxh3(registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compressed layer is dropped once unpacked: no scrub will check it, so its bytes are not passed
    through xxh3 (issue 13); each file unpacked from it still gets its own, for scrub."""
    import xxhash

    from modelcache.pull import pull
    from modelcache.store import Store
    from modelcache.transfer import Engine

    hashed = [0]
    real = xxhash.xxh3_128

    class Counting:
        def __init__(self) -> None:
            self._h = real()

        def update(self, data) -> None:
            hashed[0] += len(data)
            self._h.update(data)

        def hexdigest(self) -> str:
            return self._h.hexdigest()

    monkeypatch.setattr(xxhash, "xxh3_128", Counting)
    files = {"a.bin": bf16_like(3 * MiB + 5, seed=41), "b/c.json": b'{"x": 1}'}
    layer = compress(_tar_of(files), "gzip")
    registry.push_image("stream/no-xxh3", "v1", [(layer, LAYER_GZIP, None)])
    store = Store(tmp_path / "s")

    async def go() -> Path:
        engine = Engine(store.content)
        try:
            return (await pull(store, engine, f"oci://{registry.host}/stream/no-xxh3:v1")).path
        finally:
            engine.close()

    try:
        view = asyncio.run(go())
        recorded = {digest: store.index.blob_xxh3(digest) for digest in (sha256(d) for d in files.values())}
    finally:
        store.close()
    assert tree_digests(view) == {p: sha256(d) for p, d in files.items()}
    assert hashed[0] == sum(len(d) for d in files.values())  # the files' bytes, not the layer's
    assert all(recorded.values())


def test_inflating_a_layer_reuses_its_freed_blocks(registry, tmp_path: Path) -> None:
    """The inflated blocks, freed once written, are reused: measured, glibc gave each back to the kernel and
    faulted fresh pages in for the next, one fault per 4 KiB inflated (store/heap.py, issue 13)."""
    import gzip
    import resource

    size = 24 * MiB
    for name, data in (("small", b"x" * 1000), ("big", bf16_like(size, seed=43))):
        layer = gzip.compress(_tar_of({"w.bin": data}), compresslevel=1, mtime=0)
        registry.push_image(f"stream/faults-{name}", "v1", [(layer, LAYER_GZIP, None)])

    def faults(name: str) -> int:
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
        _view(_pull(f"oci://{registry.host}/stream/faults-{name}:v1", tmp_path / f"store-{name}"))
        return resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - before

    baseline = faults("small")  # the interpreter, its imports, a pull's own memory
    extra = faults("big") - baseline
    assert extra < size // 4096 // 4, (baseline, extra)  # without: about one per 4 KiB
