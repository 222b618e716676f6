"""Scrub: xxh3 recorded at commit, `verify` (xxh3 by default, sha256 on demand), and the daemon's background
scrub at a bounded rate, taking corrupt blobs out of service (views dropped, or moved aside when mounted)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sqlite3
import time
from pathlib import Path

import pytest
import xxhash
from daemon_support import mountinfo, publish_request, start_daemon, unmount_all_below
from support import run_cli, sha256, tree_digests, write_random

from modelcache.csi import csi_pb2 as pb
from modelcache.store import Store
from modelcache.store.scrub import Scrubber, check_blob, take_out_of_service, verify


def _model(root: Path, seed: int) -> Path:
    write_random(root / "weights.bin", 512 << 10, seed=seed)
    (root / "config.json").write_text(json.dumps({"seed": seed}))
    return root


def _pull(store: Path, src: Path) -> Path:
    return Path(run_cli("pull", "-q", str(src), store=store, check=True).stdout.split()[-1])


def _blob(store: Path, data: bytes) -> Path:
    return store / "blobs" / "sha256" / sha256(data)[7:]


def _corrupt(path: Path, at: int = 100) -> bytes:
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))
    return path.read_bytes()


def _xxh3_rows(store: Path) -> dict[str, str | None]:
    db = sqlite3.connect(store / "index.sqlite")
    try:
        return dict(db.execute("SELECT digest, xxh3 FROM blobs").fetchall())
    finally:
        db.close()


def _set_xxh3(store: Path, digest: str, value: str | None) -> None:
    db = sqlite3.connect(store / "index.sqlite")
    with db:
        db.execute("UPDATE blobs SET xxh3 = ? WHERE digest = ?", (value, digest))
    db.close()


def test_commit_records_xxh3_of_every_blob(tmp_path: Path) -> None:
    """Blobs fetched in chunks and files unpacked from a stream both get the xxh3-128 of their bytes."""
    store = tmp_path / "s"
    src = _model(tmp_path / "m", 1)
    _pull(store, src)
    s = Store(store)
    try:
        digest, _ = s.content.write_stream(io.BytesIO(b"unpacked" * 1000))
    finally:
        s.close()
    rows = _xxh3_rows(store)
    assert len(rows) == 3
    for d, x in rows.items():
        assert x == xxhash.xxh3_128((store / "blobs" / "sha256" / d[7:]).read_bytes()).hexdigest()


def test_verify_uses_xxh3_by_default_and_sha256_with_the_flag(tmp_path: Path) -> None:
    """A corrupt blob whose xxh3 row was made to match the bad bytes passes plain `verify` (which trusts the
    recorded xxh3) and is caught by `verify --sha256`, which then deletes it and its view."""
    store, src = tmp_path / "s", _model(tmp_path / "m", 2)
    view = _pull(store, src)
    blob = _blob(store, (src / "weights.bin").read_bytes())
    bad = _corrupt(blob)
    _set_xxh3(store, "sha256:" + blob.name, xxhash.xxh3_128(bad).hexdigest())  # a stale row
    plain = run_cli("verify", "--json", store=store)
    assert plain.returncode == 0 and json.loads(plain.stdout) == {"checked": 2, "corrupt": []}
    strict = run_cli("verify", "--json", "--sha256", "--delete", store=store)
    assert strict.returncode == 5, strict.stderr
    [found] = json.loads(strict.stdout)["corrupt"]
    assert (found["blob"], found["actual"]) == ("sha256:" + blob.name, sha256(bad))
    assert found["views"] == ["sha256:" + view.name] and found["deleted"]
    assert not blob.exists() and not view.exists()
    assert tree_digests(_pull(store, src)) == tree_digests(src)


def test_a_wrong_or_missing_xxh3_row_never_costs_a_good_blob(tmp_path: Path) -> None:
    """xxh3 mismatch on good bytes: sha256 overrules it and the row is corrected; no row: sha256 is used and the
    row is filled in. Nothing is reported corrupt or deleted."""
    store, src = tmp_path / "s", _model(tmp_path / "m", 3)
    view = _pull(store, src)
    weights, config = (sha256((src / n).read_bytes()) for n in ("weights.bin", "config.json"))
    good = _xxh3_rows(store)
    _set_xxh3(store, weights, "0" * 32)
    _set_xxh3(store, config, None)
    proc = run_cli("verify", "--json", "--delete", store=store)
    assert proc.returncode == 0 and json.loads(proc.stdout)["corrupt"] == []
    assert _xxh3_rows(store) == good and tree_digests(view) == tree_digests(src)


def test_a_blob_that_vanishes_under_verify_is_gone_not_corrupt(tmp_path: Path) -> None:
    """Removed before it is read: gone. Replaced by a good copy after it was found corrupt: kept."""
    s = Store(tmp_path / "s")
    try:
        digest, _ = s.content.write_stream(io.BytesIO(b"x" * 5000))
        path = s.content.path(digest)
        path.unlink()
        assert check_blob(s, digest).state == "gone" and verify(s, digest, delete=True) is None
        s.content.write_stream(io.BytesIO(b"x" * 5000))
        _corrupt(path)
        verdict = check_blob(s, digest)
        assert verdict.state == "corrupt" and verdict.algorithm == "sha256"
        path.unlink()  # gc removes it, a pull commits it again: a new inode, good bytes
        s.content.write_stream(io.BytesIO(b"x" * 5000))
        assert take_out_of_service(s, verdict) is None and path.read_bytes() == b"x" * 5000
    finally:
        s.close()


def test_a_scrub_pass_keeps_to_its_rate(tmp_path: Path) -> None:
    """Scrubbing 3 MiB at 4 MiB/s takes at least 0.75 s (and every blob is checked with xxh3)."""
    s = Store(tmp_path / "s")
    verdicts = []
    try:
        for _ in range(3):
            s.content.write_stream(io.BytesIO(os.urandom(1 << 20)))
        scrubber = Scrubber(s, 4 << 20, 60.0, on_verdict=verdicts.append)
        started = time.monotonic()
        assert asyncio.run(scrubber.scrub_pass()) == []
        elapsed = time.monotonic() - started
    finally:
        s.close()
    assert elapsed >= 0.75, elapsed
    assert [(v.state, v.algorithm, v.size) for v in verdicts] == [("ok", "xxh3", 1 << 20)] * 3


def _wait(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def scrubbing(tmp_path: Path):
    models = tmp_path / "models"
    d = start_daemon(tmp_path / "node", "--allow-local", str(models), "--scrub-rate", "1G",
                     "--scrub-interval", "0.2")
    try:
        yield d, models
    finally:
        d.stop()
        unmount_all_below(tmp_path)


def test_the_daemon_scrub_takes_corrupt_blobs_out_of_service(scrubbing, tmp_path: Path) -> None:
    """Under a running daemon, a corrupt blob of a pulled model loses its view, and one of a mounted model has
    its view moved aside (the pod keeps its mount); /metrics counts both; pulls after that are byte-exact."""
    daemon, models = scrubbing
    pulled, mounted = _model(models / "pulled", 4), _model(models / "mounted", 5)
    job = daemon.wait_pull(daemon.call("POST", "/v1/pulls", {"ref": str(pulled)})[1]["id"])
    assert job["state"] == "done", job
    view = Path(job["path"])
    target = tmp_path / "pod" / "vol"
    daemon.node().NodePublishVolume(publish_request("vol-1", target, str(mounted)), timeout=60)
    [mounted_view] = [p for p in (daemon.store / "views").iterdir() if p != view]
    _wait(lambda: daemon.metric('modelcache_scrub_blobs_total{algorithm="xxh3"}') >= 4, "a first scrub pass")
    assert daemon.metric("modelcache_scrub_corrupt_total") == 0

    for src in (pulled, mounted):
        _corrupt(_blob(daemon.store, (src / "weights.bin").read_bytes()))
    _wait(lambda: daemon.metric("modelcache_scrub_corrupt_total") == 2, "the scrub to find both")
    assert not view.exists() and not mounted_view.exists()
    [aside] = [p for p in (daemon.store / "views").iterdir() if p.name.startswith(".corrupt-")]
    assert str(target) in mountinfo() and (target / "config.json").read_bytes() == (mounted / "config.json").read_bytes()
    for src in (pulled, mounted):
        assert not _blob(daemon.store, (src / "weights.bin").read_bytes()).exists()

    again = daemon.wait_pull(daemon.call("POST", "/v1/pulls", {"ref": str(pulled)})[1]["id"])
    assert again["state"] == "done" and again["bytes_fetched"] > 0
    assert tree_digests(Path(again["path"])) == tree_digests(pulled)
    second = tmp_path / "pod2" / "vol"
    daemon.node().NodePublishVolume(publish_request("vol-2", second, str(mounted)), timeout=60)
    assert tree_digests(second) == tree_digests(mounted)
    # Once no pod mounts a view of that name, gc removes the tree moved aside.
    for vol, path in (("vol-1", target), ("vol-2", second)):
        daemon.node().NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vol, target_path=str(path)))
    report = json.loads(run_cli("gc", "--json", store=daemon.store, check=True).stdout)
    assert report["corrupt_views_removed"] == [aside.name] and not aside.exists()


def test_drain_cancels_a_slow_scrub(tmp_path: Path) -> None:
    """A scrub crawling at 64 KiB/s through a 4 MiB blob does not hold up SIGTERM: the daemon exits 0 at once."""
    models = tmp_path / "models"
    write_random(models / "big" / "w.bin", 4 << 20, seed=9)
    store = tmp_path / "node" / "store"
    _pull(store, models / "big")
    daemon = start_daemon(tmp_path / "node", "--scrub-rate", "64K", store=store)
    time.sleep(1.0)  # the pass is under way, inside the big blob (a minute's read at this rate)
    assert daemon.metric('modelcache_scrub_blobs_total{algorithm="xxh3"}') == 0
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 5
