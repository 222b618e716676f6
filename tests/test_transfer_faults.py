"""The transfer engine against a misbehaving registry: retries, stalls, corruption, crash and resume.

A fault-injecting proxy (tests/proxy.py) sits in front of the real registry
and counts the blob bytes it serves, so "downloaded once" and "only the
missing chunks" are measured, not assumed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from proxy import Fault, FaultProxy
from support import MP_ARTIFACT, MP_CONFIG, MP_WEIGHT, run_cli, sha256, tree_digests

MiB = 1 << 20


def _push_model(registry, repo: str, sizes: list[int], seed: int = 0) -> dict[str, bytes]:
    """Push a ModelPack artifact of random files; return name -> bytes."""
    rnd = __import__("random").Random(seed)
    files = {f"w{n}.bin": rnd.randbytes(size) for n, size in enumerate(sizes)}
    layers = [(data, MP_WEIGHT, {"org.cncf.model.filepath": name}) for name, data in files.items()]
    registry.push_image(repo, "v1", layers, config=b"{}", config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)
    return files


def _expected(files: dict[str, bytes]) -> dict[str, str]:
    return {name: sha256(data) for name, data in files.items()}


def _pull(proxy: FaultProxy, repo: str, store: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("pull", "--chunk-size", "1M", *extra, f"oci://{proxy.host}/{repo}:v1", store=store)


def _no_views(store: Path) -> bool:
    views = store / "views"
    return not views.exists() or not [p for p in views.iterdir() if not p.name.startswith(".")]


@pytest.mark.parametrize("fault", [
    Fault(status=500), Fault(status=503), Fault(reset_after=300_000), Fault(stall_after=100_000, stall_for=3),
], ids=["500", "503", "reset", "stall"])
def test_pull_survives_transient_faults(registry, store: Path, fault: Fault) -> None:
    """Each fault costs a retry of one chunk, never the pull."""
    files = _push_model(registry, "faults/transient", [3 * MiB, 2 * MiB])
    with FaultProxy(registry.host) as proxy:
        proxy.inject(fault, fault)
        proc = _pull(proxy, "faults/transient", store, "--read-timeout", "1")
    assert proc.returncode == 0, proc.stderr
    assert tree_digests(Path(proc.stdout.split()[-1])) == _expected(files)
    assert ", 2 chunk retries" in proc.stderr


def test_retry_after_is_honoured(registry, store: Path) -> None:
    """A 429 with Retry-After: 1 makes the chunk wait about a second, not a random backoff."""
    _push_model(registry, "faults/slowdown", [MiB // 2])
    with FaultProxy(registry.host) as proxy:
        proxy.inject(Fault(status=429, retry_after="1"))
        proc = _pull(proxy, "faults/slowdown", store)
        first, second = proxy.counters.times[:2]
    assert proc.returncode == 0, proc.stderr
    assert 0.9 <= second - first < 5


def test_persistent_failure_ends_cleanly(registry, store: Path) -> None:
    """More failures than --retries: exit 6, one clear line, no model."""
    _push_model(registry, "faults/down", [MiB])
    with FaultProxy(registry.host) as proxy:
        proxy.inject(*[Fault(status=503)] * 10)
        proc = _pull(proxy, "faults/down", store, "--retries", "2")
    assert proc.returncode == 6
    assert proc.stderr.strip().splitlines()[-1].startswith("modelcache: error:")
    assert "Traceback" not in proc.stderr and "gave up after 3 attempts" in proc.stderr
    assert _no_views(store)


def test_corrupt_bytes_are_refused_then_refetched(registry, store: Path) -> None:
    """A flipped byte fails the sha256 check: nothing is committed, and a clean retry works."""
    files = _push_model(registry, "faults/corrupt", [2 * MiB])
    digest = sha256(files["w0.bin"])
    with FaultProxy(registry.host) as proxy:
        proxy.inject(Fault(flip_at=1234))
        bad = _pull(proxy, "faults/corrupt", store)
        assert bad.returncode == 5, bad.stderr
        assert "Traceback" not in bad.stderr and digest in bad.stderr
        assert not (store / "blobs" / "sha256" / digest[7:]).exists()
        assert _no_views(store)
        good = _pull(proxy, "faults/corrupt", store)
    assert good.returncode == 0, good.stderr
    assert tree_digests(Path(good.stdout.split()[-1])) == _expected(files)


def _done_chunks(store: Path, digest: str) -> int:
    record = store / "ingest" / digest[7:] / "chunks"
    try:
        return record.read_bytes()[24:].count(1)
    except FileNotFoundError:
        return 0


def test_kill_9_then_resume_fetches_only_missing_chunks(registry, store: Path) -> None:
    """After SIGKILL mid-pull, the next pull fetches no chunk that was recorded durable."""
    files = _push_model(registry, "faults/resume", [24 * MiB])
    digest = sha256(files["w0.bin"])
    with FaultProxy(registry.host, rate=6 * MiB) as slow:
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelcache", "--store", str(store), "pull", "-q", "--chunk-size", "1M",
             "--concurrency", "2", f"oci://{slow.host}/faults/resume:v1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while _done_chunks(store, digest) < 6 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    done = _done_chunks(store, digest)
    assert 6 <= done < 24, "the pull should have been killed midway"
    with FaultProxy(registry.host) as proxy:
        again = _pull(proxy, "faults/resume", store)
        served = proxy.served(digest)
    assert again.returncode == 0, again.stderr
    assert tree_digests(Path(again.stdout.split()[-1])) == _expected(files)
    assert served <= (24 - done) * MiB


def test_two_processes_download_each_byte_once(registry, store: Path) -> None:
    """Two concurrent pulls of one model into one store share every blob."""
    files = _push_model(registry, "faults/twice", [6 * MiB, 4 * MiB, 5 * MiB])
    with FaultProxy(registry.host, rate=40 * MiB) as proxy:
        cmd = [sys.executable, "-m", "modelcache", "--store", str(store), "pull", "-q", "--chunk-size", "1M",
               f"oci://{proxy.host}/faults/twice:v1"]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=60) for p in procs]
        served = {name: proxy.served(sha256(data)) for name, data in files.items()}
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    assert outs[0][0].split()[-1] == outs[1][0].split()[-1]
    assert served == {name: len(data) for name, data in files.items()}


def test_concurrent_pulls_in_one_process_share_blobs(registry, tmp_path: Path) -> None:
    """pull() twice at once on one Store and Engine: each byte is fetched once."""
    from modelcache.pull import pull
    from modelcache.store import Store
    from modelcache.transfer import Engine, TransferConfig

    files = _push_model(registry, "faults/inproc", [5 * MiB, 3 * MiB])

    async def both(host: str) -> list:
        store = Store(tmp_path / "store")
        engine = Engine(store.content, TransferConfig(chunk_size=MiB))
        try:
            ref = f"oci://{host}/faults/inproc:v1"
            return await asyncio.gather(pull(store, engine, ref), pull(store, engine, ref))
        finally:
            engine.close()
            store.close()

    with FaultProxy(registry.host, rate=40 * MiB) as proxy:
        first, second = asyncio.run(both(proxy.host))
        served = sum(proxy.served(sha256(d)) for d in files.values())
    assert first.path == second.path
    assert served == sum(len(d) for d in files.values())


def test_file_already_stored_from_another_model_is_not_downloaded(registry, store: Path) -> None:
    """A second model sharing a file with a cached one fetches only its new file."""
    files = _push_model(registry, "faults/first", [2 * MiB], seed=11)
    shared = files["w0.bin"]
    extra = os.urandom(MiB)
    registry.push_image("faults/second", "v1", [
        (shared, MP_WEIGHT, {"org.cncf.model.filepath": "shared.bin"}),
        (extra, MP_WEIGHT, {"org.cncf.model.filepath": "extra.bin"})],
        config=b"{}", config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)
    with FaultProxy(registry.host) as proxy:
        assert _pull(proxy, "faults/first", store).returncode == 0
        proc = _pull(proxy, "faults/second", store)
        assert proc.returncode == 0, proc.stderr
        assert proxy.served(sha256(shared)) == len(shared)
        assert proxy.served(sha256(extra)) == len(extra)
    view = Path(proc.stdout.split()[-1])
    assert os.stat(view / "shared.bin").st_ino == os.stat(store / "blobs" / "sha256" / sha256(shared)[7:]).st_ino
