"""`modelcache prewarm`: the ModelPrewarm resource from the user's side, against the fake API server.

The fake (tests/fake_k8s.py) gets a small store of ModelPrewarm objects here
(create, get, list, replace with resourceVersion conflicts, delete, the API
group's discovery document), proven first with the real ``kubernetes``
client. The CLI runs as a subprocess; the test plays the node daemons by
writing status into the store while ``--wait`` watches.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fake_k8s import FakeKubernetes, FakeRequest, status

ROOT = Path(__file__).resolve().parent.parent
BASE = "/apis/modelcache.io/v1alpha1"
MODEL = "oci://registry.example.com/models/llama:v1"
LABEL = "modelcache.io/warm-0123456789"


class PrewarmStore:
    """ModelPrewarm objects as the API server keeps them: generation, resourceVersion, status subresource."""

    def __init__(self, fake: FakeKubernetes) -> None:
        self.objects: dict[tuple[str, str], dict] = {}
        self.installed = True  # the CRD: discovery answers, the routes exist
        self.before_put: Callable[[dict], None] | None = None  # a concurrent writer, run inside a PUT
        self._version = 0
        self._lock = threading.Lock()
        items = rf"{BASE}/namespaces/([^/]+)/modelprewarms"
        fake.route("GET", BASE, self._discovery)
        fake.route("GET", items, self._list)
        fake.route("POST", items, self._create)
        fake.route("GET", items + "/([^/]+)", self._get)
        fake.route("PUT", items + "/([^/]+)", self._replace)
        fake.route("DELETE", items + "/([^/]+)", self._delete)

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    def _missing(self, request: FakeRequest) -> tuple[int, Any] | None:
        if not self.installed:
            return status(404, "NotFound", "the server could not find the requested resource")
        return None

    def _discovery(self, request: FakeRequest) -> tuple[int, Any]:
        return self._missing(request) or (200, {
            "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "modelcache.io/v1alpha1",
            "resources": [{"name": "modelprewarms", "singularName": "modelprewarm", "namespaced": True,
                           "kind": "ModelPrewarm", "verbs": ["create", "delete", "get", "list", "update", "watch"]},
                          {"name": "modelprewarms/status", "singularName": "", "namespaced": True,
                           "kind": "ModelPrewarm", "verbs": ["get", "patch", "update"]}]})

    def _list(self, request: FakeRequest) -> tuple[int, Any]:
        with self._lock:
            ns = request.match.group(1)  # type: ignore[union-attr]
            items = [copy.deepcopy(o) for (n, _), o in sorted(self.objects.items()) if n == ns]
            return self._missing(request) or (200, {"apiVersion": "modelcache.io/v1alpha1", "kind": "ModelPrewarmList",
                                                    "metadata": {"resourceVersion": str(self._version)},
                                                    "items": items})

    def _create(self, request: FakeRequest) -> tuple[int, Any]:
        with self._lock:
            ns, body = request.match.group(1), copy.deepcopy(request.body)  # type: ignore[union-attr]
            key = (ns, body["metadata"]["name"])
            if key in self.objects:
                return status(409, "AlreadyExists", f'modelprewarms.modelcache.io "{key[1]}" already exists')
            if not isinstance(body.get("spec", {}).get("model"), str):
                return status(422, "Invalid", "ModelPrewarm.modelcache.io is invalid: spec.model: Required value")
            body.pop("status", None)  # the status subresource: the main resource never writes it
            body["metadata"].update(namespace=ns, generation=1, resourceVersion=self._next_version(),
                                    uid=f"uid-{key[1]}", creationTimestamp="2026-01-01T00:00:00Z")
            self.objects[key] = body
            return self._missing(request) or (201, copy.deepcopy(body))

    def _get(self, request: FakeRequest) -> tuple[int, Any]:
        with self._lock:
            key = (request.match.group(1), request.match.group(2))  # type: ignore[union-attr]
            if key not in self.objects:
                return self._missing(request) or status(404, "NotFound",
                                                        f'modelprewarms.modelcache.io "{key[1]}" not found')
            return 200, copy.deepcopy(self.objects[key])

    def _replace(self, request: FakeRequest) -> tuple[int, Any]:
        if self.before_put is not None:
            hook, self.before_put = self.before_put, None
            hook(self.objects[(request.match.group(1), request.match.group(2))])  # type: ignore[union-attr]
        with self._lock:
            key = (request.match.group(1), request.match.group(2))  # type: ignore[union-attr]
            current, body = self.objects.get(key), copy.deepcopy(request.body)
            if current is None:
                return status(404, "NotFound", f'modelprewarms.modelcache.io "{key[1]}" not found')
            if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
                return status(409, "Conflict", f'Operation cannot be fulfilled on modelprewarms.modelcache.io '
                                               f'"{key[1]}": the object has been modified')
            if body.get("spec") != current.get("spec"):
                current["metadata"]["generation"] += 1
            current["spec"] = body.get("spec")
            current["metadata"]["labels"] = body["metadata"].get("labels") or {}
            current["metadata"]["resourceVersion"] = self._next_version()
            return 200, copy.deepcopy(current)

    def _delete(self, request: FakeRequest) -> tuple[int, Any]:
        with self._lock:
            key = (request.match.group(1), request.match.group(2))  # type: ignore[union-attr]
            if self.objects.pop(key, None) is None:
                return self._missing(request) or status(404, "NotFound",
                                                        f'modelprewarms.modelcache.io "{key[1]}" not found')
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}

    # -- the test plays the daemons ------------------------------------------

    def set_status(self, ns: str, name: str, st: dict) -> None:
        """Write status as the daemons would (through the status subresource: the generation stays)."""
        with self._lock:
            self.objects[(ns, name)]["status"] = st
            self.objects[(ns, name)]["metadata"]["resourceVersion"] = self._next_version()

    def get(self, ns: str, name: str) -> dict | None:
        with self._lock:
            found = self.objects.get((ns, name))
            return copy.deepcopy(found) if found else None


@pytest.fixture
def kube(tmp_path: Path):
    with FakeKubernetes() as fake:
        fake.write_kubeconfig(tmp_path / "kubeconfig")
        yield fake


@pytest.fixture
def store(kube: FakeKubernetes) -> PrewarmStore:
    return PrewarmStore(kube)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MODELCACHE_", "KUBERNETES_SERVICE_", "KUBECONFIG"))}
    return env | {"PYTHONPATH": str(ROOT), "HOME": str(tmp_path)} | extra


def _cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "modelcache", "prewarm", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or _env(tmp_path))


def _run(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
         kubeconfig: bool = True) -> subprocess.CompletedProcess[str]:
    full = [*args, "--kubeconfig", str(tmp_path / "kubeconfig")] if kubeconfig else list(args)
    proc = _cli(tmp_path, *full, env=env)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _until(predicate: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _gets(kube: FakeKubernetes, name: str) -> int:
    return sum(1 for r in kube.received(f"/modelprewarms/{name}") if r.method == "GET")


def _node(node: str, state: str, done: int = 0, total: int = 0, reason: str = "") -> dict:
    return {"node": node, "state": state, "bytesDone": done, "bytesTotal": total, "reason": reason}


# -- the fake, proven with the real client -------------------------------------


def test_fake_store_answers_the_real_client(tmp_path: Path, kube: FakeKubernetes, store: PrewarmStore) -> None:
    """Discovery, create, get, replace (and its conflict), list, delete: as the `kubernetes` client expects."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    configuration = client.Configuration()
    config.load_kube_config(config_file=str(tmp_path / "kubeconfig"), client_configuration=configuration)
    api = client.CustomObjectsApi(client.ApiClient(configuration))
    args = ("modelcache.io", "v1alpha1", "ml", "modelprewarms")
    assert [r.name for r in api.get_api_resources("modelcache.io", "v1alpha1").resources][0] == "modelprewarms"
    made = api.create_namespaced_custom_object(*args, {"apiVersion": "modelcache.io/v1alpha1", "kind": "ModelPrewarm",
                                                       "metadata": {"name": "a"}, "spec": {"model": MODEL}})
    assert made["metadata"]["generation"] == 1
    stale = api.get_namespaced_custom_object(*args, "a")
    fresh = copy.deepcopy(stale)
    fresh["spec"]["count"] = 2
    assert api.replace_namespaced_custom_object(*args, "a", fresh)["metadata"]["generation"] == 2
    with pytest.raises(ApiException) as conflict:
        api.replace_namespaced_custom_object(*args, "a", stale)
    assert conflict.value.status == 409
    assert [o["metadata"]["name"] for o in api.list_namespaced_custom_object(*args)["items"]] == ["a"]
    api.delete_namespaced_custom_object(*args, "a")
    with pytest.raises(ApiException) as gone:
        api.get_namespaced_custom_object(*args, "a")
    assert gone.value.status == 404
    store.installed = False
    with pytest.raises(ApiException) as no_crd:
        api.get_api_resources("modelcache.io", "v1alpha1")
    assert no_crd.value.status == 404


