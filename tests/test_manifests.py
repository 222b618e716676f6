"""The Kubernetes manifests under daemonset/: well-formed, consistent with the code."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from modelcache.cli import build_parser
from modelcache.csi import DRIVER_NAME
from modelcache.daemon.api import ACCESS
from modelcache.daemon.auth import API_GROUP

ROOT = Path(__file__).resolve().parent.parent / "daemonset"
# Variables the sources read (registry_auth, hf, s3): the only non-MODELCACHE_ env the DaemonSet sets.
CREDENTIAL_ENV = {"DOCKER_CONFIG", "HF_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                  "AWS_SECRET_ACCESS_KEY", "POD_NAMESPACE"}  # POD_NAMESPACE: expanded in the peers' Service name


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
    assert {name for name in env if name.startswith("MODELCACHE_")} <= known
    assert {name for name in env if not name.startswith("MODELCACHE_")} <= CREDENTIAL_ENV
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
    assert {"Namespace", "ServiceAccount", "ClusterRole", "CSIDriver", "Service", "DaemonSet", "NetworkPolicy"} <= kinds


def _pod_spec() -> dict:
    return _docs(ROOT / "daemonset.yaml")[0]["spec"]["template"]["spec"]


def _container(name: str) -> dict:
    return {c["name"]: c for c in _pod_spec()["containers"]}[name]


def test_daemonset_authenticates_api_callers_with_kubernetes() -> None:
    """The DaemonSet's args parse as `serve --api-auth kubernetes` (in-cluster config, no token file)."""
    args = build_parser().parse_args(["--store", "/x", *_container("modelcache")["args"]])
    assert args.command == "serve" and args.api_auth == "kubernetes"
    assert args.api_token_file is None and args.kubeconfig is None


def test_daemon_may_create_reviews_and_nothing_more_of_them() -> None:
    """The daemon's ServiceAccount is bound to create TokenReviews and SubjectAccessReviews, only create."""
    docs = _docs(ROOT / "rbac.yaml")
    roles = {d["metadata"]["name"]: d["rules"] for d in docs if d["kind"] == "ClusterRole"}
    bound = [d["roleRef"]["name"] for d in docs if d["kind"] == "ClusterRoleBinding"
             and {"kind": "ServiceAccount", "name": "modelcache", "namespace": "modelcache-system"} in d["subjects"]]
    grants = {(g, r, v) for name in bound for rule in roles[name] for g in rule["apiGroups"]
              for r in rule["resources"] for v in rule["verbs"]}
    review = {(g, r, v) for g, r, v in grants if g in ("authentication.k8s.io", "authorization.k8s.io")}
    assert review == {("authentication.k8s.io", "tokenreviews", "create"),
                      ("authorization.k8s.io", "subjectaccessreviews", "create")}
    # The daemon grants itself no rights on its own HTTP API (pulls, pins, models): only ModelPrewarms.
    assert {r for g, r, _ in grants if g == "modelcache.io"} <= {"modelprewarms", "modelprewarms/status"}


