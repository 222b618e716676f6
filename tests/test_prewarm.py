"""The ModelPrewarm controller: real `modelcache serve` daemons (one per fake node) against the fake API.

The fake API server (tests/fake_k8s.py, proven with the real client in
test_fake_k8s.py) holds the Nodes, the ModelPrewarms and the Lease; the
models come from the suite's real registry. Each daemon runs with
``--node-name`` set to its fake node and ``--prewarm on``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_support import DaemonProcess, start_daemon
from fake_k8s import FakeKubernetes
from faultproxy import FaultProxy
from support import MP_ARTIFACT, MP_CONFIG, MP_WEIGHT

from modelcache.kube import names, rendezvous

NS = "ml"
TAINT = "modelcache.io/warming"
DATA = os.urandom(3 << 20)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll ``check`` until it returns something true; its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Cluster:
    """The fake API, its kubeconfig, and the daemons started on its nodes."""

    def __init__(self, fake: FakeKubernetes, root: Path) -> None:
        self.fake, self.root = fake, root
        self.kubeconfig = fake.write_kubeconfig(root / "kubeconfig")
        self.daemons: dict[str, DaemonProcess] = {}

    def node(self, name: str, labels: dict[str, str] | None = None, taints: list[dict] | None = None) -> None:
        self.fake.objects.create("nodes", {"metadata": {"name": name, "labels": labels or {}},
                                           "spec": {"taints": taints or []}})

    def start(self, node: str, *extra: str) -> DaemonProcess:
        daemon = start_daemon(self.root / node, "--node-name", node, "--kubeconfig", str(self.kubeconfig),
                              "--prewarm", "on", "--prewarm-namespace", "modelcache-system",
                              "--prewarm-resync", "2", "--prewarm-progress", "0.3", "--lease-duration", "3", "--retries", "1", *extra)
        self.daemons[node] = daemon
        return daemon

    def prewarm(self, name: str, model: str, **spec: Any) -> dict:
        return self.fake.objects.create("modelprewarms", {
            "apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": name},
            "spec": {"model": model, **spec}}, NS)

    def status(self, name: str) -> dict:
        obj = self.fake.objects.get("modelprewarms", name, NS)
        return (obj or {}).get("status") or {}

    def entries(self, name: str) -> dict[str, dict]:
        return {e["node"]: e for e in self.status(name).get("nodes") or []}

    def labels(self, node: str) -> dict[str, str]:
        return self.fake.objects.get("nodes", node)["metadata"].get("labels") or {}

    def warm_labels(self, node: str) -> set[str]:
        return {k for k in self.labels(node) if k.startswith(names.LABEL_PREFIX)}

    def taints(self, node: str) -> list[str]:
        return [t["key"] for t in (self.fake.objects.get("nodes", node).get("spec") or {}).get("taints") or []]

    def set_labels(self, node: str, labels: dict[str, str]) -> None:
        def change(obj: dict) -> None:
            obj["metadata"]["labels"] = {**(obj["metadata"].get("labels") or {}), **labels}

        self.fake.objects.update("nodes", node, change=change)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with FakeKubernetes() as fake:
        fake.objects.bookmark_interval = 0.5
        c = Cluster(fake, tmp_path)
        try:
            yield c
        finally:
            for d in c.daemons.values():
                d.stop()


def _push(registry, repo: str, data: bytes = DATA) -> str:
    registry.push_image(repo, "v1", [(data, MP_WEIGHT, {"org.cncf.model.filepath": "w.bin"})],
                        config=b"{}", config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)
    return f"oci://{registry.host}/{repo}:v1"


def _model(daemon: DaemonProcess) -> dict:
    [model] = daemon.call("GET", "/v1/models")[1]["models"]
    return model


def _ready(c: Cluster, name: str, n: int) -> Callable[[], bool]:
    def check() -> bool:
        s = c.status(name)
        cond = next((x for x in s.get("conditions") or [] if x["type"] == "Ready"), {})
        return s.get("ready") == n and s.get("desired") == n and cond.get("status") == "True"
    return check


def test_resource_before_the_daemon_conflicts_and_deletion(cluster: Cluster, registry) -> None:
    """A ModelPrewarm made before the daemon started is warmed, pinned, labelled and reported, through
    forced status conflicts; deleting it unpins the model (the files stay) and removes the label."""
    c = cluster
    ref = _push(registry, "prewarm/before")
    c.node("node-a", {"pool": "gpu"})
    c.prewarm("llama", ref, nodeSelector={"matchLabels": {"pool": "gpu"}})
    c.fake.objects.conflict_next("modelprewarms", 3, status=True)  # the first three status writes conflict
    daemon = c.start("node-a")

    wait_for("Ready 1/1", _ready(c, "llama", 1))
    status = c.status("llama")
    assert c.entries("llama")["node-a"]["state"] == "Ready" and status["observedGeneration"] == 1
    assert status["selector"] == names.scale_selector(NS, "llama")  # the HPA's scale subresource needs it
    model = _model(daemon)
    label = names.warm_label(model["digest"])
    assert status["nodeLabel"] == label and len(label.split("/")[1]) <= 63
    wait_for("the warm label", lambda: c.labels("node-a").get(label) == "true")
    assert model["pinned"] is True and model["ref"] == ref
    patches = [r for r in c.fake.requests if r.method == "PATCH" and r.path.endswith("/llama/status")]
    assert len(patches) >= 4  # three refused, then written

    # A spec change moves the generation; the leader reports it observed.
    c.fake.objects.update("modelprewarms", "llama", NS, change=lambda o: o["spec"].update(pin=True))
    wait_for("observedGeneration 2", lambda: c.status("llama").get("observedGeneration") == 2)

    c.fake.objects.delete("modelprewarms", "llama", NS)
    wait_for("the label removed", lambda: not c.warm_labels("node-a"))
    wait_for("the pin dropped", lambda: _model(daemon)["pinned"] is False)
    assert Path(_model(daemon)["path"]).is_dir()  # unpinned, not deleted: the files stay until evicted
    assert c.labels("node-a")["pool"] == "gpu"


def test_three_daemons_count_two_and_a_node_that_stops_matching(cluster: Cluster, registry) -> None:
    """count: 2 over three matching nodes warms exactly the two rendezvous picks, labels exactly those,
    stays put when another node's unrelated labels change, and moves when a chosen node stops matching."""
    c = cluster
    ref = _push(registry, "prewarm/count")
    nodes = ["node-a", "node-b", "node-c"]
    for n in nodes:
        c.node(n, {"pool": "gpu"})
    c.prewarm("shared", ref, nodeSelector={"matchExpressions": [{"key": "pool", "operator": "In",
                                                                 "values": ["gpu"]}]}, count=2)
    for n in nodes:
        c.start(n)
    chosen = rendezvous.choose(ref, nodes, 2)
    [other] = set(nodes) - set(chosen)

    wait_for("Ready 2/2", _ready(c, "shared", 2))
    label = c.status("shared")["nodeLabel"]
    wait_for("labels on the chosen two", lambda: all(label in c.warm_labels(n) for n in chosen))
    assert set(c.entries("shared")) == set(chosen)
    assert not c.warm_labels(other) and c.daemons[other].call("GET", "/v1/models")[1]["models"] == []
    lease = c.fake.objects.get("leases", "modelcache-prewarm", "modelcache-system")
    assert lease["spec"]["holderIdentity"] in nodes

    # Another node's unrelated label changes: nothing moves (wait past a resync of every daemon).
    c.set_labels(other, {"team": "search"})
    time.sleep(3)
    assert set(c.entries("shared")) == set(chosen) and not c.warm_labels(other)
    assert all(c.warm_labels(n) == {label} for n in chosen)
    assert c.daemons[other].call("GET", "/v1/models")[1]["models"] == []

    # A chosen node stops matching: it unpins and drops its label; the third node takes its place.
    leaving, staying = chosen
    c.set_labels(leaving, {"pool": "cpu"})
    wait_for("the leaving node's label removed", lambda: not c.warm_labels(leaving))
    wait_for("its pin dropped", lambda: _model(c.daemons[leaving])["pinned"] is False)
    wait_for("the third node warm", lambda: label in c.warm_labels(other))
    wait_for("Ready 2/2 again", lambda: _ready(c, "shared", 2)() and set(c.entries("shared")) == {staying, other})
    assert c.warm_labels(staying) == {label}


