"""The disk budget: space reserved before a pull, LRU models no lease holds evicted to make room, shared
blobs kept, and a clear NoSpace naming the holders when nothing can go."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from daemon_support import start_daemon
from support import MP_ARTIFACT, MP_CONFIG, MP_WEIGHT, sha256, tree_digests, write_random

from modelcache.errors import NoSpace
from modelcache.pull import pull
from modelcache.store import Store
from modelcache.store.budget import Budget
from modelcache.transfer import Engine

MIB = 1 << 20
SHARED = os.urandom(64 << 10)


def _dir_model(root: Path, seed: int) -> Path:
    write_random(root / "weights.bin", MIB, seed=seed)
    (root / "tokenizer.json").write_bytes(SHARED)
    return root


def _pull(store: Store, src: Path, budget: Budget) -> Path:
    async def go() -> Path:
        engine = Engine(store.content)
        try:
            return (await pull(store, engine, str(src), budget=budget)).path
        finally:
            engine.close()
    return asyncio.run(go())


def test_pull_evicts_least_recently_used_and_keeps_shared_blobs(tmp_path: Path) -> None:
    """Over budget, the oldest unleased model goes before the pull fetches; a blob it shared stays."""
    store = Store(tmp_path / "s")
    budget = Budget(max_size=int(2.5 * MIB))
    a, b, c = (_dir_model(tmp_path / name, seed) for name, seed in (("a", 1), ("b", 2), ("c", 3)))
    view_a = _pull(store, a, budget)
    time.sleep(0.01)
    view_b = _pull(store, b, budget)
    assert view_a.is_dir() and store.disk_usage() == 2 * MIB + len(SHARED)
    view_c = _pull(store, c, budget)
    assert not view_a.exists()
    assert tree_digests(view_b) == tree_digests(b) and tree_digests(view_c) == tree_digests(c)
    assert store.disk_usage() == 2 * MIB + len(SHARED) <= budget.max_size
    assert [lease.id for lease in store.index.leases()] == []  # pulls release their leases and reservations
    assert store.index.reserved() == 0


def test_nothing_evictable_fails_at_once_naming_the_holders(tmp_path: Path) -> None:
    """Every model pinned or mounted: the next pull fails before fetching, naming what holds the space."""
    store = Store(tmp_path / "s")
    budget = Budget(max_size=int(2.5 * MIB))
    a, b, c = (_dir_model(tmp_path / name, seed) for name, seed in (("a", 1), ("b", 2), ("c", 3)))
    view_a, view_b = _pull(store, a, budget), _pull(store, b, budget)
    assert store.index.pin("sha256:" + view_a.name, "prewarm/a")
    store.index.add_lease("vol-9", kind="mount", owner="daemon", views=["sha256:" + view_b.name])
    with pytest.raises(NoSpace) as err:
        _pull(store, c, budget)
    message = str(err.value)
    assert str(store.root) in message and f"needs {MIB} bytes" in message
    assert f"{a} (" in message and "pin by prewarm/a" in message and f"{b} (" in message and "mount" in message
    assert not store.content.has(sha256((c / "weights.bin").read_bytes()))  # nothing fetched
    assert view_a.is_dir() and view_b.is_dir() and store.index.reserved() == 0


def test_min_free_counts_the_filesystem(tmp_path: Path) -> None:
    """--min-free larger than the disk's free space leaves no room: the pull is refused at once."""
    store = Store(tmp_path / "s")
    src = _dir_model(tmp_path / "a", 1)
    with pytest.raises(NoSpace, match="needs"):
        _pull(store, src, Budget(min_free_ratio=0.999999))
    assert store.disk_usage() == 0


def test_daemon_keeps_its_budget(tmp_path: Path, registry, monkeypatch) -> None:
    """`serve` with MODELCACHE_MAX_SIZE evicts the LRU model for a new pull; /metrics reads the index."""
    refs = []
    for i in range(3):
        weights = os.urandom(MIB)
        registry.push_image(f"budget/m{i}", "v1", [(weights, MP_WEIGHT, {"org.cncf.model.filepath": "w.bin"}),
                                                   (SHARED, MP_WEIGHT, {"org.cncf.model.filepath": "tok.json"})],
                            config=b"{}", config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)
        refs.append(f"oci://{registry.host}/budget/m{i}:v1")
    monkeypatch.setenv("MODELCACHE_MAX_SIZE", "2560K")  # the flag, through its environment variable
    daemon = start_daemon(tmp_path / "node")
    try:
        for ref in refs:
            job = daemon.wait_pull(daemon.call("POST", "/v1/pulls", {"ref": ref})[1]["id"])
            assert job["state"] == "done", job
            time.sleep(0.01)
        models = daemon.call("GET", "/v1/models")[1]["models"]
        assert sorted(m["ref"] for m in models) == sorted(refs[1:])
        assert daemon.metric("modelcache_store_bytes_used") == 2 * MIB + len(SHARED)
        for m in models:
            assert daemon.call("PUT", f"/v1/pins/{m['view']}?owner=prewarm")[0] == 200
        job = daemon.wait_pull(daemon.call("POST", "/v1/pulls", {"ref": refs[0]})[1]["id"])
        assert job["state"] == "failed" and job["error"]["code"] == "NoSpace", job
        assert all(ref in job["error"]["message"] for ref in refs[1:])
        unpinned = next(m for m in models if m["ref"] == refs[1])
        assert daemon.call("DELETE", f"/v1/pins/{unpinned['view']}?owner=prewarm")[0] == 200
    finally:
        daemon.stop()
    # Restarted with a smaller budget, the daemon evicts what no lease holds before it serves.
    monkeypatch.setenv("MODELCACHE_MAX_SIZE", "1200K")
    daemon = start_daemon(tmp_path / "node")
    try:
        assert [m["ref"] for m in daemon.call("GET", "/v1/models")[1]["models"]] == [refs[2]]
    finally:
        daemon.stop()
