"""Killed at a chosen step (SIGKILL via MODELCACHE_TEST_CRASH_AT), the store is never left serving a
partial view, and the next gc finishes the job."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from formats_support import REF_NAME, hand_layout
from support import (
    LAYER_TAR,
    OCI_CONFIG,
    OCI_MANIFEST,
    make_tar,
    run_cli,
    sha256,
    tree_digests,
    write_random,
)

from modelcache.store import Store


def _crash(*args: str, store: Path, at: str):
    proc = run_cli(*args, store=store, env={"MODELCACHE_TEST_CRASH_AT": at})
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)
    return proc


def _gc(store: Path, *args: str) -> dict:
    return json.loads(run_cli("gc", "--json", *args, store=store, check=True).stdout)


def _model(tmp_path: Path) -> Path:
    write_random(tmp_path / "m" / "weights.bin", 256 << 10, seed=3)
    (tmp_path / "m" / "config.json").write_text("{}")
    return tmp_path / "m"


def _entries(store: Path) -> list[str]:
    return sorted(p.name for p in (store / "views").iterdir())


def _recorded(store: Path) -> list[str]:
    s = Store(store)
    try:
        return sorted(r.view for r in s.index.records())
    finally:
        s.close()


def test_view_built_but_not_recorded_is_collected(tmp_path: Path) -> None:
    """Killed after building its view, before recording it: nothing is listed; gc removes the view and
    its blobs (the pull's lease died with it); the next pull is whole."""
    store, src = tmp_path / "s", _model(tmp_path)
    _crash("pull", "-q", str(src), store=store, at="view-built")
    [orphan] = _entries(store)
    assert _recorded(store) == [] and len(orphan) == 64
    report = _gc(store)
    assert report["orphans_removed"] == [orphan] and len(report["leases_expired"]) == 1
    assert report["blobs_removed"] == 2 and _entries(store) == []
    view = Path(run_cli("pull", "-q", str(src), store=store, check=True).stdout.split()[-1])
    assert tree_digests(view) == tree_digests(src)


def test_gc_killed_between_forgetting_and_deleting_a_view(tmp_path: Path) -> None:
    """gc forgets the view and moves its tree out of views/ in one transaction: killed right after, the
    view is neither listed nor served at its path, and the next gc deletes the rest."""
    store, src = tmp_path / "s", _model(tmp_path)
    view = Path(run_cli("pull", "-q", str(src), store=store, check=True).stdout.split()[-1])
    _crash("gc", "--max-size", "0", store=store, at="view-forgotten")
    assert _recorded(store) == [] and not view.exists()
    [trash] = _entries(store)
    assert trash.startswith(".del-")
    report = _gc(store)
    assert report["orphans_removed"] == [trash] and report["blobs_removed"] == 2 and _entries(store) == []
    assert report["bytes_kept"] == 0


def test_verify_delete_killed_midway(tmp_path: Path) -> None:
    """verify --delete of a corrupt blob, killed after forgetting its view: the view is not served;
    gc finishes; a fresh pull is byte-exact."""
    store, src = tmp_path / "s", _model(tmp_path)
    view = Path(run_cli("pull", "-q", str(src), store=store, check=True).stdout.split()[-1])
    blob = store / "blobs" / "sha256" / sha256((src / "weights.bin").read_bytes())[7:]
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.write(b"\xff" * 8)
    _crash("verify", "--delete", store=store, at="view-forgotten")
    assert _recorded(store) == [] and not view.exists()
    _gc(store)
    assert _entries(store) == []
    fresh = Path(run_cli("pull", "-q", str(src), store=store, check=True).stdout.split()[-1])
    assert tree_digests(fresh) == tree_digests(src)


def test_killed_unpack_leaves_temp_files_gc_removes(tmp_path: Path) -> None:
    """A pull killed while unpacking a layer leaves ingest/tmp-*; gc removes it once the process is gone."""
    layer = make_tar([("w.bin", os.urandom(64 << 10), {})])
    config = b'{"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}'
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
                           "layers": [{"mediaType": LAYER_TAR, "digest": sha256(layer), "size": len(layer)}]}).encode()
    layout = hand_layout(tmp_path / "layout", [(manifest, {"annotations": {REF_NAME: "v1"}})], (config, layer))
    store = tmp_path / "s"
    _crash("pull", "-q", f"oci-layout://{layout}:v1", store=store, at="unpack-file-written")
    temps = [p.name for p in (store / "ingest").iterdir() if p.name.startswith("tmp-")]
    assert len(temps) == 1
    report = _gc(store)
    assert report["orphans_removed"] == ["ingest/" + temps[0]]
    assert not [p for p in (store / "ingest").iterdir() if p.name.startswith("tmp-")]
    view = Path(run_cli("pull", "-q", f"oci-layout://{layout}:v1", store=store, check=True).stdout.split()[-1])
    assert tree_digests(view) == {"w.bin": sha256(layer[512:512 + (64 << 10)])}
