"""The transfer engine against a misbehaving registry: retries, stalls, corruption, crash and resume.

A fault-injecting proxy (tests/faultproxy.py) sits in front of the real
registry and logs every blob GET with its Range and the bytes it served, so
"downloaded once" and "only the missing chunks" are measured, not assumed.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from aiohttp import web
from faultproxy import (
    BackgroundServer,
    Fault,
    FaultProxy,
    flip_byte,
    http_error,
    reset_after,
    stall_after,
    truncate_after,
)
from support import LAYER_TAR, MP_ARTIFACT, MP_CONFIG, MP_WEIGHT, run_cli, sha256, tree_digests

MiB = 1 << 20
RECORD_HEADER = struct.Struct("<8sQQ")  # store/content.py: magic, blob size, chunk size


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No MODELCACHE_* settings or docker credentials from the machine leak into a pull."""
    for name in [n for n in os.environ if n.startswith("MODELCACHE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))


# -- helpers -------------------------------------------------------------------


def _files(sizes: dict[str, int], seed: int) -> dict[str, bytes]:
    rnd = random.Random(seed)
    return {name: rnd.randbytes(size) for name, size in sizes.items()}


def _push_modelpack(registry, repo: str, files: dict[str, bytes]) -> None:
    """Push ``files`` as a ModelPack artifact (one .raw layer per file) tagged v1."""
    layers = [(data, MP_WEIGHT, {"org.cncf.model.filepath": name}) for name, data in files.items()]
    registry.push_image(repo, "v1", layers, config=b"{}", config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _digests(files: dict[str, bytes]) -> dict[str, str]:
    return {name: sha256(data) for name, data in files.items()}


def _cmd(store: Path, ref: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "modelcache", "--store", str(store), "pull", "--chunk-size", "1M", *extra, ref]


def _pull(host: str, repo: str, store: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("pull", "--chunk-size", "1M", *extra, f"oci://{host}/{repo}:v1", store=store, timeout=60)


def _view(proc: subprocess.CompletedProcess) -> Path:
    return Path(proc.stdout.strip().splitlines()[-1])


def _retries(stderr: str) -> int:
    """The chunk-retry count from the pull's summary line."""
    found = re.findall(r", (\d+) chunk retries$", stderr, re.M)
    assert found, f"no summary line in:\n{stderr}"
    return int(found[-1])


def _assert_one_line_error(proc: subprocess.CompletedProcess, code: int) -> str:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelcache: error: "), proc.stderr
    return lines[0]


def _no_views(store: Path) -> bool:
    views = store / "views"
    return not views.exists() or not any(p for p in views.iterdir() if not p.name.startswith("."))


def _done(store: Path, digest: str, size: int, *, chunk: int = MiB) -> list[int]:
    """Chunk indexes the store records as durable for a blob (all, once committed)."""
    if (store / "blobs" / "sha256" / digest[7:]).exists():
        return list(range(-(-size // chunk)))
    try:
        raw = (store / "ingest" / digest[7:] / "chunks").read_bytes()
    except FileNotFoundError:
        return []
    if len(raw) < RECORD_HEADER.size:  # just created, header not written yet
        return []
    _magic, blob_size, chunk_size = RECORD_HEADER.unpack_from(raw)
    assert (blob_size, chunk_size) == (size, chunk)
    return [i for i, flag in enumerate(raw[RECORD_HEADER.size:]) if flag == 1]


def _chunk_bytes(indexes: list[int], size: int) -> int:
    return sum(min(MiB, size - i * MiB) for i in indexes)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


# -- retries -------------------------------------------------------------------

TRANSIENT = {
    "500": http_error(500),
    "503": http_error(503),
    "reset": reset_after(300_000),
    "stall": stall_after(200_000, seconds=8),
    "truncate": truncate_after(250_000),
}


@pytest.mark.parametrize("fault", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_pull_survives_transient_faults(registry, store: Path, fault: Fault) -> None:
    """Two faulty blob GETs cost two chunk retries, reported in the summary, never the pull."""
    # Every chunk is longer than the faults' trigger points: a fault that lands on a short tail chunk
    # would pass through unfired and leave one retry instead of two (a flake seen under load).
    files = _files({"a.bin": 3 * MiB, "b.bin": 2 * MiB + 400_000}, seed=1)
    _push_modelpack(registry, "faults/transient", files)
    with FaultProxy(registry.host) as proxy:
        proxy.inject(fault, times=2)
        started = time.monotonic()
        proc = _pull(proxy.host, "faults/transient", store, "--read-timeout", "1")
        elapsed = time.monotonic() - started
        gets = proxy.blob_gets()
    assert proc.returncode == 0, proc.stderr
    assert tree_digests(_view(proc)) == _digests(files)
    assert _retries(proc.stderr) == 2
    assert len(gets) == 6 + 2  # six chunks, two of them asked twice
    if fault.kind in ("reset", "stall", "truncate"):
        # The retry resumes at the byte where the broken response stopped, not at the chunk start.
        assert sum(1 for e in gets if e.range_start % MiB) == 2, [e.range for e in gets]
        assert sum(e.bytes for e in gets) == sum(map(len, files.values())), "a byte was fetched twice"
    if fault.kind == "stall":
        assert elapsed < 6, "a stall must be cut by --read-timeout 1, not waited out"


def test_retry_after_is_honoured(registry, store: Path) -> None:
    """A 429 with Retry-After: 1 makes the chunk wait about a second before asking again."""
    files = _files({"w.bin": MiB // 2}, seed=2)
    _push_modelpack(registry, "faults/slowdown", files)
    with FaultProxy(registry.host) as proxy:
        proxy.inject(http_error(429, retry_after="1"))
        proc = _pull(proxy.host, "faults/slowdown", store)
        gets = proxy.blob_gets(sha256(files["w.bin"]))
    assert proc.returncode == 0, proc.stderr
    assert [e.status for e in gets] == [429, 200]
    assert 0.95 <= gets[1].start - gets[0].start < 3
    assert _retries(proc.stderr) == 1


@pytest.mark.parametrize("fault", [http_error(503), reset_after(1000)], ids=["503", "reset"])
def test_persistent_failure_ends_cleanly(registry, store: Path, fault: Fault) -> None:
    """More failures than --retries: exit 6, one clear error line, no traceback, no model."""
    files = _files({"w.bin": MiB}, seed=3)
    digest = sha256(files["w.bin"])
    _push_modelpack(registry, "faults/down", files)
    with FaultProxy(registry.host) as proxy:
        proxy.inject(fault, times=3)
        proc = _pull(proxy.host, "faults/down", store, "-q", "--retries", "2")
        attempts = len(proxy.blob_gets(digest))
    line = _assert_one_line_error(proc, 6)
    assert "gave up after 3 attempts" in line
    assert attempts == 3
    assert _no_views(store)
    assert not (store / "blobs" / "sha256" / digest[7:]).exists()


# -- integrity -----------------------------------------------------------------


def test_corrupt_blob_is_refused_then_refetched(registry, store: Path) -> None:
    """A flipped byte on both tries fails the sha256 check (exit 5) after one more fetch: nothing is
    kept, and a clean pull then works."""
    files = _files({"w.bin": MiB // 2}, seed=4)  # one chunk: one GET per try
    digest = sha256(files["w.bin"])
    _push_modelpack(registry, "faults/corrupt", files)
    with FaultProxy(registry.host) as proxy:
        proxy.inject(flip_byte(1234), times=2)
        bad = _pull(proxy.host, "faults/corrupt", store, "-q")
        line = _assert_one_line_error(bad, 5)
        assert digest in line and "fetched twice" in line
        assert proxy.served(digest) == 2 * len(files["w.bin"])
        assert not (store / "blobs" / "sha256" / digest[7:]).exists()
        assert not (store / "ingest" / digest[7:]).exists(), "corrupt partial data must not be resumed"
        assert _no_views(store)
        proxy.clear()
        good = _pull(proxy.host, "faults/corrupt", store)
        assert proxy.served(digest) == len(files["w.bin"])
    assert good.returncode == 0, good.stderr
    assert tree_digests(_view(good)) == _digests(files)


def test_a_flipped_byte_once_costs_one_more_fetch(registry, store: Path) -> None:
    """Bytes corrupted on the way once: the blob is discarded and fetched again, and the pull succeeds."""
    files = _files({"w.bin": 3 * MiB + 10_000}, seed=14)  # every chunk longer than the flip's offset
    digest = sha256(files["w.bin"])
    _push_modelpack(registry, "faults/corrupt-once", files)
    with FaultProxy(registry.host) as proxy:
        proxy.inject(flip_byte(4321))
        proc = _pull(proxy.host, "faults/corrupt-once", store)
        served = proxy.served(digest)
    assert proc.returncode == 0, proc.stderr
    assert served == 2 * len(files["w.bin"])
    assert tree_digests(_view(proc)) == _digests(files)
    assert not (store / "ingest" / digest[7:]).exists()


def test_a_registry_ignoring_range_is_read_once(registry, store: Path) -> None:
    """Every ranged GET answered 200 with the whole blob: the blob goes over the wire about once
    (it used to be read from byte 0 for every chunk: 2.3 GB for 64 MiB), and lands byte-exact."""
    files = _files({"w.bin": 24 * MiB + 5, "small.bin": 100_000}, seed=15)
    digest = sha256(files["w.bin"])
    _push_modelpack(registry, "faults/norange", files)
    with FaultProxy(registry.host, ignore_range=True, rate=64 * MiB) as proxy:
        proc = _pull(proxy.host, "faults/norange", store)
        gets = proxy.blob_gets(digest)
    assert proc.returncode == 0, proc.stderr
    assert tree_digests(_view(proc)) == _digests(files)
    assert all(e.status == 200 for e in gets)
    sent = sum(e.bytes for e in gets)
    assert len(files["w.bin"]) <= sent <= len(files["w.bin"]) + 2 * MiB, sent
    assert len(gets) <= 8 + 1  # the first round of ranges (refused at their head), then one stream


# -- crash and resume ----------------------------------------------------------


def test_kill_9_then_resume_fetches_only_missing_chunks(registry, store: Path) -> None:
    """After SIGKILL mid-pull, the next pull asks for exactly the chunks not recorded durable."""
    files = _files({"big.bin": 40 * MiB, "sub/other.bin": 24 * MiB - 5}, seed=5)
    sizes = {sha256(d): len(d) for d in files.values()}
    _push_modelpack(registry, "faults/resume", files)
    with FaultProxy(registry.host, rate=16 * MiB) as slow:
        proc = subprocess.Popen(_cmd(store, f"oci://{slow.host}/faults/resume:v1", "-q"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline:
                if sum(len(_done(store, d, n)) for d, n in sizes.items()) >= 8:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.02)
        finally:
            _stop(proc)
    assert proc.returncode == -signal.SIGKILL, "the pull should have been killed midway"
    done = {d: _done(store, d, n) for d, n in sizes.items()}
    missing = {d: sorted(set(range(-(-n // MiB))) - set(done[d])) for d, n in sizes.items()}
    assert 8 <= sum(map(len, done.values())) and any(missing.values())

    with FaultProxy(registry.host) as proxy:
        again = _pull(proxy.host, "faults/resume", store)
        asked = {d: sorted(e.range_start // MiB for e in proxy.blob_gets(d)) for d in sizes}
        served = {d: proxy.served(d) for d in sizes}
    assert again.returncode == 0, again.stderr
    assert asked == missing
    assert served == {d: n - _chunk_bytes(done[d], n) for d, n in sizes.items()}
    view = _view(again)
    assert all((view / name).read_bytes() == data for name, data in files.items())
    assert tree_digests(view) == _digests(files)


# -- interrupts keep what arrived --------------------------------------------------


def _wait_for(condition, proc: subprocess.Popen | None, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, f"{what}: the process ended first"
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.01)


def _partial_bytes(store: Path, digest: str) -> int:
    """Leading bytes of chunks the ingest keeps in part (the ``partial`` list beside its record)."""
    from modelcache.store.content import read_partial

    raw = (store / "ingest" / digest[7:] / "chunks").read_bytes()
    _magic, size, chunk_size = RECORD_HEADER.unpack_from(raw)
    flags = raw[RECORD_HEADER.size:]
    return sum(n for i, n in read_partial(store / "ingest" / digest[7:], size, chunk_size).items() if flags[i] != 1)


def _durable(store: Path, digest: str) -> int:
    """Bytes of an ingest the store holds durable: whole chunks, and kept parts of others."""
    from modelcache.store.content import ContentStore

    [status] = [i for i in ContentStore(store).ingests() if i.digest == digest]
    assert status.bytes_done - _partial_bytes(store, digest) == sum(
        min(status.chunk_size, status.size - i * status.chunk_size)
        for i in _done(store, digest, status.size, chunk=status.chunk_size))
    return status.bytes_done


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_pull_keeps_partial_chunks(registry, store: Path, sig: int) -> None:
    """Ctrl-C (or SIGTERM) with both streams inside 4 MiB chunks: every byte received is kept, partial
    chunks included, so the next pull fetches only what never arrived (it used to fetch it all again)."""
    files = _files({"w.bin": 12 * MiB + 3}, seed=16)
    digest = sha256(files["w.bin"])
    size = len(files["w.bin"])
    _push_modelpack(registry, "faults/interrupt", files)
    cmd = [sys.executable, "-m", "modelcache", "--store", str(store), "pull", "-q", "--chunk-size", "4M",
           "--concurrency", "2"]
    with FaultProxy(registry.host, rate=4 * MiB) as slow:
        proc = subprocess.Popen([*cmd, f"oci://{slow.host}/faults/interrupt:v1"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # Both streams well into their first chunk, none of it durable yet as whole chunks.
            _wait_for(lambda: slow.served(digest) >= 3 * MiB, proc, "3 MiB served")
            proc.send_signal(sig)
            _out, err = proc.communicate(timeout=30)
        finally:
            _stop(proc)
        time.sleep(0.3)  # the proxy notices the hang-up
        first = slow.served(digest)
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), err
    assert "interrupted (partial downloads are kept" in err and "Traceback" not in err
    assert _partial_bytes(store, digest) > 0, "chunks received in part were not kept"
    durable = _durable(store, digest)
    assert first - 256 * 1024 <= durable <= first, (durable, first)

    with FaultProxy(registry.host) as proxy:
        again = _pull(proxy.host, "faults/interrupt", store, "--chunk-size", "4M")
        second = proxy.served(digest)
    assert again.returncode == 0, again.stderr
    assert (_view(again) / "w.bin").read_bytes() == files["w.bin"]
    assert second == size - durable
    assert first + second <= size + 256 * 1024, (first, second)  # what crossed twice: at most a few pieces


def test_daemon_sigterm_keeps_what_arrived(registry, tmp_path: Path) -> None:
    """SIGTERM while a POST /v1/pulls job runs: the daemon drains keeping every byte received; after a
    restart, the same pull fetches only the rest."""
    from daemon_support import start_daemon

    files = _files({"w.bin": 10 * MiB + 7}, seed=17)
    digest = sha256(files["w.bin"])
    size = len(files["w.bin"])
    _push_modelpack(registry, "faults/drain", files)
    with FaultProxy(registry.host, rate=3 * MiB) as slow:
        daemon = start_daemon(tmp_path / "d1", "--chunk-size", "4M", "--concurrency", "2")
        try:
            status, job = daemon.call("POST", "/v1/pulls", {"ref": f"oci://{slow.host}/faults/drain:v1"})
            assert status == 202, job
            _wait_for(lambda: slow.served(digest) >= 2 * MiB, daemon.process, "2 MiB served")
            assert daemon.stop(signal.SIGTERM) == 0, daemon.log.read_text()
        finally:
            daemon.stop(signal.SIGKILL)
        time.sleep(0.3)
        first = slow.served(digest)
    store = daemon.store
    assert _partial_bytes(store, digest) > 0, "chunks received in part were not kept"
    durable = _durable(store, digest)
    assert first - 256 * 1024 <= durable <= first, (durable, first)

    with FaultProxy(registry.host) as proxy:
        again = start_daemon(tmp_path / "d2", "--chunk-size", "4M", store=store)
        try:
            status, job = again.call("POST", "/v1/pulls", {"ref": f"oci://{proxy.host}/faults/drain:v1"})
            assert status == 202, job
            done = again.wait_pull(job["id"])
        finally:
            again.stop()
        second = proxy.served(digest)
    assert done["state"] == "done", done
    assert (Path(done["path"]) / "w.bin").read_bytes() == files["w.bin"]
    assert second == size - durable
    assert first + second <= size + 256 * 1024, (first, second)


# -- one download for everyone -------------------------------------------------


def test_two_processes_download_each_byte_once(registry, store: Path) -> None:
    """Two processes pulling one model into one store at once: each blob byte is served once."""
    files = _files({"a.bin": 6 * MiB, "b.bin": 4 * MiB, "c.bin": 5 * MiB + 1}, seed=6)
    _push_modelpack(registry, "faults/twice", files)
    with FaultProxy(registry.host, rate=8 * MiB) as proxy:
        cmd = _cmd(store, f"oci://{proxy.host}/faults/twice:v1", "-q")
        # No blob byte flows until both processes have resolved: they overlap however slowly each starts
        # (under load the second one could start after the first had finished: the flake this replaces).
        proxy.hold()
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        try:
            _wait_for(lambda: len([e for e in proxy.requests("/manifests/") if e.method == "GET"]) >= 2, None,
                      "both processes resolved", timeout=60)
            proxy.hold(False)
            outs = [p.communicate(timeout=60) for p in procs]
        finally:
            for p in procs:
                _stop(p)
        served = {name: proxy.served(sha256(data)) for name, data in files.items()}
        manifests = [e for e in proxy.requests("/manifests/") if e.method == "GET"]
        last_byte = max(e.end for e in proxy.blob_gets())
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(paths) == 1
    assert tree_digests(Path(paths.pop())) == _digests(files)
    assert served == {name: len(data) for name, data in files.items()}
    assert len(manifests) == 2 and max(m.start for m in manifests) < last_byte, "the pulls did not overlap"


def test_concurrent_pulls_in_one_process_share_blobs(registry, tmp_path: Path) -> None:
    """Two pull() calls at once on one Store and Engine fetch each byte once."""
    from modelcache.pull import pull
    from modelcache.store import Store
    from modelcache.transfer import Engine, TransferConfig

    files = _files({"a.bin": 5 * MiB, "b.bin": 3 * MiB + 7}, seed=7)
    _push_modelpack(registry, "faults/inproc", files)

    async def both(ref: str) -> list:
        store = Store(tmp_path / "store")
        engine = Engine(store.content, TransferConfig(chunk_size=MiB))
        try:
            return await asyncio.gather(pull(store, engine, ref), pull(store, engine, ref))
        finally:
            engine.close()
            store.close()

    with FaultProxy(registry.host, rate=16 * MiB) as proxy:
        first, second = asyncio.run(both(f"oci://{proxy.host}/faults/inproc:v1"))
        served = {name: proxy.served(sha256(data)) for name, data in files.items()}
    assert first.path == second.path
    assert tree_digests(first.path) == _digests(files)
    assert served == {name: len(data) for name, data in files.items()}


SHARED = _files({"shared": 2 * MiB + 11, "only-first": MiB, "only-second": MiB + 3}, seed=8)


def _push_pair(registry, kind: str) -> tuple[str, str, dict[str, str]]:
    """Push faults/<kind>-1 and -2 sharing SHARED['shared'].

    Returns the blob the second pull must not fetch, the one it must, and its tree.
    """
    shared, first, second = SHARED["shared"], SHARED["only-first"], SHARED["only-second"]
    raw = {"config_type": MP_CONFIG, "artifact_type": MP_ARTIFACT, "config": b"{}"}
    if kind == "raw":  # ModelPack .raw layers: the blob is the file
        registry.push_image(f"faults/{kind}-1", "v1", [
            (shared, MP_WEIGHT, {"org.cncf.model.filepath": "shared.bin"}),
            (first, MP_WEIGHT, {"org.cncf.model.filepath": "first.bin"})], **raw)
        registry.push_image(f"faults/{kind}-2", "v1", [
            (shared, MP_WEIGHT, {"org.cncf.model.filepath": "renamed/shared.bin"}),
            (second, MP_WEIGHT, {"org.cncf.model.filepath": "second.bin"})], **raw)
        return sha256(shared), sha256(second), {"renamed/shared.bin": sha256(shared), "second.bin": sha256(second)}
    layer = _tar({"models/shared.bin": shared})
    registry.push_image(f"faults/{kind}-1", "v1", [
        (layer, LAYER_TAR, None), (_tar({"models/first.bin": first}), LAYER_TAR, None)])
    if kind == "tar":  # image layers: the second image reuses the first one's layer
        new_layer = _tar({"models/second.bin": second})
        registry.push_image(f"faults/{kind}-2", "v1", [(layer, LAYER_TAR, None), (new_layer, LAYER_TAR, None)])
        return sha256(layer), sha256(new_layer), {"models/shared.bin": sha256(shared),
                                                   "models/second.bin": sha256(second)}
    # "unpacked": a file unpacked from an image layer, then asked for as a .raw blob
    registry.push_image(f"faults/{kind}-2", "v1", [
        (shared, MP_WEIGHT, {"org.cncf.model.filepath": "shared.bin"}),
        (second, MP_WEIGHT, {"org.cncf.model.filepath": "second.bin"})], **raw)
    return sha256(shared), sha256(second), {"shared.bin": sha256(shared), "second.bin": sha256(second)}


@pytest.mark.parametrize("kind", ["raw", "tar", "unpacked"])
def test_content_already_stored_is_not_downloaded(registry, store: Path, kind: str) -> None:
    """A model whose file (or layer) another model already brought into the store fetches only the rest."""
    reused, new, expected = _push_pair(registry, kind)
    with FaultProxy(registry.host) as proxy:
        assert _pull(proxy.host, f"faults/{kind}-1", store).returncode == 0
        proxy.clear()
        proc = _pull(proxy.host, f"faults/{kind}-2", store)
        fetched = {e.digest for e in proxy.blob_gets() if e.bytes}
        reused_bytes = proxy.served(reused)
    assert proc.returncode == 0, proc.stderr
    assert reused_bytes == 0
    assert fetched == {new}
    view = _view(proc)
    assert tree_digests(view) == expected
    shared_path = next(p for p, d in expected.items() if d == sha256(SHARED["shared"]))
    blob = store / "blobs" / "sha256" / sha256(SHARED["shared"])[7:]
    assert os.stat(view / shared_path).st_ino == os.stat(blob).st_ino


# -- redirects -----------------------------------------------------------------


class _RedirectingRegistry:
    """A minimal registry behind basic auth whose blob GETs redirect (307) to a separate 'CDN' host."""

    USER, PASSWORD = "puller", "s3cret"

    def __init__(self, blobs: dict[str, bytes], manifest: bytes) -> None:
        self.blobs = blobs
        self.manifest = manifest
        self.cdn_host = ""
        self.registry_log: list[tuple[str, str | None]] = []  # (path, Authorization)
        self.cdn_log: list[dict[str, str]] = []  # request headers
        self.basic = "Basic " + base64.b64encode(f"{self.USER}:{self.PASSWORD}".encode()).decode()

    async def registry(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization")
        self.registry_log.append((request.path, auth))
        if auth != self.basic:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="test"'})
        if "/manifests/" in request.path:
            return web.Response(body=self.manifest, content_type="application/vnd.oci.image.manifest.v1+json")
        if "/blobs/" in request.path:
            digest = request.path.rsplit("/", 1)[-1]
            return web.Response(status=307, headers={"Location": f"http://{self.cdn_host}/cdn/{digest}?sig=x"})
        return web.Response(text="{}")

    async def cdn(self, request: web.Request) -> web.StreamResponse:
        self.cdn_log.append(dict(request.headers))
        data = self.blobs.get(request.path.rsplit("/", 1)[-1])
        if data is None:
            return web.Response(status=404)
        if not request.headers.get("Range"):
            return web.Response(body=data)
        start, end = (int(x) for x in request.headers["Range"].removeprefix("bytes=").split("-"))
        return web.Response(status=206, body=data[start:end + 1],
                            headers={"Content-Range": f"bytes {start}-{end}/{len(data)}"})


def test_redirected_blob_gets_carry_no_registry_credentials(tmp_path: Path) -> None:
    """The registry gets the docker config.json credentials; the host a blob GET redirects to never does."""
    weights = _files({"w.bin": 3 * MiB + 5}, seed=9)["w.bin"]
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": MP_ARTIFACT,
        "config": {"mediaType": MP_CONFIG, "digest": sha256(b"{}"), "size": 2},
        "layers": [{"mediaType": MP_WEIGHT, "digest": sha256(weights), "size": len(weights),
                    "annotations": {"org.cncf.model.filepath": "w.bin"}}],
    }).encode()
    fake = _RedirectingRegistry({sha256(weights): weights, sha256(b"{}"): b"{}"}, manifest)
    with BackgroundServer(fake.cdn, ip="127.0.0.2") as cdn, BackgroundServer(fake.registry) as reg:
        fake.cdn_host = cdn.host
        config = tmp_path / "docker"
        config.mkdir()
        auth = base64.b64encode(f"{fake.USER}:{fake.PASSWORD}".encode()).decode()
        (config / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
        proc = run_cli("pull", "--chunk-size", "1M", f"oci://{reg.host}/private/model:v1",
                       store=tmp_path / "store", env={"DOCKER_CONFIG": str(config)}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (_view(proc) / "w.bin").read_bytes() == weights
    blob_gets = [auth for path, auth in fake.registry_log if "/blobs/" in path]
    assert len(blob_gets) >= 4 and all(a == fake.basic for a in blob_gets)  # four 1 MiB ranges, all logged in
    # One CDN fetch per chunk (the first blob GETs may reach the registry twice
    # while the client learns that this registry redirects).
    assert len(fake.cdn_log) == 4
    assert all("Range" in h for h in fake.cdn_log)
    assert not any(k.lower() == "authorization" for h in fake.cdn_log for k in h), fake.cdn_log


# -- the same bad origins in front of S3 (SeaweedFS) ----------------------------------


@pytest.mark.parametrize("mode", ["truncate", "ignore-range"])
def test_s3_bad_origins(s3_server, tmp_path: Path, mode: str) -> None:
    """Through the fault proxy in front of SeaweedFS (presigned URLs hold: the client's Host goes
    upstream): bodies cut short resume where they stopped, and an endpoint ignoring Range is read once."""
    s3 = s3_server.client()
    bucket = f"faults-{mode}"
    s3.create_bucket(Bucket=bucket)
    data = _files({"w": 6 * MiB + 400_000}, seed=18)["w"]  # every chunk longer than the truncation point
    s3.put_object(Bucket=bucket, Key="m/w.bin", Body=data)
    upstream = s3_server.endpoint.removeprefix("http://")
    with FaultProxy(upstream, blobs=f"/{bucket}/m/", ignore_range=mode == "ignore-range", rate=64 * MiB) as proxy:
        if mode == "truncate":
            proxy.inject(truncate_after(300_000), times=2)
        env = {**s3_server.env(), "AWS_ENDPOINT_URL": f"http://{proxy.host}"}
        proc = run_cli("pull", "--chunk-size", "1M", f"s3://{bucket}/m", store=tmp_path / "store", env=env,
                       timeout=60)
        gets = [e for e in proxy.requests("w.bin") if e.method == "GET"]
    assert proc.returncode == 0, proc.stderr
    assert (_view(proc) / "w.bin").read_bytes() == data
    sent = sum(e.bytes for e in gets)
    if mode == "truncate":
        assert sent == len(data), "a byte was fetched twice"
        assert sum(1 for e in gets if e.range_start % MiB) == 2, [e.range for e in gets]
    else:
        assert all(e.status == 200 for e in gets)
        assert len(data) <= sent <= len(data) + 2 * MiB, sent
        assert len(gets) <= 8 + 1
