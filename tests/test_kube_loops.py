"""The controller's two loops on their own, against the fake API: Lease election and the informer."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fake_k8s import FakeKubernetes

from modelcache.kube.informer import Informer
from modelcache.kube.leader import Elector


@pytest.fixture
def api(tmp_path: Path):
    from kubernetes import config

    with FakeKubernetes() as fake:
        fake.objects.bookmark_interval = 0.2
        client = config.new_client_from_config(config_file=str(fake.write_kubeconfig(tmp_path / "kubeconfig")))
        try:
            yield fake, client
        finally:
            client.close()


def test_one_leader_at_a_time_takeover_after_expiry_and_release(api) -> None:
    fake, client = api
    a = Elector(client, "sys", "leader", "node-a", duration=1)
    b = Elector(client, "sys", "leader", "node-b", duration=1)
    assert a.try_acquire() and a.leading
    assert not b.try_acquire() and not b.leading  # held and fresh
    assert a.try_acquire()  # renewal
    lease = fake.objects.get("leases", "leader", "sys")
    assert lease["spec"]["holderIdentity"] == "node-a" and lease["spec"]["leaseDurationSeconds"] == 1

    time.sleep(1.2)  # a stopped renewing: its lease expires, and a knows it no longer leads
    assert not a.leading
    assert b.try_acquire() and b.leading
    lease = fake.objects.get("leases", "leader", "sys")
    assert lease["spec"]["holderIdentity"] == "node-b" and lease["spec"]["leaseTransitions"] == 1
    assert not a.try_acquire()

    # A racing writer holding a stale version loses with 409, never both win.
    assert b.try_acquire()  # renewed just now: the round below is well within its renew deadline
    fake.objects.conflict_next("leases")
    assert b.try_acquire() is True  # still within its renew deadline, though this round conflicted
    b.release()
    assert fake.objects.get("leases", "leader", "sys")["spec"]["holderIdentity"] == ""
    assert a.try_acquire()  # no waiting out a released lease


def test_informer_lists_watches_and_relists_after_410(api) -> None:
    fake, client = api
    from kubernetes import client as k

    fake.objects.create("nodes", {"metadata": {"name": "n1"}})
    seen: list[str] = []
    changed = threading.Event()

    def notify(key: str) -> None:
        seen.append(key)
        changed.set()

    informer = Informer("nodes", k.CoreV1Api(client).list_node, notify, watch_timeout=5).start()
    try:
        assert informer.synced.wait(10) and informer.get("n1") is not None and seen == ["n1"]
        fake.objects.create("nodes", {"metadata": {"name": "n2", "labels": {"a": "b"}}})
        deadline = time.monotonic() + 10
        while (informer.get("n2") is None or seen[-1] != "n2") and time.monotonic() < deadline:
            time.sleep(0.05)  # the cache is updated, then the key reported
        assert informer.get("n2")["metadata"]["labels"] == {"a": "b"} and seen[-1] == "n2"

        # Expired while a node is deleted: the relist drops it from the cache and reports its key.
        fake.objects.expire()
        fake.objects.delete("nodes", "n1")
        fake.objects.expire()
        deadline = time.monotonic() + 10
        while (informer.get("n1") is not None or informer.relists < 1) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert informer.get("n1") is None and informer.relists >= 1 and "n1" in seen[2:]
        assert informer.keys() == ["n2"]
    finally:
        informer.stop()
    assert not informer._thread.is_alive()
