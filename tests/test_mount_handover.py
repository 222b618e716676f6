"""A mount waiting on a pull job gets its lease from the job, before the pull lets go of the view.

Each test drives a real PullManager on a real store (local models, no daemon process). The seam is the
store's own ``drop_lease``: whenever a pull's lease is dropped, gc runs at once with a 1-byte budget through
another connection, as a gc loop in another process would at the worst moment. Before the hand-over, that
was the window in which the view of a finished pull was held by nothing and a waiting mount lost it.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Callable
from pathlib import Path

import pytest
from support import blob_of, held_unlinks, make_tar, tree_digests, write_layout, write_random

from modelcache.daemon.metrics import Metrics
from modelcache.daemon.policy import RefPolicy
from modelcache.daemon.pulls import PullManager
from modelcache.errors import NotFound
from modelcache.sources import SourceOptions
from modelcache.store import Store
from modelcache.store.gc import collect
from modelcache.transfer import Engine, TransferConfig
from modelcache.tree import Filters


def _model(root: Path, seed: int) -> Path:
    for i in range(3):
        write_random(root / f"part-{i}.bin", 64 << 10, seed=seed * 10 + i)
    return root


class _Node:
    """A store, an engine and a PullManager that may pull from under ``tmp_path/models``."""

    def __init__(self, tmp_path: Path) -> None:
        self.models = tmp_path / "models"
        self.store_dir = tmp_path / "store"
        self.store = Store(self.store_dir)
        self.engine = Engine(self.store.content, TransferConfig())
        self.manager = PullManager(self.store, self.engine, SourceOptions(), Metrics(),
                                   policy=RefPolicy([self.models]))
        self.gc_runs: list[list[str]] = []  # views each gc at a pull lease's end removed

    def gc_when_a_pull_lease_goes(self, then: Callable[[], None] | None = None) -> None:
        """From now on, each dropped pull lease is followed at once by gc at a 1-byte budget (then ``then``)."""
        drop = self.store.index.drop_lease

        def dropped(lease_id: str) -> None:
            drop(lease_id)
            if not lease_id.startswith("pull:"):
                return
            self.gc_runs.append(self.gc_elsewhere())
            if then is not None:
                then()

        self.store.index.drop_lease = dropped  # type: ignore[method-assign]

    def gc_elsewhere(self) -> list[str]:
        """gc at a 1-byte budget through another connection, as a gc process would run it; the views removed."""
        other = Store(self.store_dir)
        try:
            return collect(other, max_bytes=1).views_removed
        finally:
            other.close()

    def mount_leases(self) -> dict[str, tuple[str, ...]]:
        return {lease.id: lease.views for lease in self.store.index.leases("mount")}

    def close(self) -> None:
        self.engine.close()
        self.store.close()


@pytest.fixture
def node(tmp_path: Path):
    n = _Node(tmp_path)
    yield n
    n.close()


def test_gc_as_the_pull_lease_goes_leaves_the_waiting_mounts_view(node: _Node) -> None:
    """gc at a 1-byte budget the moment the job's pull lease is dropped: the mount still gets the view the job
    built, leased by its volume, whole, from that one pull (before, it pulled again and again, then gave up)."""
    src = _model(node.models / "a", 1)
    node.gc_when_a_pull_lease_goes()

    async def go() -> Path:
        return await asyncio.wait_for(node.manager.view_for(str(src), Filters(), lease="vol-1"), 60)

    view = asyncio.run(go())
    assert node.gc_runs and all(removed == [] for removed in node.gc_runs), node.gc_runs
    assert len(node.manager.jobs()) == 1, [j.as_json() for j in node.manager.jobs()]
    assert tree_digests(view) == tree_digests(src)
    assert node.mount_leases() == {"vol-1": ("sha256:" + view.name,)}
    assert node.store.index.leases("pull") == []  # the job's own lease is gone


def test_mounts_waiting_on_one_job_each_get_their_own_lease(node: _Node) -> None:
    """Three volumes ask at once: one job, one lease per volume on its view, nothing else held after."""
    src = _model(node.models / "b", 2)
    node.gc_when_a_pull_lease_goes()

    async def go() -> list[Path]:
        asks = [node.manager.view_for(str(src), Filters(), lease=f"vol-{i}") for i in range(3)]
        return await asyncio.wait_for(asyncio.gather(*asks), 60)

    views = asyncio.run(go())
    assert len(set(views)) == 1 and len(node.manager.jobs()) == 1
    digest = "sha256:" + views[0].name
    assert node.mount_leases() == {f"vol-{i}": (digest,) for i in range(3)}
    assert [lease.id for lease in node.store.index.leases()] == ["vol-0", "vol-1", "vol-2"]
    node.store.index.drop_lease("vol-0")
    node.store.index.drop_lease("vol-1")
    assert collect(node.store, max_bytes=0).views_removed == [] and views[0].is_dir()  # vol-2 still holds it


def test_a_failed_job_leaves_no_lease(node: _Node) -> None:
    """A job that fails (no file matches the volume's include) answers its error to every waiting mount and
    leaves no lease of any kind behind."""
    src = _model(node.models / "c", 3)

    async def go() -> list[BaseException | Path]:
        asks = [node.manager.view_for(str(src), Filters.of(["nothing-*"], []), lease=f"vol-{i}") for i in range(2)]
        return await asyncio.wait_for(asyncio.gather(*asks, return_exceptions=True), 60)

    outcomes = asyncio.run(go())
    assert all(isinstance(o, NotFound) for o in outcomes), outcomes
    assert node.store.index.leases() == []


def _held(node: _Node, monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, list[object]]:
    """Make each job's pull wait for the returned event before it starts; the list grows by one per job
    started or joined (PullManager._start)."""
    import modelcache.daemon.pulls as pulls

    go = asyncio.Event()
    real_pull, real_start = pulls.pull, node.manager._start
    started: list[object] = []

    async def held(*args, **kwargs):
        await go.wait()
        return await real_pull(*args, **kwargs)

    def start(*args, **kwargs):
        job = real_start(*args, **kwargs)
        started.append(job)
        return job

    monkeypatch.setattr(pulls, "pull", held)
    monkeypatch.setattr(node.manager, "_start", start)
    return go, started


def test_a_mount_cancelled_while_waiting_takes_no_lease(node: _Node, monkeypatch: pytest.MonkeyPatch) -> None:
    """kubelet gives up on one of two volumes while the job is still pulling: the job ends with a lease for
    the volume still waiting, none for the one that went away."""
    src = _model(node.models / "d", 4)

    async def go() -> Path:
        release, started = _held(node, monkeypatch)
        stays = asyncio.create_task(node.manager.view_for(str(src), Filters(), lease="vol-stays"))
        leaves = asyncio.create_task(node.manager.view_for(str(src), Filters(), lease="vol-leaves"))
        for _ in range(2000):  # until both wait on the one job (admit and the index lookup run in threads)
            if len(started) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(started) == 2 and started[0] is started[1]
        [job] = node.manager.jobs()
        assert job.state == "running" and not stays.done() and not leaves.done()
        leaves.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaves
        release.set()
        return await asyncio.wait_for(stays, 60)

    view = asyncio.run(go())
    assert node.mount_leases() == {"vol-stays": ("sha256:" + view.name,)}
    assert node.store.index.leases("pull") == []


@pytest.mark.parametrize("published", [False, True], ids=["new-volume", "published-volume"])
def test_a_mount_cancelled_once_handed_its_lease_gives_it_back(node: _Node, published: bool) -> None:
    """Cancelled after the job leased the view for it (as the job ends): the lease goes again, since no volume
    was published under it; a volume already published under that id (kubelet asking again) keeps its lease."""
    src = _model(node.models / "e", 5)
    if published:
        node.store.index.add_lease("vol-1", kind="mount", owner="daemon", holder='{"target": "/pods/x"}')

    async def go() -> None:
        loop = asyncio.get_running_loop()
        waiter: list[asyncio.Task[Path]] = []
        node.gc_when_a_pull_lease_goes(then=lambda: loop.call_soon_threadsafe(waiter[0].cancel))
        waiter.append(asyncio.create_task(node.manager.view_for(str(src), Filters(), lease="vol-1")))
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiter[0], 60)

    asyncio.run(go())
    assert node.gc_runs and all(removed == [] for removed in node.gc_runs), node.gc_runs
    assert node.store.index.leases("pull") == []
    if published:
        [lease] = node.store.index.leases()
        assert lease.id == "vol-1" and lease.holder == '{"target": "/pods/x"}' and len(lease.views) == 1
    else:
        assert node.store.index.leases() == []


def test_a_warm_hit_is_held_by_the_callers_lease(node: _Node) -> None:
    """pull() with a lease of the caller's: a warm hit (nothing fetched) returns a view that lease holds, taken
    in the hit's own transaction; the lease stays the caller's to drop."""
    from modelcache.pull import pull
    from modelcache.store import liveness

    src = _model(node.models / "f", 6)

    async def go(lease: str | None) -> Path:
        return (await pull(node.store, node.engine, str(src), owner="test", lease=lease)).path

    first = asyncio.run(go(None))
    assert node.store.index.leases() == []
    node.store.index.add_lease("pull:test:mine", kind="pull", owner="test", process=liveness.me())
    again = asyncio.run(go("pull:test:mine"))
    assert again == first
    [lease] = node.store.index.leases()
    # No blob held: it was a warm hit, not a second build of the same view.
    assert (lease.id, lease.views, lease.blobs) == ("pull:test:mine", ("sha256:" + first.name,), ())
    assert collect(node.store, max_bytes=0).views_removed == [] and first.is_dir()


def test_a_mount_cancelled_during_the_warm_lookup_leaves_its_lease_to_be_given_back(
        node: _Node, monkeypatch: pytest.MonkeyPatch) -> None:
    """kubelet's deadline lands while the warm lookup (a thread) is taking the volume's lease: the cancel waits
    for that thread, so the lease is there when the CSI edge gives back what the failed publish took. Before,
    the thread leased the view after the cancel and the edge's cleanup, and the lease stayed until a restart."""
    import threading

    from modelcache.daemon.mounts import Mounts

    src = _model(node.models / "k", 11)
    asyncio.run(node.manager.view_for(str(src), Filters()))  # in the store: the next ask is a warm hit
    inside, go_on = threading.Event(), threading.Event()
    real = node.manager.cached

    def slow(*args, **kwargs):  # the lookup, paused until the caller has been cancelled
        inside.set()
        go_on.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(node.manager, "cached", slow)

    async def go() -> None:
        ask = asyncio.create_task(node.manager.view_for(str(src), Filters(), lease="vol-1"))
        assert await asyncio.to_thread(inside.wait, 30)
        ask.cancel()
        await asyncio.sleep(0.05)
        assert not ask.done()  # waiting for the lookup's thread, which has not leased anything yet
        go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(ask, 30)
        assert set(node.mount_leases()) == {"vol-1"}  # taken by the lookup, and the caller knows it
        Mounts(node.store).abandon("vol-1")  # what the CSI edge does after any failed NodePublishVolume

    asyncio.run(go())
    assert node.store.index.leases() == []


def test_a_thread_call_cancelled_twice_still_ends_before_its_caller() -> None:
    """settled(): a caller cancelled once (its deadline) and again (the RPC's own cancel) while the call's
    thread runs gets its CancelledError only after the thread has ended, so its cleanup sees what it did."""
    import threading

    from modelcache.daemon.settled import settled

    go_on = threading.Event()
    did: list[str] = []

    def call() -> str:
        go_on.wait(30)
        did.append("leased")
        return "view"

    async def main() -> None:
        caller = asyncio.create_task(settled(call))
        await asyncio.sleep(0.05)
        for _ in range(2):
            caller.cancel()
            await asyncio.sleep(0.05)
            assert not caller.done() and did == []
        go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(caller, 30)
        assert did == ["leased"]

    asyncio.run(main())


class _Gate:
    """The real AccessGate (policy always, no answer cached) over an origin whose answer the test sets."""

    def __init__(self, node: _Node) -> None:
        from modelcache.daemon.access import AccessGate

        self.grants = True
        self.asked = 0
        node.manager.gate = AccessGate(node.store, SourceOptions(), policy="always", ttl=0.0, probe=self._probe)

    async def _probe(self, ref: str, credentials: object) -> None:
        from modelcache.errors import Unauthorized

        self.asked += 1
        if not self.grants:
            raise Unauthorized("401 from the origin")


def _publish(node: _Node, volume: str, view: Path) -> None:
    """What Mounts.publish records once the view is bind-mounted: the lease, its holder naming the target."""
    node.store.index.add_lease(volume, kind="mount", owner="daemon", views=["sha256:" + view.name],
                               holder='{"target": "/pods/x/volumes/vol-1"}')


def test_a_refused_publish_of_a_published_volume_keeps_its_lease(node: _Node) -> None:
    """kubelet publishes a volume (granted), then calls NodePublishVolume again for it (after its restart) and
    the gate refuses this time: the refusal stands, but the view is still bind-mounted into the running pod, so
    its lease stays and gc at a 1-byte budget leaves the view whole (before, the refusal dropped the lease)."""
    from modelcache.errors import Unauthorized

    src = _model(node.models / "g", 7)
    gate = _Gate(node)
    view = asyncio.run(node.manager.view_for(str(src), Filters(), lease="vol-1"))
    _publish(node, "vol-1", view)
    gate.grants = False
    with pytest.raises(Unauthorized):
        asyncio.run(node.manager.view_for(str(src), Filters(), lease="vol-1"))
    assert gate.asked == 2  # the second publish really was refused by the gate, after the warm lookup
    assert node.mount_leases() == {"vol-1": ("sha256:" + view.name,)}
    assert collect(node.store, max_bytes=1).views_removed == []
    assert tree_digests(view) == tree_digests(src)


@pytest.mark.parametrize("warm", [False, True], ids=["after-the-pull", "warm-hit"])
def test_a_refused_first_publish_gives_its_lease_back(node: _Node, warm: bool) -> None:
    """A volume not published yet that the gate refuses keeps nothing: the lease this call took goes back
    (the view is then gc's like any other)."""
    from modelcache.errors import Unauthorized

    src = _model(node.models / "h", 8)
    gate = _Gate(node)
    gate.grants = False

    async def go() -> None:
        if warm:  # in the store already: the lease is taken by the warm lookup
            job = await node.manager.start(str(src), Filters())
            assert job.task is not None
            await asyncio.wait_for(job.task, 60)
            assert job.state == "done", job.as_json()
        await asyncio.wait_for(node.manager.view_for(str(src), Filters(), lease="vol-1"), 60)

    with pytest.raises(Unauthorized):
        asyncio.run(go())
    assert gate.asked == 1 and len(node.manager.jobs()) == 1
    assert node.store.index.leases() == []


def _gzip_layout(root: Path) -> tuple[Path, dict[str, bytes]]:
    """An OCI layout of one gzip layer (tag v1); and its files."""
    files = {"w/a.bin": bytes(range(256)) * 4096, "w/b.bin": b"b" * 70_001}
    layer = gzip.compress(make_tar([(p, d, {}) for p, d in files.items()]), mtime=0)
    return write_layout(root, [(layer, "application/vnd.oci.image.layer.v1.tar+gzip")]), files


def test_the_layers_a_daemon_pull_drops_are_unlinked_after_its_mounts_are_answered(
        node: _Node, monkeypatch: pytest.MonkeyPatch) -> None:
    """A gzip layer, dropped once unpacked, leaves the store with the pull; its bytes are unlinked in the
    background (store/unlinker.py: on a disk with online discard that unlink is slow), so the mount has its
    view while the unlink is still held up; then none are left behind."""
    layout, files = _gzip_layout(node.models / "img")
    go_on = held_unlinks(monkeypatch)

    async def go() -> Path:
        return await asyncio.wait_for(node.manager.view_for(f"oci-layout://{layout}:v1", Filters(), lease="vol-1"),
                                      60)

    view = asyncio.run(go())  # answered while the unlink waits
    ingest = node.store.content.ingest_dir
    assert [p.name for p in ingest.iterdir() if "-gone-" in p.name]
    assert {p: (view / p).read_bytes() for p in files} == files
    go_on.set()
    node.store.content.delete_deferred()  # until the background unlink is done
    assert not [p.name for p in ingest.iterdir() if p.name.startswith("tmp-")]
    layer_blobs = set(node.store.content.digests()) - {blob_of(d).digest for d in files.values()}
    assert not layer_blobs, layer_blobs
