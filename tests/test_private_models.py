"""Private models stay private on a shared node (KEP-2535 for models).

A real `modelcache serve` daemon, CSI calls over its unix socket as kubelet
makes them (with the volume's ``nodePublishSecretRef`` as ``secrets``), real
bind mounts, and the real docker-registry with htpasswd auth behind a logging
proxy, so "asked the origin" and "did not" are counted, not assumed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from auth_support import auth_entry, basic, docker_config, htpasswd_config
from conftest import start_registry, stop
from daemon_support import (
    DaemonProcess,
    mountinfo,
    publish_request,
    start_daemon,
    unmount_all_below,
)
from fake_hub import FakeHub
from faultproxy import FaultProxy
from support import MP_ARTIFACT, MP_CONFIG, MP_WEIGHT, Registry, sha256, tree_digests

from modelcache.daemon.access import AccessGate
from modelcache.errors import InvalidReference, Unauthorized, Unavailable
from modelcache.refs import parse
from modelcache.sources import SourceCredentials, SourceOptions
from modelcache.store import Store

DATA = os.urandom(1 << 20)


def _push(registry: Registry, repo: str) -> None:
    registry.push_image(repo, "v1", [(DATA, MP_WEIGHT, {"org.cncf.model.filepath": "w.bin"})],
                        config=b"{}", config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)


def _docker_secret(host: str, **login: str) -> dict[str, str]:
    """The ``secrets`` kubelet passes for a kubernetes.io/dockerconfigjson Secret."""
    return {".dockerconfigjson": json.dumps({"auths": {host: auth_entry(**login)}})}


def _publish(daemon: DaemonProcess, volume: str, target: Path, ref: str, secrets: dict[str, str] | None = None):
    request = publish_request(volume, target, ref)
    request.secrets.update(secrets or {})
    return daemon.node().NodePublishVolume(request, timeout=60)


def _refused(daemon: DaemonProcess, volume: str, target: Path, ref: str, secrets=None,
             code=grpc.StatusCode.PERMISSION_DENIED) -> str:
    with pytest.raises(grpc.RpcError) as err:
        _publish(daemon, volume, target, ref, secrets)
    assert err.value.code() == code, err.value.details()
    assert str(target) not in mountinfo()
    return err.value.details() or ""


def _needed(daemon: DaemonProcess, ref: str) -> int | None:
    with sqlite3.connect(daemon.store / "index.sqlite") as db:
        row = db.execute("SELECT needed_credentials FROM origin_access WHERE ref = ?", (str(parse(ref)),)).fetchone()
    return row[0] if row else None


@pytest.fixture(scope="module")
def private_registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("private-registry")
    proc, host = start_registry(root, extra_config=htpasswd_config(root / "auth"))
    registry = Registry(host=host, root=root, auth=basic())
    _push(registry, "private/model")
    try:
        yield registry
    finally:
        stop(proc)


@pytest.fixture
def no_daemon_login(tmp_path: Path, monkeypatch) -> None:
    """The daemon (a child process) finds no Docker login of its own."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))


@pytest.fixture
def node(tmp_path: Path):
    daemons: list[DaemonProcess] = []

    def start(*flags: str) -> DaemonProcess:
        daemons.append(start_daemon(tmp_path / f"node{len(daemons)}", "--retries", "1", *flags))
        return daemons[-1]

    try:
        yield start
    finally:
        for d in daemons:
            d.stop()
        unmount_all_below(tmp_path)


