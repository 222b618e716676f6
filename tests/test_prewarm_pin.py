"""A pre-warmed model is pinned by its pull job, before the job's own lease lets go of the view.

The controller runs in-process (a real PrewarmController and PullManager on a real store, models from local
paths) against the fake API server (tests/fake_k8s.py). As in test_mount_handover.py, the seam is the store's
own ``drop_lease``: whenever a pull's lease is dropped, gc runs at once with a 1-byte budget through another
connection. Before the job took the pin, that was the window in which a freshly pre-warmed model was held by
nothing: gc evicted it, the controller found it gone and pulled again, and so on for ever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fake_k8s import FakeKubernetes
from support import tree_digests
from test_mount_handover import _model, _Node

from modelcache.daemon.prewarm import PrewarmConfig, PrewarmController, load_client
from modelcache.daemon.pulls import Hold
from modelcache.kube import names
from modelcache.store.gc import collect
from modelcache.tree import Filters

NS = "ml"


async def _until(what: str, check: Callable[[], object], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _warm(tmp_path: Path, node: _Node, src: Path) -> None:
    """Run a PrewarmController for node n1 until the ModelPrewarm ml/w (model ``src``) says n1 is Ready."""
    with FakeKubernetes() as fake:
        fake.objects.create("nodes", {"metadata": {"name": "n1", "labels": {}}, "spec": {}})
        fake.objects.create("modelprewarms", {"apiVersion": names.API_VERSION, "kind": names.KIND,
                                              "metadata": {"name": "w"}, "spec": {"model": str(src)}}, NS)
        kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
        config = PrewarmConfig(kubeconfig=kubeconfig, namespace="modelcache-system", resync=2.0,
                               lease_duration=3.0, retry_failed=1.0, progress_interval=0.3)
        api = load_client(kubeconfig)

        def entry() -> dict | None:
            status = (fake.objects.get("modelprewarms", "w", NS) or {}).get("status") or {}
            return next((e for e in status.get("nodes") or [] if e["node"] == "n1"), None)

        async def go() -> None:
            controller = PrewarmController(config, "n1", node.manager, api)
            run = asyncio.create_task(controller.run())
            try:
                await _until("n1 Ready", lambda: (entry() or {}).get("state") == "Ready", 30)
            finally:
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)

        try:
            asyncio.run(go())
        finally:
            api.close()


def test_a_prewarmed_model_is_pinned_before_the_pull_lets_go(tmp_path: Path) -> None:
    """gc at a 1-byte budget the moment the job's pull lease is dropped: the pre-warmed view survives, pinned
    by its ModelPrewarm, from one pull (before, it was evicted, pulled again and evicted again)."""
    node = _Node(tmp_path)
    src = _model(node.models / "warm", 11)
    node.gc_when_a_pull_lease_goes()
    try:
        _warm(tmp_path, node, src)
        assert node.gc_runs and all(removed == [] for removed in node.gc_runs), node.gc_runs
        [job] = node.manager.jobs()  # pulled once
        assert job.state == "done" and job.path is not None
        pins = [(lease.owner, lease.views) for lease in node.store.index.leases("pin")]
        assert pins == [(names.pin_owner(NS, "w"), ("sha256:" + job.path.name,))]
        assert node.store.index.leases("pull") == [] and node.store.index.leases("mount") == []
        assert collect(node.store, max_bytes=1).views_removed == []
        assert tree_digests(job.path) == tree_digests(src)
    finally:
        node.close()


def test_a_model_already_here_is_pinned_by_the_lookup_that_finds_it(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The model is in the store when its ModelPrewarm comes: gc at a 1-byte budget, run the moment the
    store answers the controller's lookup, leaves it, since the lookup pinned it in its own transaction; no
    pull (before, the lookup and the pin were two steps: gc evicted the model between them and it was pulled
    again)."""
    node = _Node(tmp_path)
    src = _model(node.models / "here", 13)
    view = asyncio.run(node.manager.view_for(str(src), Filters()))
    jobs_before = len(node.manager.jobs())
    removed: list[list[str]] = []

    def then_gc(real: Callable[..., object]) -> Callable[..., object]:
        def answered(*args, **kwargs):
            found = real(*args, **kwargs)
            removed.append(node.gc_elsewhere())
            return found
        return answered

    for name in ("lookup", "pin_ref"):  # whichever the controller asks the store with
        if hasattr(node.store.index, name):
            monkeypatch.setattr(node.store.index, name, then_gc(getattr(node.store.index, name)))
    try:
        _warm(tmp_path, node, src)
        assert removed and all(r == [] for r in removed), removed
        assert len(node.manager.jobs()) == jobs_before  # no pull: found in the store
        pins = [(lease.owner, lease.views) for lease in node.store.index.leases("pin")]
        assert pins == [(names.pin_owner(NS, "w"), ("sha256:" + view.name,))]
        assert tree_digests(view) == tree_digests(src)
    finally:
        node.close()


def test_a_pin_withdrawn_while_pulling_is_not_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pre-warm that stops wanting the model (resource deleted, node no longer chosen) while its pull runs:
    the job, which runs on, pins nothing for it; a pin still wanted by another owner is taken."""
    node = _Node(tmp_path)
    src = _model(node.models / "gone", 12)
    gone, stays = Hold.pin(names.pin_owner(NS, "gone")), Hold.pin(names.pin_owner(NS, "stays"))

    async def go() -> Path:
        import modelcache.daemon.pulls as pulls

        release = asyncio.Event()
        real_pull = pulls.pull

        async def held(*args, **kwargs):
            await release.wait()
            return await real_pull(*args, **kwargs)

        monkeypatch.setattr(pulls, "pull", held)
        job = await node.manager.start(str(src), Filters(), hold=gone)
        assert await node.manager.start(str(src), Filters(), hold=stays) is job
        assert job.state in ("pending", "running")
        await node.manager.withdraw(job, gone)
        release.set()
        assert job.task is not None
        await asyncio.wait_for(job.task, 60)
        assert job.path is not None
        return job.path

    try:
        view = asyncio.run(go())
        pins = [(lease.owner, lease.views) for lease in node.store.index.leases("pin")]
        assert pins == [(stays.name, ("sha256:" + view.name,))]
        assert node.store.index.leases("pull") == []
    finally:
        node.close()
