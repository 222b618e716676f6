"""Leases are the only GC root: pulls, mounts and owned pins hold what they use; dead processes' leases expire."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from pathlib import Path

from support import run_cli, tree_digests, write_random

from modelcache.store import Store, liveness
from modelcache.store.gc import collect


def _model(root: Path, seed: int, files: int = 40, size: int = 96 << 10) -> Path:
    for i in range(files):
        write_random(root / f"part-{i:03d}.bin", size, seed=seed * 1000 + i)
    (root / "shared.json").write_bytes(b'{"shared": true}' * 100)
    return root


def test_a_pull_lease_holds_blobs_committed_but_not_yet_in_a_view(tmp_path: Path) -> None:
    """A blob committed under a live pull lease survives gc; once the lease goes, gc removes it."""
    store = Store(tmp_path / "s")
    store.index.add_lease("pull:test:1", kind="pull", owner="test", process=liveness.me())
    digest, size = store.content.write_stream(io.BytesIO(b"weights"), leases=["pull:test:1"])
    assert collect(store).blobs_removed == 0 and store.content.has(digest)
    assert store.disk_usage() == size
    store.index.drop_lease("pull:test:1")
    report = collect(store)
    assert report.blobs_removed == 1 and not store.content.has(digest) and store.disk_usage() == 0


def test_leases_of_dead_or_reborn_processes_expire(tmp_path: Path) -> None:
    """A lease whose process exited, or whose pid now names another process, is dropped by gc."""
    store = Store(tmp_path / "s")
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    pid, start = liveness.me()
    store.index.add_lease("dead", kind="pull", owner="cli", process=(int(child.stdout), 1))
    store.index.add_lease("reborn", kind="pull", owner="cli", process=(pid, start - 1))  # our pid, not us
    store.index.add_lease("live", kind="pull", owner="cli", process=(pid, start))
    store.index.add_lease("mount", kind="mount", owner="daemon")  # no process: outlives restarts
    assert sorted(collect(store).leases_expired) == ["dead", "reborn"]
    assert [lease.id for lease in store.index.leases()] == ["live", "mount"]


def test_pins_are_owned(tmp_path: Path) -> None:
    """Two owners pin one model; one unpinning leaves it pinned; gc evicts it only when no pin is left."""
    src = _model(tmp_path / "m", 1, files=2)
    store_dir = tmp_path / "s"
    view = Path(run_cli("pull", "-q", str(src), store=store_dir, check=True).stdout.split()[-1])
    store = Store(store_dir)
    digest = "sha256:" + view.name
    assert store.index.pin(digest, "prewarm/a") and store.index.pin(digest, "prewarm/b")
    assert store.index.unpin(digest, "prewarm/a") and not store.index.unpin(digest, "prewarm/a")
    assert store.index.records()[0].pinned
    assert collect(store, max_bytes=0).views_removed == [] and view.is_dir()
    assert store.index.unpin(digest, "prewarm/b")
    assert collect(store, max_bytes=0).views_removed == [digest] and not view.exists()


def test_a_view_is_handed_out_leased(tmp_path: Path) -> None:
    """PullManager.cached with a volume id leases the view in the lookup's transaction; gc keeps it."""
    from modelcache.daemon.metrics import Metrics
    from modelcache.daemon.pulls import PullManager
    from modelcache.sources import SourceOptions
    from modelcache.transfer import Engine
    from modelcache.tree import Filters

    src = _model(tmp_path / "m", 2, files=2)
    store_dir = tmp_path / "s"
    view = Path(run_cli("pull", "-q", str(src), store=store_dir, check=True).stdout.split()[-1])
    store = Store(store_dir)
    engine = Engine(store.content)
    try:
        manager = PullManager(store, engine, SourceOptions(), Metrics())
        ref = store.index.records()[0].ref
        assert manager.cached(ref, Filters(), "vol-1") == view
        [lease] = store.index.leases()
        assert (lease.id, lease.kind, lease.views) == ("vol-1", "mount", ("sha256:" + view.name,))
        assert collect(store, max_bytes=0).views_removed == [] and view.is_dir()
        assert manager.cached("file:///nowhere", Filters(), "vol-2") is None
        assert [lease.id for lease in store.index.leases()] == ["vol-1"]
    finally:
        engine.close()
        store.close()


def _whole_or_gone(view: Path, want: dict[str, str]) -> bool:
    """An unleased view may be evicted at any moment, even while it is read: what was read is the whole tree,
    unless the view is gone by the end of the read (it leaves views/ in one rename, so while it is there it
    is whole)."""
    got = tree_digests(view)
    return got == want or not view.exists()


def _hammer(store_dir: Path, mode: str, stop: threading.Event, errors: list[BaseException]) -> None:
    """Until told to stop: gc in-process (plain, or with a 1-byte budget) as often as it goes, each time
    through a store opened afresh as another process would; or `modelcache verify --delete` as a process."""
    try:
        while not stop.is_set():
            if mode == "verify":
                run_cli("verify", "--delete", store=store_dir, check=True)
                continue
            store = Store(store_dir)
            try:
                collect(store, max_bytes=1 if mode == "gc-max-1" else None)
            finally:
                store.close()
    except BaseException as e:  # reported by the test
        errors.append(e)


