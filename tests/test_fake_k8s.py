"""The fake API server's object store, proven with the real ``kubernetes`` client.

The pre-warm controller is tested against this fake, so each behaviour it
relies on (list then watch from the list's version, bookmarks, 410 Gone,
the status subresource, patches, 409 Conflicts, Leases) is checked here
through the client's own typed APIs and its ``watch.Watch``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fake_k8s import FakeKubernetes

GROUP, VERSION, PLURAL = "modelcache.io", "v1alpha1", "modelprewarms"


@pytest.fixture
def kube(tmp_path: Path):
    from kubernetes import config

    with FakeKubernetes() as fake:
        fake.objects.bookmark_interval = 0.2
        api = config.new_client_from_config(config_file=str(fake.write_kubeconfig(tmp_path / "kubeconfig")))
        try:
            yield fake, api
        finally:
            api.close()


def _prewarm(name: str, model: str = "oci://127.0.0.1:1/m:v1") -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelPrewarm", "metadata": {"name": name},
            "spec": {"model": model}}


def test_nodes_labels_taints_and_conflicts(kube) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    fake, api = kube
    core = client.CoreV1Api(api)
    core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name="n1", labels={"zone": "a"}), spec=client.V1NodeSpec(
        taints=[client.V1Taint(key="modelcache.io/warming", effect="NoSchedule"),
                client.V1Taint(key="gpu", effect="NoSchedule", value="yes")])))
    with pytest.raises(ApiException) as exists:
        core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name="n1")))
    assert exists.value.status == 409

    node = core.patch_node("n1", {"metadata": {"labels": {"warm": "true"}}},
                           _content_type="application/merge-patch+json")
    assert node.metadata.labels == {"zone": "a", "warm": "true"}
    node = core.patch_node("n1", {"metadata": {"labels": {"zone": None}}}, _content_type="application/merge-patch+json")
    assert node.metadata.labels == {"warm": "true"}

    # Strategic merge: a taint is removed by its key, the other stays.
    node = core.patch_node("n1", {"spec": {"taints": [{"key": "modelcache.io/warming", "$patch": "delete"}]}},
                           _content_type="application/strategic-merge-patch+json")
    assert [t.key for t in node.spec.taints] == ["gpu"]

    # A write naming a stale resourceVersion conflicts; so does a failed JSON-patch test.
    stale = node.metadata.resource_version
    core.patch_node("n1", {"metadata": {"labels": {"x": "1"}}}, _content_type="application/merge-patch+json")
    with pytest.raises(ApiException) as conflict:
        core.patch_node("n1", {"metadata": {"resourceVersion": stale, "labels": {"y": "1"}}},
                        _content_type="application/merge-patch+json")
    assert conflict.value.status == 409
    with pytest.raises(ApiException) as failed:
        core.patch_node("n1", [{"op": "test", "path": "/metadata/resourceVersion", "value": stale},
                               {"op": "replace", "path": "/spec/taints", "value": []}],
                        _content_type="application/json-patch+json")
    assert failed.value.status == 422
    fresh = core.read_node("n1")
    node = core.patch_node("n1", [{"op": "test", "path": "/metadata/resourceVersion",
                                   "value": fresh.metadata.resource_version},
                                  {"op": "replace", "path": "/spec/taints", "value": []}],
                           _content_type="application/json-patch+json")
    assert not node.spec.taints and "y" not in node.metadata.labels

    # The test hook: the next write conflicts whatever it names.
    fake.objects.conflict_next("nodes")
    with pytest.raises(ApiException) as forced:
        core.patch_node("n1", {"metadata": {"labels": {"z": "1"}}}, _content_type="application/merge-patch+json")
    assert forced.value.status == 409
    assert core.patch_node("n1", {"metadata": {"labels": {"z": "1"}}},
                           _content_type="application/merge-patch+json").metadata.labels["z"] == "1"
    listed = core.list_node(label_selector="z=1")
    assert [n.metadata.name for n in listed.items] == ["n1"] and int(listed.metadata.resource_version) > 0
    assert core.list_node(label_selector="z=2").items == []


def test_custom_objects_and_the_status_subresource(kube) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    fake, api = kube
    custom = client.CustomObjectsApi(api)
    made = custom.create_namespaced_custom_object(GROUP, VERSION, "ml", PLURAL, _prewarm("llama"))
    assert made["metadata"]["generation"] == 1 and made["metadata"]["namespace"] == "ml"

    # Status goes through /status only; the object's own writes keep it, and move the generation.
    st = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, "ml", PLURAL, "llama", {"status": {"ready": 1}, "spec": {"model": "ignored"}},
        _content_type="application/merge-patch+json")
    assert st["status"] == {"ready": 1} and st["spec"]["model"] == made["spec"]["model"]
    assert st["metadata"]["generation"] == 1
    changed = custom.patch_namespaced_custom_object(
        GROUP, VERSION, "ml", PLURAL, "llama", {"spec": {"count": 2}, "status": {"ready": 9}},
        _content_type="application/merge-patch+json")
    assert changed["metadata"]["generation"] == 2 and changed["status"] == {"ready": 1}

    # Optimistic concurrency on /status, and the forced conflict.
    stale = st["metadata"]["resourceVersion"]
    with pytest.raises(ApiException) as conflict:
        custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, "ml", PLURAL, "llama", {"metadata": {"resourceVersion": stale}, "status": {"ready": 2}},
            _content_type="application/merge-patch+json")
    assert conflict.value.status == 409
    fake.objects.conflict_next(PLURAL, status=True)
    with pytest.raises(ApiException):
        custom.patch_namespaced_custom_object_status(GROUP, VERSION, "ml", PLURAL, "llama", {"status": {"ready": 2}},
                                                     _content_type="application/merge-patch+json")
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, "ml", PLURAL, "llama", {"status": {"ready": 2}},
                                                 _content_type="application/merge-patch+json")
    assert fake.objects.get(PLURAL, "llama", "ml")["status"] == {"ready": 2}

    listed = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
    assert [o["metadata"]["name"] for o in listed["items"]] == ["llama"]
    assert custom.list_namespaced_custom_object(GROUP, VERSION, "other", PLURAL)["items"] == []
    custom.delete_namespaced_custom_object(GROUP, VERSION, "ml", PLURAL, "llama")
    with pytest.raises(ApiException) as gone:
        custom.get_namespaced_custom_object(GROUP, VERSION, "ml", PLURAL, "llama")
    assert gone.value.status == 404


def test_leases(kube) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    _, api = kube
    coordination = client.CoordinationV1Api(api)
    lease = coordination.create_namespaced_lease("sys", client.V1Lease(
        metadata=client.V1ObjectMeta(name="leader"),
        spec=client.V1LeaseSpec(holder_identity="a", lease_duration_seconds=15)))
    lease.spec.holder_identity = "b"
    taken = coordination.replace_namespaced_lease("leader", "sys", lease)
    assert taken.spec.holder_identity == "b"
    lease.spec.holder_identity = "c"  # still names the version before b took it
    with pytest.raises(ApiException) as conflict:
        coordination.replace_namespaced_lease("leader", "sys", lease)
    assert conflict.value.status == 409
    assert coordination.read_namespaced_lease("leader", "sys").spec.holder_identity == "b"


def test_watch_from_a_list_with_bookmarks_and_410(kube) -> None:
    """List, watch from the list's version, see changes and bookmarks; an expired watch raises 410."""
    from kubernetes import client, watch
    from kubernetes.client.exceptions import ApiException

    fake, api = kube
    custom = client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(GROUP, VERSION, "ml", PLURAL, _prewarm("before"))
    listed = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
    rv = listed["metadata"]["resourceVersion"]
    custom.create_namespaced_custom_object(GROUP, VERSION, "ml", PLURAL, _prewarm("after"))

    w = watch.Watch()
    seen: list[tuple[str, str]] = []
    for event in w.stream(custom.list_cluster_custom_object, GROUP, VERSION, PLURAL, resource_version=rv,
                          allow_watch_bookmarks=True, timeout_seconds=5):
        name = event["raw_object"]["metadata"].get("name", "")
        seen.append((event["type"], name))
        if event["type"] == "ADDED":
            custom.delete_namespaced_custom_object(GROUP, VERSION, "ml", PLURAL, "after")
        # A bookmark may come before the deletion does (every 0.2 s here): stop at the first one after it.
        if event["type"] == "BOOKMARK" and ("DELETED", "after") in seen:
            w.stop()
    changes = [e for e in seen if e[0] != "BOOKMARK"]
    assert changes == [("ADDED", "after"), ("DELETED", "after")], seen  # nothing from before the list
    assert seen[-1][0] == "BOOKMARK"
    assert int(w.resource_version) > int(rv)

    # A node watch through CoreV1Api, expired by the test hook from another thread: 410 reaches the caller.
    core = client.CoreV1Api(api)
    core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name="n1")))
    node_rv = core.list_node().metadata.resource_version
    def expire_once_watching() -> None:  # not before: a watch started after it would resume unharmed
        deadline = time.monotonic() + 10
        while not fake.objects.watching("nodes") and time.monotonic() < deadline:
            time.sleep(0.01)
        fake.objects.expire()

    threading.Thread(target=expire_once_watching, daemon=True).start()
    with pytest.raises(ApiException) as expired:
        for _ in watch.Watch().stream(core.list_node, resource_version=node_rv, timeout_seconds=5):
            pass
    assert expired.value.status == 410
    # Resuming from a version older than the compacted history is gone too; a fresh list's version works.
    core.patch_node("n1", {"metadata": {"labels": {"moved": "on"}}}, _content_type="application/merge-patch+json")
    fake.objects.expire()
    with pytest.raises(ApiException) as old:
        for _ in watch.Watch().stream(core.list_node, resource_version=node_rv, timeout_seconds=5):
            pass
    assert old.value.status == 410
    fresh = core.list_node().metadata.resource_version
    threading.Timer(0.2, lambda: core.patch_node("n1", {"metadata": {"labels": {"a": "b"}}},
                                                 _content_type="application/merge-patch+json")).start()
    for event in watch.Watch().stream(core.list_node, resource_version=fresh, timeout_seconds=5):
        assert event["type"] == "MODIFIED" and event["object"].metadata.labels == {"moved": "on", "a": "b"}
        break
    else:
        raise AssertionError("no event after a fresh list")
