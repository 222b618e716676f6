"""Who may call the daemon's HTTP API: a real `modelcache serve` over HTTP, in every auth mode.

Kubernetes mode talks to the in-process fake API server (tests/fake_k8s.py),
which is first proven here with the real ``kubernetes`` client.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from daemon_support import free_port, start_daemon
from fake_k8s import CLIENT_TOKEN, FakeKubernetes, User, status

from modelcache.daemon.auth import TTLCache

ROOT = Path(__file__).resolve().parent.parent
VIEW = "sha256:" + "a" * 64
PROTECTED = [("GET", "/v1/models", None), ("POST", "/v1/pulls", {"ref": "oci://127.0.0.1:1/x:v1"}),
             ("GET", "/v1/pulls/abc", None), ("PUT", f"/v1/pins/{VIEW}", None), ("DELETE", f"/v1/pins/{VIEW}", None),
             ("GET", "/v1/nope", None), ("GET", "/nope", None)]
AUTOSCALER = User("system:serviceaccount:autoscaling:autoscaler", ("system:serviceaccounts", "system:authenticated"),
                  uid="uid-autoscaler", extra={"authentication.kubernetes.io/pod-name": ["autoscaler-0"]})
STRANGER = User("system:serviceaccount:default:stranger", ("system:authenticated",), uid="uid-stranger")


@pytest.fixture
def stop_later():
    daemons = []
    yield daemons.append
    for d in daemons:
        d.stop()


def _assert_unauthenticated(answer: tuple[int, dict, dict[str, str]]) -> None:
    code, body, headers = answer
    assert code == 401 and body["code"] == "Unauthenticated" and body["message"], body
    assert headers["WWW-Authenticate"].startswith("Bearer")


def _serve_fails(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `modelcache serve` expecting it to refuse to start."""
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("MODELCACHE_", "KUBERNETES_SERVICE_"))} | (env or {})
    out = subprocess.run([sys.executable, "-m", "modelcache", "serve", "--store", str(tmp_path / "store"),
                          "--listen", f"127.0.0.1:{free_port()}", "--csi-socket", str(tmp_path / "csi.sock"), *args],
                         capture_output=True, text=True, timeout=60, env=full_env)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    return out


# -- the fake API server, proven with the real client ---------------------------


