"""`modelcache pull hf://…` against a fake Hub that the real huggingface_hub client accepts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fake_hub import FakeHub
from support import MP_ARTIFACT, MP_CONFIG, MP_WEIGHT, run_cli, settled_count, sha256, tree_digests

from modelcache.store.content import _RECORD_HEADER

FILES = {"model.safetensors": os.urandom(3 << 20), "config.json": b'{"model_type": "test"}',
         "tokenizer/tokenizer.json": b"{}" * 10, "weights/extra.bin": os.urandom(5000)}
TOKEN = "hf_test_token"


@pytest.fixture(scope="module")
def hub():
    with FakeHub() as hub:
        hub.repo("org/model").commit(FILES)
        older = hub.repo("org/model").commit({"config.json": b'{"old": true}'}, ref="v0.1")
        hub.repo("org/model").refs["main"] = hub.repo("org/model").commit(FILES, ref="main")
        hub.older = older  # type: ignore[attr-defined]
        gated = hub.repo("org/gated")
        gated.commit({"w.bin": os.urandom(4096)})
        gated.gated_token = TOKEN
        yield hub


def _env(hub, **extra: str) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1",
            "HF_TOKEN": "", **extra}


def _pull(hub, store: Path, ref: str, *extra: str, env: dict | None = None, check: bool = True):
    return run_cli("pull", "--chunk-size", "1M", ref, *extra, store=store, env=env or _env(hub), check=check)


def test_snapshot_download_and_modelcache_agree(hub, tmp_path: Path, monkeypatch) -> None:
    """The real client downloads from the fake; modelcache pulls the same files."""
    for key, value in _env(hub).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN")
    import huggingface_hub

    snapshot = huggingface_hub.snapshot_download("org/model", cache_dir=str(tmp_path / "hf-cache"),
                                                 endpoint=hub.endpoint)
    expected = {p: sha256(d) for p, d in FILES.items()}
    # The client's snapshot is symlinks into its blob cache: compare what they point at.
    got = {p.relative_to(snapshot).as_posix(): sha256(p.read_bytes())
           for p in Path(snapshot).rglob("*") if p.is_file()}
    assert got == expected
    view = Path(_pull(hub, tmp_path / "store", "hf://org/model").stdout.split()[-1])
    assert tree_digests(view) == expected


def test_revisions_and_filters(hub, tmp_path: Path) -> None:
    """A tag and a commit pick older files; include/exclude select before fetching."""
    old = _pull(hub, tmp_path / "s1", "hf://org/model@v0.1")
    assert tree_digests(Path(old.stdout.split()[-1])) == {"config.json": sha256(b'{"old": true}')}
    by_commit = _pull(hub, tmp_path / "s1", f"hf://org/model@{hub.older}")
    assert by_commit.stdout.split()[-1] == old.stdout.split()[-1]
    some = _pull(hub, tmp_path / "s2", "hf://org/model", "--include", "*.json", "--exclude", "tokenizer/*")
    assert tree_digests(Path(some.stdout.split()[-1])) == {"config.json": sha256(FILES["config.json"])}
    assert "fetched 22 B" in some.stderr  # the weights were never asked for


def test_gated_repo_needs_the_token_which_never_reaches_the_cdn(hub, tmp_path: Path) -> None:
    """Without a token: a clear error naming the repo. With it: files, and the CDN never sees it."""
    denied = _pull(hub, tmp_path / "s", "hf://org/gated", check=False)
    assert denied.returncode == 4 and "hf://org/gated" in denied.stderr and "Traceback" not in denied.stderr
    hub.cdn_requests.clear()
    ok = _pull(hub, tmp_path / "s", "hf://org/gated", env=_env(hub, HF_TOKEN=TOKEN))
    assert len(tree_digests(Path(ok.stdout.split()[-1]))) == 1
    assert hub.cdn_requests and not any("Authorization" in h for h in hub.cdn_requests)


@pytest.mark.parametrize("ref,code", [("hf://org/absent", 3), ("hf://org/model@no-such-branch", 3),
                                      ("hf://bad ref", 2)])
def test_missing_repo_and_revision(hub, tmp_path: Path, ref: str, code: int) -> None:
    """Missing repos and revisions are NotFound (3); malformed references are rejected (2)."""
    proc = _pull(hub, tmp_path / "s", ref, check=False)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("modelcache: error:")


def test_hub_weights_dedup_with_a_registry(hub, registry, tmp_path: Path) -> None:
    """Weights pulled from the Hub are not fetched again from a registry artifact holding them."""
    _pull(hub, tmp_path / "store", "hf://org/model")
    registry.push_image("hfdedup/model", "v1", [
        (FILES["model.safetensors"], MP_WEIGHT, {"org.cncf.model.filepath": "model.safetensors"}),
        (FILES["config.json"], MP_WEIGHT, {"org.cncf.model.filepath": "config.json"})],
        config=b"{}", config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)
    proc = run_cli("pull", f"oci://{registry.host}/hfdedup/model:v1", store=tmp_path / "store", check=True)
    assert "fetched 0 B" in proc.stderr


def test_expired_cdn_links_are_resolved_again(tmp_path: Path) -> None:
    """The Hub's CDN links are signed and expire: a pull that outlives one asks the Hub again."""
    data = os.urandom(6 << 20)
    # Each link lasts 1 s and each CDN answer takes 0.4 s: one stream of six 1 MiB ranges
    # outlives its link every two or three ranges (and a fresh link is followed well within 1 s).
    with FakeHub(link_ttl=1.0, cdn_delay=0.4) as hub:
        hub.repo("org/big").commit({"model.safetensors": data})
        proc = run_cli("pull", "--chunk-size", "1M", "--concurrency", "1", "hf://org/big", store=tmp_path / "s",
                       env=_env(hub), check=True)
        assert (Path(proc.stdout.split()[-1]) / "model.safetensors").read_bytes() == data
        assert hub.expired_refusals >= 1
        assert len([r for r in hub.hub_requests if "/resolve/" in r[1]]) == 1 + hub.expired_refusals