def test_prewarmer_role_covers_every_api_route() -> None:
    """The example ClusterRole grants each (resource, verb) the API asks for, in modelcache.io only, and binds it."""
    docs = _docs(ROOT / "examples" / "rbac-prewarmer.yaml")
    [role] = [d for d in docs if d["kind"] == "ClusterRole"]
    [binding] = [d for d in docs if d["kind"] == "ClusterRoleBinding"]
    granted = {(r, v) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert all(rule["apiGroups"] == [API_GROUP] for rule in role["rules"])
    assert set(ACCESS.values()) <= granted
    assert {("modelprewarms", v) for v in ("create", "get", "update", "delete")} <= granted
    assert binding["roleRef"]["name"] == role["metadata"]["name"] == "modelcache-prewarmer"
    assert binding["subjects"][0]["kind"] == "ServiceAccount"


def test_network_policy_admits_peers_and_scrapers_only_on_the_api_port() -> None:
    """Ingress to the daemon pods: their own kind, pods or namespaces labelled for scraping, on port http."""
    [policy] = _docs(ROOT / "networkpolicy.yaml")
    daemon_labels = _docs(ROOT / "daemonset.yaml")[0]["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= daemon_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    [rule] = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert "http" in {p["name"] for p in _container("modelcache")["ports"]}
    peers = {"podSelector": {"matchLabels": dict(policy["spec"]["podSelector"]["matchLabels"])}}
    assert peers in rule["from"]
    assert {"namespaceSelector": {"matchLabels": {"modelcache.io/scrape": "true"}}} in rule["from"]
    assert {"namespaceSelector": {}, "podSelector": {"matchLabels": {"modelcache.io/scrape": "true"}}} in rule["from"]
    for peer in rule["from"]:  # no entry admits everyone: each names a label
        assert any(sel.get("matchLabels") for sel in peer.values()), peer
    readme = (ROOT.parent / "README.md").read_text()
    assert "modelcache.io/scrape" in readme and "modelcache.io/api-client" in readme


def test_credentials_are_wired_and_optional() -> None:
    """Docker config.json from a Secret at $DOCKER_CONFIG, HF_TOKEN and AWS settings: all optional refs."""
    daemon, spec = _container("modelcache"), _pod_spec()
    env = {e["name"]: e for e in daemon["env"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    [mount] = [m for m in daemon["volumeMounts"] if m["mountPath"] == env["DOCKER_CONFIG"]["value"]]
    secret = volumes[mount["name"]]["secret"]
    assert mount["readOnly"] is True and secret["optional"] is True
    assert secret["items"] == [{"key": ".dockerconfigjson", "path": "config.json"}]
    refs = [e["valueFrom"] for e in daemon["env"] if "valueFrom" in e and "fieldRef" not in e["valueFrom"]]
    assert {"HF_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL"} <= set(env)
    assert refs and all(next(iter(r.values()))["optional"] is True for r in refs)
    # The example objects are the ones the DaemonSet names, with the keys it reads.
    examples = {(d["kind"], d["metadata"]["name"]): d for d in _docs(ROOT / "examples" / "credentials.yaml")}
    assert ".dockerconfigjson" in examples[("Secret", secret["secretName"])]["stringData"]
    for r in refs:
        kind, ref = ("Secret", r["secretKeyRef"]) if "secretKeyRef" in r else ("ConfigMap", r["configMapKeyRef"])
        example = examples[(kind, ref["name"])]
        assert ref["key"] in example.get("stringData", example.get("data", {})), ref
    assert "eks.amazonaws.com/role-arn" in (ROOT / "serviceaccount.yaml").read_text()  # IRSA, documented


def test_registrar_has_probe_and_resources() -> None:
    """The registrar serves /healthz on --http-endpoint, probed there, with requests and a memory limit."""
    registrar = _container("node-driver-registrar")
    [endpoint] = [a.split("=", 1)[1] for a in registrar["args"] if a.startswith("--http-endpoint=")]
    ports = {p["name"]: p["containerPort"] for p in registrar["ports"]}
    probe = registrar["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and endpoint == f":{ports[probe['port']]}"
    assert registrar["resources"]["requests"]["cpu"] and registrar["resources"]["limits"]["memory"]


def _expand(value: str, env: dict[str, dict]) -> str:
    """A container env value with $(VAR) of earlier variables expanded, as the kubelet does (fieldRefs by path)."""
    import re

    def one(m: re.Match[str]) -> str:
        ref = env[m[1]]["valueFrom"]["fieldRef"]["fieldPath"]
        return {"metadata.namespace": "modelcache-system"}[ref]

    return re.sub(r"\$\((\w+)\)", one, value)


def test_daemonset_finds_peers_through_its_headless_service() -> None:
    """--peers-k8s-service names the headless Service of these pods, in the pod's namespace; only ready
    daemons are listed; the NetworkPolicy admits them on the port the slices carry."""
    from modelcache.p2p.slices import parse_service

    daemon = _container("modelcache")
    env = {e["name"]: e for e in daemon["env"]}
    names = [e["name"] for e in daemon["env"]]
    assert names.index("POD_NAMESPACE") < names.index("MODELCACHE_PEERS_K8S_SERVICE")  # expanded in order
    namespace, name, port = parse_service(_expand(env["MODELCACHE_PEERS_K8S_SERVICE"]["value"], env))
    [service] = _docs(ROOT / "service.yaml")
    assert (namespace, name) == (service["metadata"]["namespace"], service["metadata"]["name"]) and port is None
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is False
    labels = _docs(ROOT / "daemonset.yaml")[0]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    [svc_port] = service["spec"]["ports"]  # the slices' only port: what the daemons dial
    assert svc_port["targetPort"] in {p["name"] for p in daemon["ports"]}
    listen_port = int(env["MODELCACHE_LISTEN"]["value"].rpartition(":")[2])
    assert svc_port["port"] == listen_port == {p["name"]: p["containerPort"] for p in daemon["ports"]}["http"]
    assert "MODELCACHE_PEERS_DNS" in (ROOT / "daemonset.yaml").read_text()  # the DNS alternative, documented
    assert "MODELCACHE_PEERS" not in env and "MODELCACHE_PEERS_DNS" not in env  # one way at a time
    assert env["MODELCACHE_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"  # own endpoint
    [policy] = _docs(ROOT / "networkpolicy.yaml")
    [rule] = policy["spec"]["ingress"]
    assert {"podSelector": {"matchLabels": service["spec"]["selector"]}} in rule["from"]
    assert [p["port"] for p in rule["ports"]] == [svc_port["targetPort"]]


def test_peer_secret_is_a_mounted_secret_never_a_real_one() -> None:
    """--peer-secret-file is a file of a Secret volume (required, read-only); the example Secret holds a
    placeholder the daemon refuses, and says how to make a random one."""
    from modelcache.p2p.node import PLACEHOLDER

    daemon, spec = _container("modelcache"), _pod_spec()
    env = {e["name"]: e for e in daemon["env"]}
    path = Path(env["MODELCACHE_PEER_SECRET_FILE"]["value"])
    [mount] = [m for m in daemon["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    assert mount["readOnly"] is True
    volume = {v["name"]: v for v in spec["volumes"]}[mount["name"]]["secret"]
    assert volume.get("optional", False) is False  # no secret: no daemon, rather than one that trusts anyone
    [item] = volume["items"]
    assert item["path"] == path.name
    [example] = _docs(ROOT / "examples" / "peer-secret.yaml")
    assert example["kind"] == "Secret" and example["metadata"]["name"] == volume["secretName"]
    assert example["stringData"][item["key"]].encode().startswith(PLACEHOLDER)
    text = (ROOT / "examples" / "peer-secret.yaml").read_text()
    assert "create secret generic modelcache-peer-secret" in text and "openssl rand" in text
    kustomization = _docs(ROOT / "kustomization.yaml")[0]
    assert not any("peer-secret" in r for r in kustomization["resources"])  # the base ships no secret


def test_peer_discovery_is_granted_list_and_watch_on_endpointslices_in_its_namespace_only() -> None:
    """Least privilege: a Role (not a ClusterRole) in the daemon's namespace, bound to its ServiceAccount,
    with list and watch on endpointslices, which is all the informer does."""
    docs = _docs(ROOT / "rbac.yaml")
    sa = {"kind": "ServiceAccount", "name": "modelcache", "namespace": "modelcache-system"}
    cluster = [d for d in docs if d["kind"] == "ClusterRole"]
    assert not any(rule for d in cluster for rule in d["rules"] if "discovery.k8s.io" in rule["apiGroups"])
    [role] = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "modelcache-peers"]
    assert role["metadata"]["namespace"] == "modelcache-system"
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["list", "watch"]}]
    [binding] = [d for d in docs if d["kind"] == "RoleBinding" and d["roleRef"]["name"] == "modelcache-peers"]
    assert binding["roleRef"]["kind"] == "Role" and binding["subjects"] == [sa]
    assert binding["metadata"]["namespace"] == role["metadata"]["namespace"]