# -- create, update, delete, list -------------------------------------------------


def test_prewarm_creates_then_replaces_the_spec(tmp_path: Path, store: PrewarmStore) -> None:
    """Flags become the spec; a second run replaces it (a flag left out is removed); the same run is unchanged."""
    out = _run(tmp_path, MODEL, "--name", "llama", "-n", "ml", "--selector", "pool=gpu", "--selector",
               "node.kubernetes.io/instance-type=g6.xlarge", "--count", "2", "--include", "*.safetensors",
               "--exclude", "original/*")
    assert out.returncode == 0 and "modelprewarms.modelcache.io/llama created in ml" in out.stdout, out.stderr
    obj = store.get("ml", "llama")
    assert obj is not None and obj["spec"] == {
        "model": MODEL, "pin": True, "include": ["*.safetensors"], "exclude": ["original/*"], "count": 2,
        "nodeSelector": {"matchLabels": {"pool": "gpu", "node.kubernetes.io/instance-type": "g6.xlarge"}}}

    out = _run(tmp_path, MODEL, "--name", "llama", "-n", "ml", "--no-pin")
    assert out.returncode == 0 and "llama configured in ml" in out.stdout, out.stderr
    obj = store.get("ml", "llama")
    assert obj is not None and obj["spec"] == {"model": MODEL, "pin": False}
    assert obj["metadata"]["generation"] == 2

    out = _run(tmp_path, MODEL, "--name", "llama", "-n", "ml", "--no-pin")
    assert out.returncode == 0 and "llama unchanged in ml" in out.stdout
    assert store.get("ml", "llama")["metadata"]["generation"] == 2  # type: ignore[index]