def test_private_model_mounts_only_for_pods_that_can_read_it(private_registry, node, no_daemon_login,
                                                             tmp_path: Path) -> None:
    """Cold pull with the pod's login; warm mounts: none or a wrong one refused, the right one mounted and cached."""
    daemon = node()
    with FaultProxy(private_registry.host) as proxy:
        ref = f"oci://{proxy.host}/private/model:v1"
        right, wrong = _docker_secret(proxy.host), _docker_secret(proxy.host, password="nope")
        _publish(daemon, "vol-1", tmp_path / "t1", ref, right)  # cold: pulled with the pod's login
        assert tree_digests(tmp_path / "t1") == {"w.bin": sha256(DATA)}
        assert _needed(daemon, ref) == 1

        proxy.clear()
        details = _refused(daemon, "vol-2", tmp_path / "t2", ref)
        assert "needed credentials" in details and "nodePublishSecretRef" in details
        assert proxy.requests("/manifests/") == []  # refused without asking the origin
        assert "refused the volume's credentials" in _refused(daemon, "vol-3", tmp_path / "t3", ref, wrong)
        asked = len(proxy.requests("/manifests/"))
        assert asked >= 1
        _refused(daemon, "vol-3b", tmp_path / "t3b", ref, wrong)  # the refusal is cached too
        assert len(proxy.requests("/manifests/")) == asked

        _publish(daemon, "vol-4", tmp_path / "t4", ref, right)
        assert tree_digests(tmp_path / "t4") == {"w.bin": sha256(DATA)}
        ok = [e for e in proxy.requests("/manifests/") if e.status == 200]
        assert len(ok) == 1 and ok[0].method == "GET"
        before = len(proxy.requests("/manifests/"))
        _publish(daemon, "vol-5", tmp_path / "t5", ref, right)  # within the TTL: no new origin request
        assert len(proxy.requests("/manifests/")) == before
        assert proxy.blob_gets() == []  # warm mounts never fetch bytes
    assert daemon.metric('modelcache_csi_publish_total{code="PERMISSION_DENIED"}') == 3


def test_model_pulled_with_the_daemons_login_is_still_private(private_registry, node, tmp_path: Path,
                                                              monkeypatch) -> None:
    """A pod without a secret may trigger a pull with the daemon's login, but gets no mount of it."""
    env = docker_config(tmp_path / "daemon-docker", private_registry.host, auth_entry())
    monkeypatch.setenv("DOCKER_CONFIG", env["DOCKER_CONFIG"])
    daemon = node()
    ref = f"oci://{private_registry.host}/private/model:v1"
    _refused(daemon, "vol-1", tmp_path / "t1", ref)
    assert [m["ref"] for m in daemon.call("GET", "/v1/models")[1]["models"]] == [ref]  # pulled, not mounted
    assert _needed(daemon, ref) == 1
    _refused(daemon, "vol-2", tmp_path / "t2", ref, _docker_secret("other.example:5000"))  # a login elsewhere
    _publish(daemon, "vol-3", tmp_path / "t3", ref, _docker_secret(private_registry.host))
    assert tree_digests(tmp_path / "t3") == {"w.bin": sha256(DATA)}


def test_public_model_mounts_without_credentials_or_origin(registry, node, tmp_path: Path) -> None:
    """Default policy: a model that needed no login mounts warm with no secret and no origin request."""
    _push(registry, "public/model")
    daemon = node()
    with FaultProxy(registry.host) as proxy:
        ref = f"oci://{proxy.host}/public/model:v1"
        _publish(daemon, "vol-1", tmp_path / "t1", ref)
        assert _needed(daemon, ref) == 0
        proxy.clear()
        _publish(daemon, "vol-2", tmp_path / "t2", ref)
        assert proxy.events == []
    _publish(daemon, "vol-3", tmp_path / "t3", ref)  # origin gone: still mounts (no check needed)
    assert tree_digests(tmp_path / "t3") == {"w.bin": sha256(DATA)}


def test_always_checks_public_models_at_the_origin(registry, node, tmp_path: Path) -> None:
    """always: every warm mount asks the origin (anonymously here); an origin that is down means no mount."""
    _push(registry, "public/always")
    daemon = node("--mount-credential-check", "always", "--mount-credential-ttl", "0")
    with FaultProxy(registry.host) as proxy:
        ref = f"oci://{proxy.host}/public/always:v1"
        _publish(daemon, "vol-1", tmp_path / "t1", ref)
        proxy.clear()
        _publish(daemon, "vol-2", tmp_path / "t2", ref)
        _publish(daemon, "vol-3", tmp_path / "t3", ref)  # TTL 0: asked again
        manifests = proxy.requests("/manifests/")
        assert len(manifests) == 2 and all(e.status == 200 for e in manifests)
        assert proxy.blob_gets() == []
    details = _refused(daemon, "vol-4", tmp_path / "t4", ref, code=grpc.StatusCode.UNAVAILABLE)
    assert proxy.host in details


def test_never_mounts_private_models_for_anyone(private_registry, node, no_daemon_login, tmp_path: Path) -> None:
    """never: today's behaviour; a private model pulled with one pod's login mounts for a pod without one."""
    daemon = node("--mount-credential-check", "never")
    ref = f"oci://{private_registry.host}/private/model:v1"
    _publish(daemon, "vol-1", tmp_path / "t1", ref, _docker_secret(private_registry.host))
    _publish(daemon, "vol-2", tmp_path / "t2", ref)
    assert tree_digests(tmp_path / "t2") == {"w.bin": sha256(DATA)}