def test_fake_kubernetes_answers_the_real_client(tmp_path: Path) -> None:
    """TokenReview, SubjectAccessReview, a route added later, and its refusals, through `kubernetes`."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    with FakeKubernetes() as fake:
        fake.tokens["sa-token"] = AUTOSCALER
        fake.grant("system:serviceaccounts", "pulls", "create")  # a group grant
        fake.route("GET", r"/api/v1/nodes/(?P<name>[^/]+)", lambda r: (200, {
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": r.match["name"]}}))  # type: ignore[index]
        api = config.new_client_from_config(config_file=str(fake.write_kubeconfig(tmp_path / "kubeconfig")))
        try:
            authn, authz = client.AuthenticationV1Api(api), client.AuthorizationV1Api(api)
            review = authn.create_token_review(client.V1TokenReview(spec=client.V1TokenReviewSpec(token="sa-token")))
            assert review.status.authenticated and review.status.user.username == AUTOSCALER.username
            assert review.status.user.groups == list(AUTOSCALER.groups) and review.status.user.uid == "uid-autoscaler"
            assert review.status.user.extra == AUTOSCALER.extra
            bad = authn.create_token_review(client.V1TokenReview(spec=client.V1TokenReviewSpec(token="nope")))
            assert not bad.status.authenticated and bad.status.error

            def sar(user: str, groups: list[str], verb: str, group: str = "modelcache.io") -> bool:
                spec = client.V1SubjectAccessReviewSpec(user=user, groups=groups, resource_attributes=(
                    client.V1ResourceAttributes(group=group, resource="pulls", verb=verb)))
                return authz.create_subject_access_review(client.V1SubjectAccessReview(spec=spec)).status.allowed

            assert sar("someone", ["system:serviceaccounts"], "create") is True
            assert sar("someone", ["system:serviceaccounts"], "delete") is False
            assert sar("someone", ["system:serviceaccounts"], "create", group="apps") is False
            assert sar("someone", [], "create") is False
            assert client.CoreV1Api(api).read_node("node-a").metadata.name == "node-a"
            with pytest.raises(ApiException) as err:
                client.CoreV1Api(api).read_namespace("x")
            assert err.value.status == 404
        finally:
            api.close()
        # The fake insists on the kubeconfig's credential, as an API server would.
        api = client.ApiClient(client.Configuration(host=fake.url))
        try:
            with pytest.raises(ApiException) as err:
                client.AuthenticationV1Api(api).create_token_review(
                    client.V1TokenReview(spec=client.V1TokenReviewSpec(token="sa-token")))
            assert err.value.status == 401
        finally:
            api.close()
        reviews = fake.received("tokenreviews")
        assert [r.body["spec"]["token"] for r in reviews] == ["sa-token", "nope", "sa-token"]
        assert reviews[0].headers["authorization"] == f"Bearer {CLIENT_TOKEN}"


# -- token mode -----------------------------------------------------------------


def test_open_endpoints_and_401_without_the_token(tmp_path: Path, stop_later) -> None:
    """Health, readiness, metrics stay open; everything else is 401 without the token or with a wrong one."""
    daemon = start_daemon(tmp_path / "node")
    stop_later(daemon)
    assert daemon.call("GET", "/healthz", token=None) == (200, {"status": "ok"})
    assert daemon.call("GET", "/readyz", token=None) == (200, {"ready": True})
    assert "modelcache_" in daemon.call("GET", "/metrics", token=None)[1]["text"]
    for method, path, body in PROTECTED:
        _assert_unauthenticated(daemon.call_full(method, path, body, token=None))
        _assert_unauthenticated(daemon.call_full(method, path, body, token="wrong-" + str(daemon.token)))
        _assert_unauthenticated(daemon.call_full(method, path, body, token=str(daemon.token)[:-1]))
    # Only the Bearer scheme counts, whatever the header carries.
    import urllib.error
    import urllib.request
    req = urllib.request.Request(f"http://{daemon.http}/v1/models", headers={"Authorization": f"Basic {daemon.token}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 401
    # Nothing was started by the refused calls; with the token, the API answers.
    assert daemon.call("GET", "/v1/models") == (200, {"models": [], "pulls": []})
    assert daemon.call("GET", "/v1/nope")[0] == 404


def test_generated_token_is_private_and_kept(tmp_path: Path, stop_later) -> None:
    """Without --api-token-file the daemon makes <store>/api-token (0600), logs where, and reuses it."""
    first = start_daemon(tmp_path / "node")
    path = first.store / "api-token"
    token = path.read_text().strip()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(token) >= 40
    assert first.token == token and first.call("GET", "/v1/models")[0] == 200
    assert str(path) in first.log.read_text()
    first.stop()
    second = start_daemon(tmp_path / "node")
    stop_later(second)
    assert path.read_text().strip() == token
    assert second.call("GET", "/v1/models", token=token)[0] == 200


def test_token_file(tmp_path: Path, stop_later) -> None:
    """--api-token-file (or its env var) names the token; no store token is made; bad files stop the start."""
    token_file = tmp_path / "secret" / "token"
    token_file.parent.mkdir()
    token_file.write_text("s3cret-api-token\n")  # a Secret's trailing newline is not part of the token
    daemon = start_daemon(tmp_path / "node", "--api-token-file", str(token_file))
    stop_later(daemon)
    assert daemon.token == "s3cret-api-token"
    assert daemon.call("GET", "/v1/models")[0] == 200
    _assert_unauthenticated(daemon.call_full("GET", "/v1/models", token="s3cret-api-token\n".strip() + "x"))
    assert not (daemon.store / "api-token").exists()

    other = start_daemon(tmp_path / "node2", token="s3cret-api-token",
                         env={"MODELCACHE_API_TOKEN_FILE": str(token_file)})
    stop_later(other)
    assert other.call("GET", "/v1/models")[0] == 200 and not (other.store / "api-token").exists()

    assert "is empty" in _serve_fails(tmp_path, "--api-auth", "token", "--api-token-file",
                                      os.devnull).stderr
    assert "--api-token-file" in _serve_fails(tmp_path, "--api-auth", "token", "--api-token-file",
                                              str(tmp_path / "absent")).stderr
    assert "--api-token-file is for --api-auth token" in _serve_fails(
        tmp_path, "--api-auth", "none", "--api-token-file", str(token_file)).stderr


def test_none_mode_is_open_and_says_so(tmp_path: Path, stop_later) -> None:
    """--api-auth none: no credential needed, and a warning at start."""
    daemon = start_daemon(tmp_path / "node", "--api-auth", "none")
    stop_later(daemon)
    assert daemon.call("GET", "/v1/models", token=None)[0] == 200
    assert "authentication is off" in daemon.log.read_text()
    assert not (daemon.store / "api-token").exists()


def test_ttl_cache_is_bounded_and_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries expire after the TTL; past the size bound the oldest goes; TTL 0 keeps nothing."""
    import types

    import modelcache.daemon.auth as auth

    now = [1000.0]  # the module's clock, moved by the test alone
    monkeypatch.setattr(auth, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    cache = TTLCache(ttl=0.2, size=2)
    for key in "abc":
        cache.put(key, key.upper())
    assert cache.get("a") == (False, None) and cache.get("c") == (True, "C")
    now[0] += 0.19
    assert cache.get("c") == (True, "C")
    now[0] += 0.02
    assert cache.get("c") == (False, None)
    off = TTLCache(ttl=0, size=2)
    off.put("a", 1)
    assert off.get("a") == (False, None)


# -- kubernetes mode --------------------------------------------------------------


@pytest.fixture
def kube(tmp_path: Path):
    with FakeKubernetes() as fake:
        fake.tokens["autoscaler-token"] = AUTOSCALER
        fake.tokens["stranger-token"] = STRANGER
        # The example RBAC a platform engineer applies for their autoscaler decides what it may do.
        fake.load_rbac(yaml.safe_load_all((ROOT / "daemonset/examples/rbac-prewarmer.yaml").read_text()))
        fake.write_kubeconfig(tmp_path / "kubeconfig")
        yield fake


def _kube_daemon(tmp_path: Path, *extra: str, token: str = "autoscaler-token"):
    # --prewarm off: these tests count the review requests; the controller's list/watch is tested in test_prewarm.
    return start_daemon(tmp_path / "node", "--api-auth", "kubernetes", "--kubeconfig", str(tmp_path / "kubeconfig"),
                        "--prewarm", "off", *extra, token=token)


def test_kubernetes_mode_reviews_and_authorizes(tmp_path: Path, kube: FakeKubernetes, stop_later) -> None:
    """TokenReview then SubjectAccessReview on modelcache.io: allowed 202, bad token 401, denied 403."""
    daemon = _kube_daemon(tmp_path)
    stop_later(daemon)
    assert daemon.call("GET", "/readyz", token=None)[0] == 200 and not kube.requests  # probes cost no review

    code, job = daemon.call("POST", "/v1/pulls", {"ref": "oci://127.0.0.1:1/models/x:v1"})
    assert code == 202 and job["id"]
    [review] = kube.received("tokenreviews")
    assert review.body["spec"]["token"] == "autoscaler-token"
    assert review.headers["authorization"] == f"Bearer {CLIENT_TOKEN}"  # the daemon's own credential
    [sar] = kube.received("subjectaccessreviews")
    spec = sar.body["spec"]
    assert spec["resourceAttributes"] == {"group": "modelcache.io", "resource": "pulls", "verb": "create"}
    assert spec["user"] == AUTOSCALER.username and spec["groups"] == list(AUTOSCALER.groups)
    assert spec["uid"] == AUTOSCALER.uid and spec["extra"] == AUTOSCALER.extra

    # Each route asks for its own verb, with the object's name.
    assert daemon.call("GET", f"/v1/pulls/{job['id']}")[0] == 200
    assert daemon.call("GET", "/v1/models")[0] == 200
    assert daemon.call("PUT", f"/v1/pins/{VIEW}")[0] == 404  # allowed, but no such model
    assert daemon.call("DELETE", f"/v1/pins/{VIEW}")[0] == 404
    asked = [(r.body["spec"]["resourceAttributes"]["resource"], r.body["spec"]["resourceAttributes"]["verb"],
              r.body["spec"]["resourceAttributes"].get("name")) for r in kube.received("subjectaccessreviews")]
    assert asked == [("pulls", "create", None), ("pulls", "get", job["id"]), ("models", "list", None),
                     ("pins", "create", VIEW), ("pins", "delete", VIEW)]
    assert len(kube.received("tokenreviews")) == 1  # the token's review was reused

    # A known caller without the right: 403, and the SAR said who they are.
    code, body = daemon.call("GET", "/v1/models", token="stranger-token")
    assert code == 403 and body["code"] == "Forbidden" and STRANGER.username in body["message"]
    last = kube.received("subjectaccessreviews")[-1].body["spec"]
    assert last["user"] == STRANGER.username and last["resourceAttributes"]["verb"] == "list"
    assert daemon.call("POST", "/v1/pulls", {"ref": "oci://127.0.0.1:1/y:v1"}, token="stranger-token")[0] == 403
    assert len(daemon.call("GET", "/v1/models")[1]["pulls"]) == 1  # the refused pull never started

    # A token the review rejects, and no token at all (that one never reaches the API server).
    reviews = len(kube.received("tokenreviews"))
    _assert_unauthenticated(daemon.call_full("GET", "/v1/models", token="forged-token"))
    _assert_unauthenticated(daemon.call_full("GET", "/v1/models", token=None))
    assert len(kube.received("tokenreviews")) == reviews + 1


def test_kubernetes_answers_are_cached_briefly(tmp_path: Path, kube: FakeKubernetes, stop_later) -> None:
    """Within the TTL a token and a decision are reviewed once, yes or no; after it, again."""
    daemon = _kube_daemon(tmp_path, "--api-auth-cache-ttl", "5")  # room for the calls below on a loaded machine
    stop_later(daemon)
    for _ in range(3):
        assert daemon.call("GET", "/v1/models")[0] == 200
        assert daemon.call("GET", "/v1/models", token="stranger-token")[0] == 403
        assert daemon.call("GET", "/v1/models", token="forged-token")[0] == 401
    assert len(kube.received("tokenreviews")) == 3  # one per token
    assert len(kube.received("subjectaccessreviews")) == 2  # one per (token, verb, resource)
    # Revoking the right shows once the answer expires.
    kube.grants.clear()
    assert daemon.call("GET", "/v1/models")[0] == 200
    time.sleep(5.1)
    assert daemon.call("GET", "/v1/models")[0] == 403
    assert len(kube.received("tokenreviews")) == 4


def test_kubernetes_api_unreachable_is_503(tmp_path: Path, kube: FakeKubernetes, stop_later) -> None:
    """A review API that refuses the daemon, or is down, gives 503 (never a yes), and it is not cached."""
    daemon = _kube_daemon(tmp_path, "--api-auth-cache-ttl", "30")
    stop_later(daemon)
    kube.fail = status(403, "Forbidden", "tokenreviews.authentication.k8s.io is forbidden")  # our RBAC missing
    code, body = daemon.call("GET", "/v1/models")
    assert code == 503 and body["code"] == "Unavailable" and "TokenReview" in body["message"]
    kube.fail = None
    assert daemon.call("GET", "/v1/models")[0] == 200  # the failure was not cached
    kube.stop()
    code, body = daemon.call("GET", "/v1/models", token="stranger-token")
    assert code == 503 and body["code"] == "Unavailable" and "unreachable" in body["message"]
    assert daemon.call("GET", "/v1/models")[0] == 200  # the earlier yes is still within its TTL
    assert daemon.call("GET", "/healthz", token=None)[0] == 200


def test_kubernetes_is_the_default_in_a_cluster(tmp_path: Path, kube: FakeKubernetes, stop_later) -> None:
    """With KUBERNETES_SERVICE_HOST set and no --api-auth, callers are reviewed; no store token is made."""
    daemon = start_daemon(tmp_path / "node", "--kubeconfig", str(tmp_path / "kubeconfig"), token="autoscaler-token",
                          env={"MODELCACHE_API_AUTH": None, "KUBERNETES_SERVICE_HOST": "127.0.0.1"})
    stop_later(daemon)
    assert daemon.call("GET", "/v1/models")[0] == 200
    assert kube.received("tokenreviews") and not (daemon.store / "api-token").exists()
    # Outside a cluster the same command wants a kubeconfig to review with, and says so.
    assert "--kubeconfig" in _serve_fails(tmp_path, "--api-auth", "kubernetes").stderr
    assert "--kubeconfig" in _serve_fails(tmp_path, env={"KUBERNETES_SERVICE_HOST": "10.0.0.1"}).stderr
    assert "expected one of token, kubernetes, none" in _serve_fails(tmp_path, env={"MODELCACHE_API_AUTH": "tokn"}).stderr