def test_update_reads_again_after_a_conflict(tmp_path: Path, kube: FakeKubernetes, store: PrewarmStore) -> None:
    """A write between our read and our replace is a 409; we read again, keep theirs, and apply ours."""
    assert _run(tmp_path, MODEL, "--name", "llama").returncode == 0

    def someone_else(obj: dict) -> None:  # e.g. a GitOps tool adding a label meanwhile
        obj["metadata"]["labels"] = {"team": "search"}
        obj["metadata"]["resourceVersion"] += "0"

    store.before_put = someone_else
    out = _run(tmp_path, MODEL, "--name", "llama", "--count", "3")
    assert out.returncode == 0 and "configured" in out.stdout, out.stderr
    assert len([r for r in kube.received("/modelprewarms/llama") if r.method == "PUT"]) == 2
    obj = store.get("default", "llama")
    assert obj is not None and obj["spec"]["count"] == 3 and obj["metadata"]["labels"] == {"team": "search"}


def test_delete_and_list(tmp_path: Path, store: PrewarmStore) -> None:
    """--list shows name, model and ready/desired; --delete removes; deleting again is a clear not-found."""
    assert _run(tmp_path, MODEL, "--name", "llama").returncode == 0
    assert _run(tmp_path, "oci://registry.example.com/models/qwen:v2", "--name", "qwen").returncode == 0
    store.set_status("default", "llama", {"ready": 1, "desired": 2})
    listed = _run(tmp_path, "--list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["NAME", "MODEL", "READY", "AGE"]
    assert lines[1].split()[:3] == ["llama", MODEL, "1/2"] and lines[2].split()[:3][0] == "qwen"

    out = _run(tmp_path, "--delete", "llama")
    assert out.returncode == 0 and "llama deleted" in out.stdout and store.get("default", "llama") is None
    again = _run(tmp_path, "--delete", "llama")
    assert again.returncode == 3 and again.stderr.startswith("modelcache: error:") and "not found" in again.stderr


def test_kubeconfig_from_the_environment_and_its_namespace(tmp_path: Path, store: PrewarmStore) -> None:
    """Without --kubeconfig: $KUBECONFIG; without -n: the context's namespace."""
    config = json.loads((tmp_path / "kubeconfig").read_text())
    config["contexts"][0]["context"]["namespace"] = "inference"
    (tmp_path / "ns-kubeconfig").write_text(json.dumps(config))
    out = _run(tmp_path, MODEL, "--name", "llama", kubeconfig=False,
               env=_env(tmp_path, KUBECONFIG=str(tmp_path / "ns-kubeconfig")))
    assert out.returncode == 0, out.stderr
    assert store.get("inference", "llama") is not None and store.get("default", "llama") is None


# -- --wait ---------------------------------------------------------------------------


def test_wait_follows_each_node_until_ready(tmp_path: Path, kube: FakeKubernetes, store: PrewarmStore) -> None:
    """A status left from the previous spec is not Ready; then per-node lines, and Ready ends it with exit 0."""
    assert _run(tmp_path, MODEL, "--name", "llama").returncode == 0
    stale = {"observedGeneration": 1, "ready": 1, "desired": 1, "nodes": [_node("node-a", "Ready", 10, 10)],
             "conditions": [{"type": "Ready", "status": "True"}]}
    store.set_status("default", "llama", stale)
    proc = _cli(tmp_path, MODEL, "--name", "llama", "--count", "2", "--wait", "--interval", "0.1",
                "--kubeconfig", str(tmp_path / "kubeconfig"))
    try:
        _until(lambda: (store.get("default", "llama") or {})["metadata"]["generation"] == 2, "the update")
        seen = _gets(kube, "llama")
        _until(lambda: _gets(kube, "llama") >= seen + 3, "the CLI to read the stale status")
        assert proc.poll() is None  # generation 2 was not observed yet: still waiting

        store.set_status("default", "llama", {"observedGeneration": 2, "ready": 1, "desired": 2, "nodes": [
            _node("node-a", "Ready", 4 << 30, 4 << 30), _node("node-b", "Pulling", 1 << 30, 4 << 30)],
            "conditions": [{"type": "Ready", "status": "False", "reason": "Pulling"}]})
        seen = _gets(kube, "llama")
        _until(lambda: _gets(kube, "llama") >= seen + 3, "the CLI to read the progress")
        assert proc.poll() is None
        store.set_status("default", "llama", {"observedGeneration": 2, "ready": 2, "desired": 2, "nodeLabel": LABEL,
                                              "nodes": [_node("node-a", "Ready", 4 << 30, 4 << 30),
                                                        _node("node-b", "Ready", 4 << 30, 4 << 30)],
                                              "conditions": [{"type": "Ready", "status": "True"}]})
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "node-b  Pulling  1.0 GiB / 4.0 GiB" in err.splitlines()
    assert "node-b  Ready" in err.splitlines() and "node-a  Ready" in err.splitlines()
    assert f"Ready on 2/2 nodes; pods can prefer nodes labelled {LABEL}=true" in out


def test_wait_exits_non_zero_when_a_node_fails(tmp_path: Path, store: PrewarmStore) -> None:
    """A node in state Failed ends the wait with its reason and exit 1."""
    proc = _cli(tmp_path, MODEL, "--name", "llama", "--wait", "--interval", "0.1",
                "--kubeconfig", str(tmp_path / "kubeconfig"))
    try:
        _until(lambda: store.get("default", "llama"), "the create")
        store.set_status("default", "llama", {"observedGeneration": 1, "ready": 0, "desired": 2, "nodes": [
            _node("node-a", "Pulling", 5, 10), _node("node-b", "Failed", reason="manifest unknown at the origin")]})
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert "failed on 1 node(s): node-b: manifest unknown at the origin" in err.splitlines()[-1]


def test_wait_times_out(tmp_path: Path, store: PrewarmStore) -> None:
    """Never Ready: exit 6 after --timeout, saying how many nodes were ready."""
    started = time.monotonic()
    out = _run(tmp_path, MODEL, "--name", "llama", "--wait", "--timeout", "1", "--interval", "0.2")
    assert out.returncode == 6 and "not Ready after 1s: 0/? nodes ready" in out.stderr, out.stderr
    assert time.monotonic() - started < 60


# -- errors ------------------------------------------------------------------------------


def test_crd_not_installed_says_how_to_install_it(tmp_path: Path, store: PrewarmStore) -> None:
    """The group's discovery is 404: one line naming `kubectl apply -k daemonset/`, exit 3, for every mode."""
    store.installed = False
    for args in ([MODEL, "--name", "llama"], ["--delete", "llama"], ["--list"]):
        out = _run(tmp_path, *args)
        assert out.returncode == 3, out.stderr
        assert out.stderr.count("\n") == 1 and "kubectl apply -k daemonset/" in out.stderr


def test_no_cluster_reachable(tmp_path: Path, kube: FakeKubernetes) -> None:
    """The API server is down: one line naming its address, exit 6."""
    kube.stop()
    out = _run(tmp_path, MODEL, "--name", "llama")
    assert out.returncode == 6 and f"cannot reach the Kubernetes API at {kube.url}" in out.stderr, out.stderr


def test_refusals_are_one_line(tmp_path: Path, kube: FakeKubernetes, store: PrewarmStore) -> None:
    """RBAC says no: exit 4 with the server's message; bad input never reaches the server."""
    kube.fail = status(403, "Forbidden", 'modelprewarms.modelcache.io "llama" is forbidden: User "dev" cannot get')
    out = _run(tmp_path, MODEL, "--name", "llama")
    assert out.returncode == 4 and "cannot get" in out.stderr and "RBAC" in out.stderr, out.stderr
    kube.fail = None
    before = len(kube.requests)
    for args, message in (([MODEL], "needs --name"), (["models/llama", "--name", "x"], "give its scheme"),
                          (["oci://Registry/UPPER", "--name", "x"], "oci://"),
                          ([MODEL, "--name", "Bad_Name"], "--name"), ([MODEL, "--name", "x", "--count", "0"], "--count"),
                          ([MODEL, "--name", "x", "--list"], "not REF and --list"),
                          ([MODEL, "--name", "x", "--selector", "pool"], "KEY=VALUE"),
                          ([MODEL, "--name", "x", "--selector", "-bad=x"], "KEY=VALUE")):
        bad = _run(tmp_path, *args)
        assert bad.returncode == 2 and message in bad.stderr, (args, bad.stderr)
    assert len(kube.requests) == before


def test_wait_draws_a_bar_per_node_on_a_terminal(tmp_path: Path, store: PrewarmStore) -> None:
    """stderr a terminal: a rich progress bar per node (bytes done of total, state), not lines."""
    import pty
    import select

    assert _run(tmp_path, MODEL, "--name", "llama").returncode == 0
    store.set_status("default", "llama", {"observedGeneration": 1, "ready": 1, "desired": 2, "nodes": [
        _node("node-a", "Ready", 2 << 30, 2 << 30), _node("node-b", "Pulling", 1 << 30, 2 << 30)]})
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "modelcache", "prewarm", MODEL, "--name", "llama", "--wait",
                             "--interval", "0.1", "--kubeconfig", str(tmp_path / "kubeconfig")],
                            stdout=subprocess.PIPE, stderr=slave, text=True, env=_env(tmp_path, COLUMNS="100"))
    os.close(slave)
    drawn = b""
    try:
        def read_some() -> bytes:
            nonlocal drawn
            if select.select([master], [], [], 0.1)[0]:
                with contextlib.suppress(OSError):
                    drawn += os.read(master, 65536)
            return drawn

        _until(lambda: b"node-b" in read_some() and b"Pulling" in drawn, "the bars")
        store.set_status("default", "llama", {"observedGeneration": 1, "ready": 2, "desired": 2, "nodes": [
            _node("node-a", "Ready", 2 << 30, 2 << 30), _node("node-b", "Ready", 2 << 30, 2 << 30)],
            "conditions": [{"type": "Ready", "status": "True"}]})
        out, _ = proc.communicate(timeout=60)
        for _ in range(20):  # what rich drew last, after the process ended
            if not select.select([master], [], [], 0.1)[0]:
                break
            with contextlib.suppress(OSError):
                chunk = os.read(master, 65536)
                if not chunk:
                    break
                drawn += chunk
    finally:
        proc.kill()
        os.close(master)
    text = drawn.decode(errors="replace")
    assert proc.returncode == 0 and "Ready on 2/2 nodes" in out
    assert "1.0/2.0 GiB" in text and "2.0/2.0 GiB" in text  # rich's DownloadColumn, binary units
    assert "\x1b[" in text and "node-a  Ready" not in text  # drawn as a live display, not as lines


def test_flags_from_the_environment(tmp_path: Path, store: PrewarmStore) -> None:
    """MODELCACHE_<FLAG> for each flag: kubeconfig, name, namespace, selector list, count, no-pin."""
    env = _env(tmp_path, MODELCACHE_KUBECONFIG=str(tmp_path / "kubeconfig"), MODELCACHE_NAME="llama",
               MODELCACHE_NAMESPACE="ml", MODELCACHE_SELECTOR="pool=gpu,zone=a", MODELCACHE_COUNT="2",
               MODELCACHE_NO_PIN="1")
    out = _run(tmp_path, MODEL, env=env, kubeconfig=False)
    assert out.returncode == 0, out.stderr
    obj = store.get("ml", "llama")
    assert obj is not None and obj["spec"] == {"model": MODEL, "pin": False, "count": 2,
                                               "nodeSelector": {"matchLabels": {"pool": "gpu", "zone": "a"}}}
    bad = _run(tmp_path, MODEL, env={**env, "MODELCACHE_SELECTOR": "pool"}, kubeconfig=False)
    assert bad.returncode == 2 and "--selector 'pool'" in bad.stderr