def test_cold_pull_uses_only_the_pods_credentials(private_registry, node, tmp_path: Path, monkeypatch) -> None:
    """A secret replaces the daemon's login: a wrong one fails the pull although the daemon's would work."""
    env = docker_config(tmp_path / "daemon-docker", private_registry.host, auth_entry())
    monkeypatch.setenv("DOCKER_CONFIG", env["DOCKER_CONFIG"])
    daemon = node()
    ref = f"oci://{private_registry.host}/private/model:v1"
    _refused(daemon, "vol-1", tmp_path / "t1", ref, _docker_secret(private_registry.host, password="nope"))
    assert daemon.call("GET", "/v1/models")[1]["models"] == []
    details = _refused(daemon, "vol-2", tmp_path / "t2", ref, {"config.json": "not json"},
                       code=grpc.StatusCode.INVALID_ARGUMENT)
    assert ".dockerconfigjson" in details and "not json" not in details


def test_bad_policy_from_the_environment_is_a_usage_error(tmp_path: Path) -> None:
    """MODELCACHE_MOUNT_CREDENTIAL_CHECK and _TTL are checked like the flags."""
    for name, value in (("MODELCACHE_MOUNT_CREDENTIAL_CHECK", "sometimes"), ("MODELCACHE_MOUNT_CREDENTIAL_TTL", "-1")):
        proc = subprocess.run([sys.executable, "-m", "modelcache", "--store", str(tmp_path / "s"), "serve"],
                              env={**os.environ, name: value}, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "mount-credential" in proc.stderr


def test_volume_secrets_parse_and_stay_redacted() -> None:
    """Every accepted key is read; repr never shows a value; nonsense is refused with the accepted keys named."""
    docker = json.dumps({"auths": {"reg:5000": auth_entry()}})
    creds = SourceCredentials.from_secrets({".dockerconfigjson": docker, "AWS_ACCESS_KEY_ID": "AKIDSECRET",
                                            "AWS_SECRET_ACCESS_KEY": "sk-secret", "AWS_SESSION_TOKEN": "st-secret",
                                            "HF_TOKEN": "hf_secret"})
    assert creds is not None
    assert (creds.aws_access_key_id, creds.aws_secret_access_key, creds.aws_session_token, creds.hf_token) == (
        "AKIDSECRET", "sk-secret", "st-secret", "hf_secret")
    assert creds.docker_auths()["auths"]["reg:5000"] == auth_entry()
    for shown in (repr(creds), str(creds), f"{creds!r} {[creds]}"):
        assert not any(s in shown for s in ("SECRET", "secret", auth_entry()["auth"])), shown
    assert SourceCredentials.from_secrets({"config.json": docker}) == SourceCredentials(docker_config=docker)
    assert SourceCredentials.from_secrets({"token": "hf_x"}) == SourceCredentials(hf_token="hf_x")
    assert SourceCredentials.from_secrets({}) is None
    assert creds.fingerprint() == SourceCredentials.from_secrets({".dockerconfigjson": docker, "HF_TOKEN": "hf_secret",
                                                                   "AWS_ACCESS_KEY_ID": "AKIDSECRET",
                                                                   "AWS_SECRET_ACCESS_KEY": "sk-secret",
                                                                   "AWS_SESSION_TOKEN": "st-secret"}).fingerprint()
    assert creds.fingerprint() != SourceCredentials(hf_token="hf_secret").fingerprint()
    for bad in ({"username": "x"}, {"AWS_ACCESS_KEY_ID": "only-half"}, {".dockerconfigjson": "[1]"}):
        with pytest.raises(InvalidReference):
            SourceCredentials.from_secrets(bad)


def test_gate_cache_is_bounded_expires_and_never_keeps_an_outage(tmp_path: Path) -> None:
    """Answers (yes and no) are reused within the TTL, forgotten after it or past the bound; Unavailable is not kept."""
    store = Store(tmp_path / "store")
    asked: list[str] = []
    now = [0.0]
    outage = [False]

    async def origin(ref: str, creds: SourceCredentials) -> None:  # plays the origin: only "good" may read
        asked.append(ref)
        if outage[0]:
            raise Unavailable(f"{ref}: origin down")
        if creds.hf_token != "good":
            raise Unauthorized(f"{ref}: HTTP 401")

    gate = AccessGate(store, SourceOptions(), ttl=10, max_entries=2, probe=origin, clock=lambda: now[0])
    good, bad = SourceCredentials(hf_token="good"), SourceCredentials(hf_token="bad")
    for ref in ("hf://a/m", "hf://b/m", "hf://c/m"):
        store.index.record_origin_access(ref, True)

    async def scenario() -> None:
        await gate.check("hf://a/m", good)
        await gate.check("hf://a/m", good)
        with pytest.raises(Unauthorized):
            await gate.check("hf://a/m", bad)
        with pytest.raises(Unauthorized):
            await gate.check("hf://a/m", bad)
        assert asked == ["hf://a/m", "hf://a/m"]
        with pytest.raises(Unauthorized):
            await gate.check("hf://a/m", None)  # no credentials for a private model: no origin request
        assert len(asked) == 2
        await asyncio.gather(*(gate.check("hf://b/m", good) for _ in range(5)))  # one shared request
        assert asked.count("hf://b/m") == 1
        await gate.check("hf://a/m", good)  # evicted past the bound of 2 entries: asked again
        assert asked.count("hf://a/m") == 3
        now[0] = 11.0
        outage[0] = True
        with pytest.raises(Unavailable):
            await gate.check("hf://b/m", good)  # expired, and the origin is down
        outage[0] = False
        await gate.check("hf://b/m", good)  # the outage was not remembered
        assert asked.count("hf://b/m") == 3

    try:
        asyncio.run(scenario())
    finally:
        store.close()


def test_s3_model_mounts_only_for_pods_with_keys_that_read_it(s3_server, node, tmp_path: Path, monkeypatch) -> None:
    """SeaweedFS with an identity refuses anonymous reads: the model counts as private, the pod's keys are checked."""
    s3 = s3_server.client()
    s3.create_bucket(Bucket="models-private")
    s3.put_object(Bucket="models-private", Key="m/w.bin", Body=DATA)
    # The daemon knows the endpoint but has no AWS credentials of its own.
    for name, value in {"AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(tmp_path / "none"),
                        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    keys = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}
    wrong = {**keys, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    daemon = node()
    ref = "s3://models-private/m"
    _refused(daemon, "vol-0", tmp_path / "t0", ref)  # cold, no keys anywhere: the pull itself is refused
    _publish(daemon, "vol-1", tmp_path / "t1", ref, keys)
    assert (tmp_path / "t1" / "w.bin").read_bytes() == DATA
    assert _needed(daemon, ref) == 1  # the anonymous listing was refused, so not provably public
    _refused(daemon, "vol-2", tmp_path / "t2", ref)
    assert "refused the volume's credentials" in _refused(daemon, "vol-3", tmp_path / "t3", ref, wrong)
    _publish(daemon, "vol-4", tmp_path / "t4", ref, keys)
    assert (tmp_path / "t4" / "w.bin").read_bytes() == DATA


def test_hub_models_gated_or_public_with_a_pod_token(node, tmp_path: Path, monkeypatch) -> None:
    """A gated repository read with the pod's token is private; a public one read with a token is not."""
    token = "hf_pod_token"
    with FakeHub() as hub:
        gated = hub.repo("org/gated")
        gated.commit({"w.bin": DATA})
        gated.gated_token = token
        hub.repo("org/open").commit({"w.bin": DATA})
        for name, value in {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1",
                            "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf-home")}.items():
            monkeypatch.setenv(name, value)
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        daemon = node()
        _publish(daemon, "vol-1", tmp_path / "t1", "hf://org/gated", {"HF_TOKEN": token})
        assert (tmp_path / "t1" / "w.bin").read_bytes() == DATA and _needed(daemon, "hf://org/gated") == 1
        _refused(daemon, "vol-2", tmp_path / "t2", "hf://org/gated")
        _refused(daemon, "vol-3", tmp_path / "t3", "hf://org/gated", {"token": "hf_wrong"})
        _publish(daemon, "vol-4", tmp_path / "t4", "hf://org/gated", {"token": token})

        _publish(daemon, "vol-5", tmp_path / "t5", "hf://org/open", {"HF_TOKEN": token})
        assert _needed(daemon, "hf://org/open") == 0  # the Hub says: neither private nor gated
        hub.hub_requests.clear()
        _publish(daemon, "vol-6", tmp_path / "t6", "hf://org/open")
        assert hub.hub_requests == []
