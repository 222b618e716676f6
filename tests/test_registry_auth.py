"""Registry auth against the real docker-registry: htpasswd basic auth and the bearer token flow."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from auth_support import (
    PASSWORD,
    USER,
    TokenServer,
    auth_entry,
    basic,
    docker_config,
    htpasswd_config,
)
from conftest import start_registry, stop
from support import MP_ARTIFACT, MP_CONFIG, MP_WEIGHT, Registry, run_cli, sha256, tree_digests

from modelcache.sources.registry_auth import Credentials, load_credentials, parse_challenge

DATA = os.urandom(200_000)


def _push(registry: Registry, repo: str) -> None:
    registry.push_image(repo, "v1", [(DATA, MP_WEIGHT, {"org.cncf.model.filepath": "w.bin"})],
                        config=b"{}", config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)


def _refused_unauthorized(proc, host: str) -> None:
    assert proc.returncode == 4, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("modelcache: error:") and "Traceback" not in proc.stderr
    assert host in last


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("basic-registry")
    proc, host = start_registry(root, extra_config=htpasswd_config(root / "auth"))
    registry = Registry(host=host, root=root, auth=basic())
    _push(registry, "private/model")
    try:
        yield registry
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("token-registry")
    with TokenServer(root / "tokens") as tokens:
        proc, host = start_registry(root, extra_config=tokens.registry_config())
        registry = Registry(host=host, root=root,
                            auth="Bearer " + tokens.token("repository:private/model:pull,push"))
        _push(registry, "private/model")
        try:
            yield registry, tokens
        finally:
            stop(proc)


@pytest.mark.parametrize("entry", [auth_entry(), {"username": USER, "password": PASSWORD}], ids=["auth", "fields"])
def test_basic_auth_with_docker_config(basic_registry, tmp_path: Path, entry: dict) -> None:
    """Credentials from config.json (auth or username/password) open an htpasswd registry."""
    env = docker_config(tmp_path / "docker", basic_registry.host, entry)
    proc = run_cli("pull", f"oci://{basic_registry.host}/private/model:v1", store=tmp_path / "s", env=env)
    assert proc.returncode == 0, proc.stderr
    assert tree_digests(Path(proc.stdout.split()[-1])) == {"w.bin": sha256(DATA)}


def test_basic_auth_refusals(basic_registry, tmp_path: Path) -> None:
    """No credentials, or a wrong password: exit 4 with the registry named, nothing kept."""
    ref = f"oci://{basic_registry.host}/private/model:v1"
    nothing = run_cli("pull", ref, store=tmp_path / "s", env={"DOCKER_CONFIG": str(tmp_path / "none")})
    _refused_unauthorized(nothing, basic_registry.host)
    wrong = docker_config(tmp_path / "docker", basic_registry.host, auth_entry(password="nope"))
    _refused_unauthorized(run_cli("pull", ref, store=tmp_path / "s", env=wrong), basic_registry.host)
    assert not (tmp_path / "s" / "views").exists() or not any((tmp_path / "s" / "views").iterdir())


def test_bearer_token_flow(token_registry, tmp_path: Path) -> None:
    """A 401 Bearer challenge is answered with a token fetched with our credentials for the pull scope."""
    registry, tokens = token_registry
    env = docker_config(tmp_path / "docker", registry.host, auth_entry())
    tokens.scopes.clear()
    proc = run_cli("pull", f"oci://{registry.host}/private/model:v1", store=tmp_path / "s", env=env)
    assert proc.returncode == 0, proc.stderr
    assert tree_digests(Path(proc.stdout.split()[-1])) == {"w.bin": sha256(DATA)}
    assert tokens.scopes == ["repository:private/model:pull"]  # one token, reused for every request


def test_bearer_refusals(token_registry, tmp_path: Path) -> None:
    """Anonymous tokens grant nothing and wrong credentials get no token: exit 4 both times."""
    registry, _ = token_registry
    ref = f"oci://{registry.host}/private/model:v1"
    anonymous = run_cli("pull", ref, store=tmp_path / "s", env={"DOCKER_CONFIG": str(tmp_path / "none")})
    _refused_unauthorized(anonymous, registry.host)
    wrong = docker_config(tmp_path / "docker", registry.host, auth_entry(password="nope"))
    _refused_unauthorized(run_cli("pull", ref, store=tmp_path / "s", env=wrong), registry.host)


def test_parse_challenge() -> None:
    """Quoted values may hold commas and escaped quotes; the scheme is case-insensitive."""
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.example/token",service="reg,istry",scope="repository:a/b:pull,push",'
        'error="say \\"hi\\""')
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.example/token", "service": "reg,istry",
                      "scope": "repository:a/b:pull,push", "error": 'say "hi"'}
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})


def test_load_credentials(tmp_path: Path) -> None:
    """auths entries match host:port, https:// forms, auth or username/password; absent file is no creds."""
    import json

    config = tmp_path / "config.json"
    assert load_credentials("reg:5000", config) is None
    config.write_text(json.dumps({"auths": {
        "reg:5000": {"auth": base64.b64encode(b"u:p:with:colons").decode()},
        "https://other.example": {"username": "x", "password": "y"},
    }}))
    assert load_credentials("reg:5000", config) == Credentials("u", "p:with:colons")
    assert load_credentials("other.example", config) == Credentials("x", "y")
    assert load_credentials("reg", config) is None