def test_a_watch_that_expires_relists(cluster: Cluster, registry) -> None:
    """After 410 Gone the daemon lists again and sees a resource made while its watch was gone."""
    c = cluster
    c.node("node-a")
    c.start("node-a")

    def watching() -> bool:  # started, not just asked for: an expire() before its start would miss it
        return c.fake.objects.watching("modelprewarms") > 0

    def lists() -> int:
        return sum(1 for r in c.fake.requests if r.method == "GET" and r.path.endswith("/modelprewarms")
                   and "watch=" not in r.query.lower())

    wait_for("the daemon's watch", watching)
    before = lists()
    c.fake.objects.expire()
    c.prewarm("after", _push(registry, "prewarm/relist"))
    wait_for("Ready after the relist", _ready(c, "after", 1))
    assert lists() > before


def test_startup_taint_removed_once_ready_and_not_before(cluster: Cluster, registry) -> None:
    """The startup taint stays while the model pulls and goes once it is Ready; other taints stay."""
    c = cluster
    ref = _push(registry, "prewarm/gate")
    gpu = {"key": "nvidia.com/gpu", "effect": "NoSchedule", "value": "present"}
    c.node("node-a", taints=[{"key": TAINT, "effect": "NoSchedule"}, gpu])
    with FaultProxy(registry.host, rate=1 << 20) as proxy:  # about 3 s for the model
        slow = ref.replace(registry.host, proxy.host)
        c.prewarm("gated", slow)
        c.start("node-a", "--startup-taint", TAINT, "--startup-timeout", "120")
        wait_for("Pulling", lambda: c.entries("gated").get("node-a", {}).get("state") == "Pulling")
        assert TAINT in c.taints("node-a")
        wait_for("Ready", _ready(c, "gated", 1))
    wait_for("the taint removed", lambda: TAINT not in c.taints("node-a"))
    assert c.taints("node-a") == ["nvidia.com/gpu"]


