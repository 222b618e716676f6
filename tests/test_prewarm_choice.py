"""The pieces of the pre-warm controller's decision: selectors, rendezvous choice, the warm-node label,
the CRD's schema, the RBAC the daemon is given, and the serve flags."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import yaml
from daemon_support import free_port

from modelcache.kube import names, rendezvous, selector

ROOT = Path(__file__).resolve().parent.parent / "daemonset"


def test_label_selector_terms() -> None:
    labels = {"pool": "gpu", "zone": "a"}
    assert selector.matches(None, labels) and selector.matches({}, {})
    assert selector.matches({"matchLabels": {"pool": "gpu"}}, labels)
    assert not selector.matches({"matchLabels": {"pool": "cpu"}}, labels)
    assert selector.matches({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]}, labels)
    assert not selector.matches({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]},
                                labels)
    assert selector.matches({"matchExpressions": [{"key": "spot", "operator": "DoesNotExist"}]}, labels)
    assert not selector.matches({"matchExpressions": [{"key": "spot", "operator": "Exists"}]}, labels)
    # Terms are ANDed, and an operator we do not know selects nothing rather than everything.
    assert not selector.matches({"matchLabels": {"pool": "gpu"},
                                 "matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]}, labels)
    assert not selector.matches({"matchExpressions": [{"key": "zone", "operator": "Gt", "values": ["1"]}]}, labels)


def test_rendezvous_is_stable_and_moves_only_what_it_must() -> None:
    model = "oci://registry.example/llama:v1"
    nodes = [f"node-{i}" for i in range(20)]
    chosen = rendezvous.choose(model, nodes, 5)
    assert len(chosen) == 5 and rendezvous.choose(model, list(reversed(nodes)), 5) == chosen
    assert rendezvous.choose(model, nodes, None) == rendezvous.choose(model, nodes, 20)
    # A node that is not chosen leaves or joins: nothing moves. A chosen one leaves: one place moves.
    spare = next(n for n in nodes if n not in chosen)
    assert rendezvous.choose(model, [n for n in nodes if n != spare], 5) == chosen
    joined = rendezvous.choose(model, [*nodes, "node-new"], 5)
    assert joined == chosen or (joined.count("node-new") == 1 and set(joined) - {"node-new"} < set(chosen))
    after = rendezvous.choose(model, [n for n in nodes if n != chosen[0]], 5)
    assert set(chosen[1:]) <= set(after) and len(set(after) - set(chosen)) == 1
    # Another model spreads differently (the choice is per model, not a fixed ranking of nodes).
    assert any(rendezvous.choose(f"oci://r/m{i}:v1", nodes, 5) != chosen for i in range(5))


def test_warm_label_is_a_short_hash_of_the_digest() -> None:
    digest = "sha256:" + "ab" * 32
    label = names.warm_label(digest)
    assert label == "modelcache.io/warm-" + hashlib.sha256(digest.encode()).hexdigest()[:10]
    assert len(label.split("/", 1)[1]) <= 63 and names.warm_label("sha256:" + "cd" * 32) != label
    assert names.pin_owner("ml", "llama") == "prewarm:ml/llama"


def test_crd_names_schema_and_columns() -> None:
    [crd] = [d for d in yaml.safe_load_all((ROOT / "crd-modelprewarm.yaml").read_text()) if d]
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{names.PLURAL}.{names.GROUP}" and spec["scope"] == "Namespaced"
    assert spec["names"] == {"kind": names.KIND, "listKind": "ModelPrewarmList", "plural": names.PLURAL,
                             "singular": "modelprewarm", "shortNames": ["mpw"]}
    [version] = spec["versions"]
    assert version["name"] == names.VERSION and version["subresources"] == {
        "status": {}, "scale": {"specReplicasPath": ".spec.count", "statusReplicasPath": ".status.ready",
                                "labelSelectorPath": ".status.selector"}}
    schema = version["schema"]["openAPIV3Schema"]["properties"]
    fields = schema["spec"]["properties"]
    assert schema["spec"]["required"] == ["model"] and fields["model"]["minLength"] == 1
    assert fields["count"]["minimum"] == 1 and fields["pin"]["default"] is True
    entry = schema["status"]["properties"]["nodes"]
    assert entry["x-kubernetes-list-map-keys"] == ["node"]
    assert entry["items"]["properties"]["state"]["enum"] == list(names.STATES)
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {"Model": ".spec.model", "Ready": ".status.ready", "Desired": ".status.desired",
                       "Age": ".metadata.creationTimestamp"}
    assert "crd-modelprewarm.yaml" in yaml.safe_load((ROOT / "kustomization.yaml").read_text())["resources"]


def test_daemon_rbac_is_what_the_controller_uses() -> None:
    docs = [d for d in yaml.safe_load_all((ROOT / "rbac.yaml").read_text()) if d]
    grants = {(g, r, v) for d in docs if d["kind"] in ("ClusterRole", "Role") for rule in d["rules"]
              for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert {(g, r, v) for g, r, v in grants if r.startswith("nodes")} == {
        ("", "nodes", v) for v in ("get", "list", "watch", "patch")}
    assert {(r, v) for g, r, v in grants if g == names.GROUP} == {
        ("modelprewarms", "get"), ("modelprewarms", "list"), ("modelprewarms", "watch"),
        ("modelprewarms/status", "get"), ("modelprewarms/status", "patch"), ("modelprewarms/status", "update")}
    [leader] = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "modelcache-leader"]
    assert leader["metadata"]["namespace"] == "modelcache-system"
    assert {(g, r, v) for rule in leader["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]} == {("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")}
    [binding] = [d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["name"] == "modelcache-leader"]
    assert binding["roleRef"]["name"] == leader["metadata"]["name"]


def _serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modelcache", "serve", "--store", str(tmp_path / "store"),
                           "--listen", f"127.0.0.1:{free_port()}", "--csi-socket", str(tmp_path / "csi.sock"), *args],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "MODELCACHE_API_AUTH": "token", **(env or {})})


def test_serve_refuses_prewarm_flags_that_cannot_work(tmp_path: Path) -> None:
    """One-line errors, exit 2: a startup taint without the controller, an unreadable kubeconfig, a bad env."""
    out = _serve(tmp_path, "--startup-taint", "modelcache.io/warming")
    assert out.returncode == 2 and "--prewarm on" in out.stderr and "Traceback" not in out.stderr
    out = _serve(tmp_path, "--prewarm", "on", "--kubeconfig", str(tmp_path / "absent"))
    assert out.returncode == 2 and "--prewarm" in out.stderr and "Traceback" not in out.stderr
    out = _serve(tmp_path, env={"MODELCACHE_PREWARM": "maybe"})
    assert out.returncode == 2 and "MODELCACHE_PREWARM" in out.stderr
    out = _serve(tmp_path, "--kubeconfig", str(tmp_path / "k"), "--prewarm", "off")
    assert out.returncode == 2 and "--kubeconfig is for" in out.stderr


def test_example_prewarm_uses_only_fields_of_the_crd() -> None:
    [crd] = [d for d in yaml.safe_load_all((ROOT / "crd-modelprewarm.yaml").read_text()) if d]
    fields = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    [example] = [d for d in yaml.safe_load_all((ROOT / "examples" / "modelprewarm.yaml").read_text()) if d]
    assert example["apiVersion"] == names.API_VERSION and example["kind"] == names.KIND
    assert example["spec"]["model"] and set(example["spec"]) <= set(fields)
    assert set(example["spec"]["nodeSelector"]) <= set(fields["nodeSelector"]["properties"])