def test_gc_and_verify_beside_running_pulls(tmp_path: Path) -> None:
    """gc, `gc --max-size 1` and `verify --delete` beside pulls, several rounds: pulls end byte-exact.

    Before leases, gc deleted blobs a pull had committed but not yet linked
    ("one link means unused") and the pull failed with ENOENT.
    """
    models = [_model(tmp_path / f"m{i}", 10 + i) for i in range(2)]
    expected = [tree_digests(m) for m in models]
    store_dir = tmp_path / "s"
    flags = ["pull", "-q", "--chunk-size", "32K", "--concurrency", "2"]
    for mode in ("gc", "gc-max-1", "verify") * 2:
        stop, errors = threading.Event(), []
        worker = threading.Thread(target=_hammer, args=(store_dir, mode, stop, errors))
        pulls = [subprocess.Popen([sys.executable, "-m", "modelcache", "--store", str(store_dir), *flags, str(m)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for m in models]
        worker.start()
        try:
            outs = [p.communicate(timeout=120) for p in pulls]
        finally:
            stop.set()
            worker.join(timeout=120)
        assert not errors, errors
        for proc, (out, err), want in zip(pulls, outs, expected, strict=True):
            assert proc.returncode == 0, (mode, err)
            view = Path(out.split()[-1])
            if mode == "gc-max-1":  # evicting everything unleased may take the view once its pull is done
                assert _whole_or_gone(view, want), mode
            else:
                assert tree_digests(view) == want, mode
    # Nothing left half-done: no temp trees, no trash, every recorded view whole.
    leftovers = [p.name for p in (store_dir / "views").iterdir() if p.name.startswith(".")]
    assert leftovers == []


_GC_LOOP = """
import sys, time
from pathlib import Path
from modelcache.store import Store
from modelcache.store.gc import collect
from modelcache.store.scrub import verify
store_dir, stop, budget = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
deadline, runs = time.monotonic() + 180, 0
while not stop.exists() and time.monotonic() < deadline:
    store = Store(store_dir)
    try:
        if budget == "verify":  # verify --delete: nothing is corrupt, so nothing may go
            assert not [d for d in list(store.content.digests()) if verify(store, d, delete=True)]
        else:
            collect(store, max_bytes=None if budget == "none" else int(budget))
    finally:
        store.close()
    runs += 1
    if runs == 1:
        (stop.parent / (stop.name + ".running")).touch()
print(runs)
"""


def test_gc_loop_beside_daemon_pulls_and_mounts(tmp_path: Path) -> None:
    """A gc loop in another process (plain, with a 1-byte budget, or verify --delete) while the daemon pulls via
    POST /v1/pulls and mounts others via CSI, several rounds: every pull ends done and byte-exact, and a mounted
    view reads whole, every time it is read, until it is unmounted."""
    from daemon_support import publish_request, start_daemon, unmount_all_below

    from modelcache.csi import csi_pb2 as pb

    models = tmp_path / "models"
    daemon = start_daemon(tmp_path / "node", "--allow-local", str(models), "--scrub-rate", "0",
                          "--chunk-size", "32K", "--concurrency", "2")
    try:
        for rnd, budget in enumerate(("none", "1", "verify", "1", "none")):
            pulled, mounted = (_model(models / f"r{rnd}-{kind}", 100 + 2 * rnd + i, files=40, size=96 << 10)
                               for i, kind in enumerate(("pulled", "mounted")))
            want_pulled, want_mounted = tree_digests(pulled), tree_digests(mounted)
            stop = tmp_path / f"stop-{rnd}"
            gc = subprocess.Popen([sys.executable, "-c", _GC_LOOP, str(daemon.store), str(stop), budget],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                deadline = time.monotonic() + 60
                while not (tmp_path / f"stop-{rnd}.running").exists():  # gc is going before the pulls start
                    assert time.monotonic() < deadline and gc.poll() is None, gc.stderr
                    time.sleep(0.05)
                status, job = daemon.call("POST", "/v1/pulls", {"ref": str(pulled)})
                assert status == 202, job
                target = tmp_path / "pods" / f"vol-{rnd}"
                daemon.node().NodePublishVolume(publish_request(f"vol-{rnd}", target, str(mounted)), timeout=120)
                for _ in range(5):  # read the mount while gc keeps trying to collect it
                    assert tree_digests(target) == want_mounted, (rnd, budget)
                done = daemon.wait_pull(job["id"], timeout=120)
                assert done["state"] == "done", done
                view = Path(done["path"])
                if budget != "1":
                    assert tree_digests(view) == want_pulled
                else:  # evicting everything unleased may take the view once its pull is done
                    assert _whole_or_gone(view, want_pulled)
                assert tree_digests(target) == want_mounted
            finally:
                stop.touch()
                out, err = gc.communicate(timeout=120)
            assert gc.returncode == 0 and int(out) > 0, err
            daemon.node().NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=f"vol-{rnd}",
                                                                            target_path=str(target)))
        # Nothing left half-done: no temp trees, no trash; every recorded view whole.
        store = Store(daemon.store)
        try:
            for record in store.index.records():
                assert (daemon.store / "views" / record.view[7:]).is_dir()
        finally:
            store.close()
        assert [p.name for p in (daemon.store / "views").iterdir() if p.name.startswith(".")] == []
    finally:
        daemon.stop()
        unmount_all_below(tmp_path)
