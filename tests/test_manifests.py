"""The Kubernetes manifests under daemonset/: well-formed, consistent with the code."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from modelcache.cli import build_parser
from modelcache.csi import DRIVER_NAME

ROOT = Path(__file__).resolve().parent.parent / "daemonset"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_kustomization_lists_every_base_file() -> None:
    """Every resource the kustomization names exists and parses as a Kubernetes object."""
    kustomization = _docs(ROOT / "kustomization.yaml")[0]
    for name in kustomization["resources"]:
        for doc in _docs(ROOT / name):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"]


def test_csidriver_matches_the_plugin() -> None:
    """The CSIDriver names our driver: inline ephemeral, no attach, pod info on mount."""
    [driver] = _docs(ROOT / "csidriver.yaml")
    assert driver["metadata"]["name"] == DRIVER_NAME
    assert driver["spec"]["volumeLifecycleModes"] == ["Ephemeral"]
    assert driver["spec"]["attachRequired"] is False and driver["spec"]["podInfoOnMount"] is True


def test_daemonset_wires_socket_env_and_propagation() -> None:
    """The daemon's env vars are flags it knows; registrar and daemon share the socket; mounts propagate."""
    [ds] = _docs(ROOT / "daemonset.yaml")
    containers = {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}
    daemon, registrar = containers["modelcache"], containers["node-driver-registrar"]
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    known = {"MODELCACHE_" + a.dest.upper() for a in serve._actions} | {"MODELCACHE_STORE"}
    env = {e["name"]: e for e in daemon["env"]}
    assert set(env) <= known
    assert env["MODELCACHE_CSI_SOCKET"]["value"] == "/csi/csi.sock"
    assert "--csi-address=/csi/csi.sock" in registrar["args"]
    assert f"--kubelet-registration-path=/var/lib/kubelet/plugins/{DRIVER_NAME}/csi.sock" in registrar["args"]
    pods = [m for m in daemon["volumeMounts"] if m["mountPath"] == "/var/lib/kubelet/pods"]
    assert pods and pods[0]["mountPropagation"] == "Bidirectional"
    assert daemon["securityContext"]["privileged"] is True  # mount(2), and Bidirectional propagation needs it
    # Every node, tainted ones (GPU pools) included: a pod scheduled there needs the driver.
    assert {"operator": "Exists"} in ds["spec"]["template"]["spec"]["tolerations"]


def test_example_pod_uses_the_driver() -> None:
    """The inline-volume example names the driver and a model attribute the plugin parses."""
    [pod] = _docs(ROOT / "examples" / "pod-csi-inline.yaml")
    [volume] = pod["spec"]["volumes"]
    assert volume["csi"]["driver"] == DRIVER_NAME and volume["csi"]["volumeAttributes"]["model"].startswith("oci://")


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl not installed")
def test_kustomize_builds() -> None:
    """`kubectl kustomize` renders the base (offline)."""
    out = subprocess.run(["kubectl", "kustomize", str(ROOT)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(out.stdout) if d}
    assert {"Namespace", "ServiceAccount", "ClusterRole", "CSIDriver", "Service", "DaemonSet"} <= kinds
