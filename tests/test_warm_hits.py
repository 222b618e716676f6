"""Warm hits (issue 13): what a pull of a model already in the store still checks, and what it skips.

- A tag is always asked at its registry: a tag moved to another manifest is
  pulled again, a tag gone from the registry fails, even with its old view
  in the store.
- A digest names its content for good: it is answered from the store with no
  registry at all, unless the model needed credentials at its origin (a
  private model is asked there, with the caller's credentials, every time).
- ``--offline`` answers any reference from the store without asking, and
  fails with exit 3 when it was never pulled.
- A hit returns the recorded view only while its tree is in place; a tree
  gone is rebuilt. Through :func:`modelcache.pull.pull` (the daemon's path) a
  hit fetches nothing, leaves no lease and marks the view used.

- A registry with bearer tokens (as Docker Hub and GHCR are, public images
  too) takes the same one-GET path with an anonymous token, unless the
  image is private or credentials are configured for the registry.

All against the real docker-registry the suite starts (and ones with
htpasswd logins and with bearer tokens, as tests/test_registry_auth.py starts them).
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import time
from pathlib import Path

import pytest
from auth_support import TokenServer, auth_entry, basic, docker_config, htpasswd_config
from conftest import start_registry, stop
from support import (
    MP_ARTIFACT,
    MP_CONFIG,
    MP_WEIGHT,
    OCI_INDEX,
    OCI_MANIFEST,
    Registry,
    run_cli,
    tree_digests,
)
from test_startup import LEAN, heavy_in, modules_of

from modelcache.refs import parse
from modelcache.sources.tagdigest import tag_digest
from modelcache.store import Store


def _push(registry: Registry, repo: str, tag: str, weights: bytes) -> str:
    """A one-file ModelPack artifact; its manifest digest."""
    return registry.push_image(repo, tag, [(weights, MP_WEIGHT, {"org.cncf.model.filepath": "w.bin"})],
                               config=b"{}", config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)


def _pulled(proc) -> Path:
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip().splitlines()[-1])


def _delete_manifest(registry: Registry, repo: str, digest: str) -> None:
    with registry._request("DELETE", registry.url(f"/v2/{repo}/manifests/{digest}")):
        pass


def test_a_moved_tag_is_pulled_again(registry: Registry, store: Path) -> None:
    """The warm path asks the registry what the tag names: a new manifest under it is pulled, not the old view."""
    _push(registry, "warm/moved", "v1", b"first" * 1000)
    ref = f"oci://{registry.host}/warm/moved:v1"
    first = _pulled(run_cli("pull", "-q", ref, store=store))
    assert _pulled(run_cli("pull", "-q", ref, store=store)) == first  # unmoved: the same view

    _push(registry, "warm/moved", "v1", b"second" * 1000)
    second = _pulled(run_cli("pull", "-q", ref, store=store))
    assert second != first
    assert (second / "w.bin").read_bytes() == b"second" * 1000


def test_a_digest_needs_no_registry_and_a_tag_does(registry: Registry, store: Path) -> None:
    """With its manifest deleted from the registry, the digest is still answered from the store; the tag
    fails as the registry says (exit 3), unless --offline says not to ask."""
    digest = _push(registry, "warm/gone", "v1", b"kept" * 1000)
    tag, pinned = f"oci://{registry.host}/warm/gone:v1", f"oci://{registry.host}/warm/gone@{digest}"
    view = _pulled(run_cli("pull", "-q", tag, store=store))
    assert _pulled(run_cli("pull", "-q", pinned, store=store)) == view  # cold by digest: the same tree
    _delete_manifest(registry, "warm/gone", digest)

    assert _pulled(run_cli("pull", "-q", pinned, store=store)) == view
    gone = run_cli("pull", "-q", tag, store=store)
    assert gone.returncode == 3 and "not found" in gone.stderr, gone.stderr
    offline = run_cli("pull", "--offline", tag, store=store)
    assert _pulled(offline) == view
    assert "in the store, nothing fetched" in offline.stderr
    assert _pulled(run_cli("pull", "-q", tag, store=store, env={"MODELCACHE_OFFLINE": "1"})) == view


def test_offline_fails_for_what_was_never_pulled(registry: Registry, store: Path) -> None:
    """--offline with nothing recorded: exit 3, one line, and no store made."""
    _push(registry, "warm/never", "v1", b"n" * 100)
    ref = f"oci://{registry.host}/warm/never:v1"
    proc = run_cli("pull", "--offline", ref, store=store)
    assert proc.returncode == 3
    assert proc.stderr.strip() == f"modelcache: error: {ref} is not in the store (--offline: the origin was not asked)"
    assert not store.exists()
    run_cli("pull", "-q", ref, store=store, check=True)
    other = run_cli("pull", "--offline", "--include", "*.json", ref, store=store)  # other filters: not recorded
    assert other.returncode == 3 and "with " in other.stderr


def test_a_hit_whose_tree_is_gone_builds_it_again(registry: Registry, store: Path) -> None:
    """A recorded view whose directory was removed by hand is no hit: the pull builds it again."""
    digest = _push(registry, "warm/tree", "v1", b"t" * 5000)
    for ref in (f"oci://{registry.host}/warm/tree:v1", f"oci://{registry.host}/warm/tree@{digest}"):
        view = _pulled(run_cli("pull", "-q", ref, store=store))
        view.chmod(0o755)
        shutil.rmtree(view)
        assert _pulled(run_cli("pull", "-q", ref, store=store)) == view
        assert tree_digests(view) == {"w.bin": "sha256:" + hashlib.sha256(b"t" * 5000).hexdigest()}


@pytest.fixture(scope="module")
def private_registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm-private")
    proc, host = start_registry(root, extra_config=htpasswd_config(root / "auth"))
    try:
        yield Registry(host=host, root=root, auth=basic())
    finally:
        stop(proc)


def test_a_private_model_is_asked_at_its_origin_every_time(private_registry: Registry, store: Path,
                                                            tmp_path: Path) -> None:
    """Pulled with a login, by tag or digest: a warm pull without one is refused (exit 4), with one it hits."""
    digest = _push(private_registry, "warm/private", "v1", b"p" * 3000)
    login = docker_config(tmp_path / "login", private_registry.host, auth_entry())
    nobody = {"DOCKER_CONFIG": str(tmp_path / "nobody")}
    for ref in (f"oci://{private_registry.host}/warm/private:v1",
                f"oci://{private_registry.host}/warm/private@{digest}"):
        view = _pulled(run_cli("pull", "-q", ref, store=store, env=login))
        refused = run_cli("pull", "-q", ref, store=store, env=nobody)
        assert refused.returncode == 4, refused.stderr
        assert _pulled(run_cli("pull", "-q", ref, store=store, env=login)) == view


def test_tag_digest_is_what_a_pull_records(registry: Registry, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through an index, the chosen manifest's digest (read from the index, as the pull chooses it);
    None where the lean GET cannot tell: a login challenge, a proxy in the way, no registry, no tag."""
    digest = _push(registry, "warm/index", "child", b"i" * 2000)
    with registry._request("GET", registry.url(f"/v2/warm/index/manifests/{digest}"),
                           headers={"Accept": OCI_MANIFEST}) as resp:
        size = len(resp.read())
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": digest, "size": size, "artifactType": MP_ARTIFACT}]}
    registry.push_manifest("warm/index", "v1", index, OCI_INDEX)
    ref = parse(f"oci://{registry.host}/warm/index:v1")
    assert tag_digest(ref) == digest

    run_cli("pull", "-q", str(ref), store=store, check=True)
    s = Store(store)
    try:
        assert s.index.lookup(str(ref), "") is not None and s.index.lookup(str(ref), "")[1] == digest
    finally:
        s.close()

    assert tag_digest(parse(f"oci://{registry.host}/warm/index:nosuchtag")) is None
    closed = registry.host.rsplit(":", 1)[0] + ":1"
    assert tag_digest(parse(f"oci://{closed}/warm/index:v1")) is None
    for name in ("http_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:1")
    assert tag_digest(ref) is None


