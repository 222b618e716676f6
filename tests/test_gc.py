"""`modelcache gc`: LRU eviction that never touches pinned or leased models, and never a shared file."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from support import run_cli, sha256, tree_digests, write_random

from modelcache.store import Store


def _pull_dir(store: Path, src: Path) -> Path:
    proc = run_cli("pull", "-q", str(src), store=store, check=True)
    return Path(proc.stdout.strip().splitlines()[-1])


def _models(tmp_path: Path) -> tuple[Path, Path, bytes]:
    shared = os.urandom(64 << 10)
    for name, seed in (("old", 1), ("new", 2)):
        write_random(tmp_path / name / "weights.bin", 1 << 20, seed=seed)
        (tmp_path / name / "tokenizer.json").write_bytes(shared)
    return tmp_path / "old", tmp_path / "new", shared


def _gc(store: Path, *args: str) -> dict:
    return json.loads(run_cli("gc", "--json", *args, store=store, check=True).stdout)


def test_gc_without_budget_keeps_every_model(tmp_path: Path) -> None:
    """Plain gc removes only blobs no view uses; every model stays readable."""
    store = tmp_path / "store"
    old, new, _ = _models(tmp_path)
    views = [_pull_dir(store, old), _pull_dir(store, new)]
    report = _gc(store)
    assert report["views_removed"] == [] and report["blobs_removed"] == 0
    assert all(tree_digests(v) for v in views)


def test_gc_evicts_least_recently_used_and_keeps_shared_blobs(tmp_path: Path) -> None:
    """Over budget, the older model goes; the file it shared with the newer one stays."""
    store = tmp_path / "store"
    old, new, shared = _models(tmp_path)
    old_view = _pull_dir(store, old)
    time.sleep(0.05)
    new_view = _pull_dir(store, new)
    report = _gc(store, "--max-size", "1500K")
    assert report["views_removed"] == ["sha256:" + old_view.name]
    assert not old_view.exists()
    assert tree_digests(new_view)["tokenizer.json"] == sha256(shared)
    assert report["bytes_freed"] == 1 << 20  # old weights only: the tokenizer is still linked
    listed = json.loads(run_cli("ls", "--json", store=store, check=True).stdout)
    assert [r["path"] for r in listed] == [str(new_view)]


def test_gc_never_evicts_pinned_or_leased_models(tmp_path: Path) -> None:
    """Pins and leases protect a view even when the budget is zero."""
    store = tmp_path / "store"
    old, new, _ = _models(tmp_path)
    old_view, new_view = _pull_dir(store, old), _pull_dir(store, new)
    s = Store(store)
    assert s.index.pin("sha256:" + old_view.name, "prewarm-a")
    s.index.add_lease("vol-1", kind="mount", owner="daemon", views=["sha256:" + new_view.name])
    s.close()
    report = _gc(store, "--max-size", "0")
    assert report["views_removed"] == []
    assert old_view.is_dir() and new_view.is_dir()


def test_gc_zero_budget_empties_an_unprotected_store(tmp_path: Path) -> None:
    """--max-size 0 evicts everything unprotected and frees every blob."""
    store = tmp_path / "store"
    old, new, _ = _models(tmp_path)
    _pull_dir(store, old)
    _pull_dir(store, new)
    report = _gc(store, "--max-size", "0")
    assert len(report["views_removed"]) == 2
    assert report["bytes_kept"] == 0
    assert not any((store / "blobs" / "sha256").iterdir())


def test_verify_delete_moves_a_mounted_corrupt_view_aside(tmp_path: Path) -> None:
    """A corrupt blob in a leased view: the view is moved aside (not deleted), and a re-pull is clean."""
    store = tmp_path / "store"
    old, _new, _ = _models(tmp_path)
    view = _pull_dir(store, old)
    s = Store(store)
    s.index.add_lease("vol-1", kind="mount", owner="daemon", holder="{}", views=["sha256:" + view.name])
    s.close()
    blob = store / "blobs" / "sha256" / sha256((old / "weights.bin").read_bytes())[7:]
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.write(b"\0\0\0")
    proc = run_cli("verify", "--json", "--delete", store=store)
    assert proc.returncode == 5
    [corrupt] = json.loads(proc.stdout)["corrupt"]
    [aside] = corrupt["moved_aside"]
    assert Path(aside).is_dir() and not view.exists()
    fresh = _pull_dir(store, old)
    assert fresh == view and tree_digests(fresh) == tree_digests(old)
    # gc keeps the aside tree while the pod's lease stands, and removes it once the volume is gone.
    assert _gc(store)["corrupt_views_removed"] == [] and Path(aside).is_dir()
    s = Store(store)
    s.index.drop_lease("vol-1")
    s.close()
    assert _gc(store)["corrupt_views_removed"] == [Path(aside).name]
    assert not Path(aside).exists() and tree_digests(fresh) == tree_digests(old)