def _cdn_ranges(hub) -> list[str]:
    return [h.get("Range", "") for h in hub.cdn_requests]


def test_cdn_errors_are_retried_and_a_killed_pull_resumes(tmp_path: Path) -> None:
    """The engine's rules hold for the Hub: 503s are retried per chunk, and a pull killed midway
    fetches only the chunks it had not made durable."""
    import signal
    import subprocess
    import sys
    import time

    data = os.urandom(8 << 20)
    with FakeHub(cdn_delay=0.4) as hub:  # the whole pull takes about 2 s: time to catch it midway
        hub.repo("org/big").commit({"model.safetensors": data})
        hub.cdn_failures = 2
        store = tmp_path / "s"
        cmd = [sys.executable, "-m", "modelcache", "--store", str(store), "pull", "-q", "--chunk-size", "1M",
               "--concurrency", "2", "hf://org/big"]
        first = subprocess.Popen(cmd, env={**os.environ, **_env(hub)}, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        records = store / "ingest"
        # Wait until some chunks are durable (their record bytes set), then kill without warning.
        while not any(b"\x01" in r.read_bytes() for r in records.glob("*/chunks") if r.stat().st_size):
            assert time.monotonic() < deadline and first.poll() is None, "the pull made no progress"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
        [record] = [r.read_bytes() for r in records.glob("*/chunks")]
        durable = [i for i, done in enumerate(record[_RECORD_HEADER.size:]) if done]
        asked_before = settled_count(lambda: len(hub.cdn_requests))  # the killed pull's last asks in
        assert _cdn_ranges(hub).count("") == 0 and hub.cdn_failures == 0  # ranged, and both 503s were met
        proc = run_cli("pull", "--chunk-size", "1M", "hf://org/big", store=store, env=_env(hub), check=True)
        assert (Path(proc.stdout.split()[-1]) / "model.safetensors").read_bytes() == data
        again = _cdn_ranges(hub)[asked_before:]
        assert durable and len(again) == 8 - len(durable)  # each missing chunk once, no durable one again
        assert not {f"bytes={i << 20}-{((i + 1) << 20) - 1}" for i in durable} & set(again)


def test_missing_revision_is_named(hub, tmp_path: Path) -> None:
    """The error names the revision that does not exist, not only the repository."""
    proc = _pull(hub, tmp_path / "s", "hf://org/model@no-such-branch", check=False)
    assert proc.returncode == 3, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "'no-such-branch'" in last and "hf://org/model" in last, last