def test_tag_digest_declines_a_login_challenge(private_registry: Registry) -> None:
    """A registry that wants a login answers 401 to the anonymous GET: the full path must take it."""
    _push(private_registry, "warm/challenge", "v1", b"c" * 100)
    assert tag_digest(parse(f"oci://{private_registry.host}/warm/challenge:v1")) is None


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory):
    """A real registry behind our token server: ``warm/public`` is open to anonymous pulls, the rest is not."""
    root = tmp_path_factory.mktemp("warm-token")
    with TokenServer(root / "tokens", public=("warm/public",)) as tokens:
        proc, host = start_registry(root, extra_config=tokens.registry_config())
        try:
            yield Registry(host=host, root=root, auth="Bearer " + tokens.token(
                "repository:warm/public:pull,push")), tokens
        finally:
            stop(proc)


def test_tag_digest_takes_an_anonymous_token_for_a_public_image(token_registry, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A Bearer challenge is answered with an anonymous token from its realm; a private image, or
    credentials configured for the registry, leave it to the full path."""
    registry, tokens = token_registry
    digest = _push(registry, "warm/public", "v1", b"b" * 700)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "nobody"))
    ref = parse(f"oci://{registry.host}/warm/public:v1")
    tokens.scopes.clear()
    assert tag_digest(ref) == digest
    assert tokens.scopes == ["repository:warm/public:pull"]

    registry.auth = "Bearer " + tokens.token("repository:warm/private:pull,push")
    _push(registry, "warm/private", "v1", b"q" * 700)
    assert tag_digest(parse(f"oci://{registry.host}/warm/private:v1")) is None  # the anonymous token has no access

    monkeypatch.setenv("DOCKER_CONFIG", docker_config(tmp_path / "login", registry.host, auth_entry())["DOCKER_CONFIG"])
    tokens.scopes.clear()
    assert tag_digest(ref) is None
    assert tokens.scopes == []  # never asked anonymously where a login is configured


def test_a_warm_public_tag_behind_tokens_is_a_hit(token_registry, store: Path, tmp_path: Path) -> None:
    """The second pull is answered from the store, recorded as needing no credentials; a moved tag is pulled again."""
    registry, tokens = token_registry
    registry.auth = "Bearer " + tokens.token("repository:warm/public:pull,push")
    _push(registry, "warm/public", "hit", b"h" * 900)
    ref = f"oci://{registry.host}/warm/public:hit"
    nobody = {"DOCKER_CONFIG": str(tmp_path / "nobody")}
    view = _pulled(run_cli("pull", "-q", ref, store=store, env=nobody))
    # The lean path, not the full one: no event loop, no TLS, no aiohttp (as tests/test_startup.py checks).
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DOCKER_CONFIG", nobody["DOCKER_CONFIG"])
        again, modules = modules_of(tmp_path, "pull", ref, store=store)
    assert _pulled(again) == view and "nothing fetched" in again.stderr
    assert heavy_in(modules, LEAN) == []
    s = Store(store)
    try:
        assert s.index.origin_needed_credentials(ref) is False
    finally:
        s.close()
    _push(registry, "warm/public", "hit", b"H" * 900)
    moved = _pulled(run_cli("pull", "-q", ref, store=store, env=nobody))
    assert moved != view and (moved / "w.bin").read_bytes() == b"H" * 900


def test_a_hit_through_pull_fetches_nothing_and_marks_the_view_used(registry: Registry, tmp_path: Path) -> None:
    """The daemon's path (pull()): the second pull finds the recorded view, holds no lease, touches last use."""
    from modelcache.pull import pull
    from modelcache.transfer import Engine, TransferConfig

    _push(registry, "warm/daemon", "v1", b"d" * 8000)
    ref = f"oci://{registry.host}/warm/daemon:v1"
    store = Store(tmp_path / "s")
    engine = Engine(store.content, TransferConfig())
    try:
        first = asyncio.run(pull(store, engine, ref, owner="daemon"))
        assert first.stats.bytes_fetched == 8000
        used = store.index.records()[0].last_used
        time.sleep(0.01)
        again = asyncio.run(pull(store, engine, ref, owner="daemon"))
        assert (again.path, again.files, again.size, again.model_digest) == (first.path, 1, 8000, first.model_digest)
        assert again.stats.bytes_fetched == 0 and again.stats.bytes_total == 0
        assert store.index.leases() == []
        assert store.index.records()[0].last_used > used
        assert store.index.origin_needed_credentials(ref) is False
    finally:
        engine.close()
        store.close()