def test_startup_timeout_releases_a_node_whose_model_fails(cluster: Cluster, registry) -> None:
    """A model that cannot be pulled holds the node only until --startup-timeout."""
    c = cluster
    c.node("node-a", taints=[{"key": TAINT, "effect": "NoSchedule"}])
    c.prewarm("broken", f"oci://{registry.host}/prewarm/absent:v1")
    started = time.monotonic()
    c.start("node-a", "--startup-taint", TAINT, "--startup-timeout", "6")  # Failed is seen well before
    wait_for("Failed", lambda: c.entries("broken").get("node-a", {}).get("state") == "Failed")
    assert c.entries("broken")["node-a"]["reason"]
    assert TAINT in c.taints("node-a")
    wait_for("the taint removed at the timeout", lambda: TAINT not in c.taints("node-a"), timeout=30)
    assert time.monotonic() - started >= 6
    cond = next(x for x in c.status("broken")["conditions"] if x["type"] == "Ready")
    assert cond["status"] == "False" and cond["reason"] == "PullFailed"


def test_restart_in_the_middle_of_a_pull(cluster: Cluster, registry) -> None:
    """A daemon stopped mid-pull resumes the pull when it starts again and reports Ready."""
    c = cluster
    ref = _push(registry, "prewarm/restart")
    c.node("node-a")
    # About 12 s for the model: a loaded CI machine may report the first bytes late, and the stop
    # must still land mid-pull.
    with FaultProxy(registry.host, rate=256 << 10) as proxy:
        c.prewarm("resumed", ref.replace(registry.host, proxy.host))
        first = c.start("node-a")
        wait_for("bytes moving", lambda: c.entries("resumed").get("node-a", {}).get("bytesDone", 0) > 0)
        assert first.stop() == 0
        assert c.entries("resumed")["node-a"]["state"] == "Pulling" and not c.warm_labels("node-a")
        c.start("node-a")
        wait_for("Ready after the restart", _ready(c, "resumed", 1))
        fetched = sum(e.bytes for e in proxy.blob_gets())
    assert fetched < 2 * len(DATA)  # resumed: what the first run fetched was kept
    label = c.status("resumed")["nodeLabel"]
    wait_for("the label", lambda: c.warm_labels("node-a") == {label})


def test_label_follows_the_disk_when_verification_deletes_the_model(cluster: Cluster, registry) -> None:
    """A pinned model that fails verification (`modelcache verify --delete`) loses its label at the next
    check, and is pulled again, so the label comes back only once the files are good."""
    c = cluster
    data = os.urandom(1 << 20)
    ref = _push(registry, "prewarm/verify", data)
    c.node("node-a")
    c.prewarm("checked", ref)
    daemon = c.start("node-a")
    wait_for("Ready", _ready(c, "checked", 1))
    label = c.status("checked")["nodeLabel"]
    wait_for("the label", lambda: c.warm_labels("node-a") == {label})

    blob = daemon.store / "blobs" / "sha256" / hashlib.sha256(data).hexdigest()
    with open(blob, "r+b") as f:  # bit rot (root writes through the 0444 mode)
        f.write(bytes([data[0] ^ 0xFF]))
    verify = subprocess.run([sys.executable, "-m", "modelcache", "verify", "--delete", "--store", str(daemon.store)],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 5, verify.stdout + verify.stderr

    def label_removed() -> bool:
        return any(r.method == "PATCH" and r.path == "/api/v1/nodes/node-a"
                   and (r.body or {}).get("metadata", {}).get("labels", {}).get(label, "x") is None
                   for r in c.fake.requests)

    wait_for("the label removed", label_removed, timeout=30)
    wait_for("pulled again and labelled", lambda: c.warm_labels("node-a") == {label} and _ready(c, "checked", 1)())
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
