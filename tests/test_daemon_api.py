"""The daemon's HTTP API against a running daemon and the real registry."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from daemon_support import start_daemon, unmount_all_below
from faultproxy import FaultProxy
from support import MP_ARTIFACT, MP_CONFIG, MP_WEIGHT, sha256, tree_digests

DATA = os.urandom(2 << 20)


@pytest.fixture
def daemon(tmp_path: Path):
    d = start_daemon(tmp_path / "node", "--retries", "1")
    try:
        yield d
    finally:
        d.stop()
        unmount_all_below(tmp_path)


def test_health_and_readiness(daemon) -> None:
    """healthz and readyz answer 200 with JSON once the daemon serves."""
    assert daemon.call("GET", "/healthz") == (200, {"status": "ok"})
    assert daemon.call("GET", "/readyz") == (200, {"ready": True})


def test_prewarm_pull_models_pins_and_metrics(daemon, registry) -> None:
    """POST /v1/pulls answers 202 at once; the job finishes; the model is listed, pinnable, measured."""
    registry.push_image("api/model", "v1", [(DATA, MP_WEIGHT, {"org.cncf.model.filepath": "w.bin"}),
                                            (b"{}", MP_WEIGHT, {"org.cncf.model.filepath": "config.json"})],
                        config=b"{}", config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)
    # The origin holds its blobs back, so the first job is still running when we ask again.
    with FaultProxy(registry.host) as proxy:
        proxy.hold()
        ref = f"oci://{proxy.host}/api/model:v1"
        status, job = daemon.call("POST", "/v1/pulls", {"ref": ref})
        assert status == 202 and job["state"] in ("pending", "running") and job["id"]
        again = daemon.call("POST", "/v1/pulls", {"ref": ref, "include": [], "exclude": []})
        assert again[0] == 202 and again[1]["id"] == job["id"]  # single flight: the same job
        proxy.hold(False)
        done = daemon.wait_pull(job["id"])
        assert done["state"] == "done" and done["bytes_done"] == done["bytes_total"] == len(DATA) + 2
        assert tree_digests(Path(done["path"])) == {"w.bin": sha256(DATA), "config.json": sha256(b"{}")}
        assert sum(e.bytes for e in proxy.blob_gets()) == len(DATA) + 2

        [model] = daemon.call("GET", "/v1/models")[1]["models"]
        assert model["ref"] == ref and model["files"] == 2 and model["pinned"] is False
        assert model["path"] == done["path"] and model["mounts"] == 0
        assert daemon.call("PUT", f"/v1/pins/{model['view']}")[1] == {"view": model["view"], "owner": "api",
                                                                       "pinned": True}
        assert daemon.call("GET", "/v1/models")[1]["models"][0]["pinned"] is True
        assert daemon.call("DELETE", f"/v1/pins/{model['view']}")[0] == 200
        assert daemon.call("DELETE", f"/v1/pins/{model['view']}")[0] == 404
        # Pins are owned: one pre-warm resource unpinning never drops another's pin.
        for owner in ("prewarm-a", "prewarm-b"):
            assert daemon.call("PUT", f"/v1/pins/{model['view']}?owner={owner}")[0] == 200
        assert daemon.call("DELETE", f"/v1/pins/{model['view']}?owner=prewarm-a")[1]["pinned"] is False
        assert daemon.call("GET", "/v1/models")[1]["models"][0]["pinned"] is True
        assert daemon.call("DELETE", f"/v1/pins/{model['view']}")[0] == 404  # "api" holds no pin
        assert daemon.call("DELETE", f"/v1/pins/{model['view']}?owner=prewarm-b")[0] == 200
        assert daemon.call("GET", "/v1/models")[1]["models"][0]["pinned"] is False

        # A second pull of the cached model is a cache hit; metrics show both.
        second = daemon.wait_pull(daemon.call("POST", "/v1/pulls", {"ref": ref})[1]["id"])
        assert second["id"] != job["id"] and second["state"] == "done" and second["bytes_fetched"] == 0
    text = daemon.call("GET", "/metrics")[1]["text"]
    for name in ("modelcache_fetched_bytes_total", "modelcache_cache_hits_total 1.0",
                 "modelcache_cache_misses_total 1.0", "modelcache_pull_duration_seconds_bucket",
                 "modelcache_chunks_retried_total", "modelcache_store_bytes_used", "modelcache_store_bytes_free",
                 "modelcache_mounts_active 0.0", "modelcache_csi_publish_duration_seconds_bucket"):
        assert name in text, name
    # Labelled by the kind of source, never by model: series stay few however many models a node pulls.
    assert daemon.metric('modelcache_fetched_bytes_total{source="oci"}') == len(DATA) + 2
    assert daemon.metric('modelcache_pull_duration_seconds_count{outcome="done"}') == 2
    assert ref not in text


def test_unknown_paths_and_methods_are_json_errors(daemon) -> None:
    """aiohttp's own 404 and 405 come in the same JSON shape as ours."""
    status, body = daemon.call("GET", "/v1/nope")
    assert status == 404 and body["code"] == "NotFound" and "/v1/nope" in body["message"]
    status, body = daemon.call("DELETE", "/v1/models")
    assert status == 405 and body["code"] == "MethodNotAllowed"


def test_body_that_is_not_json(daemon) -> None:
    """A body that is not JSON (or not UTF-8) is a 400 with a JSON error, not a 500."""
    import urllib.error
    import urllib.request

    for raw in (b"{not json", b"\xff\xfe"):
        req = urllib.request.Request(f"http://{daemon.http}/v1/pulls", data=raw, method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {daemon.token}"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 400 and json.loads(err.value.read())["code"] == "InvalidBody"


@pytest.mark.parametrize("body,status,code", [
    ({"ref": "ftp://x/y"}, 400, "InvalidReference"),
    ({"nope": 1}, 400, "InvalidBody"),
    ({"ref": "oci://h/r:v1", "include": "not-a-list"}, 400, "InvalidBody"),
])
def test_bad_pull_requests_are_json_errors(daemon, body: dict, status: int, code: str) -> None:
    """Bad requests get a JSON error with a code and message, never a traceback."""
    got_status, got = daemon.call("POST", "/v1/pulls", body)
    assert got_status == status and got["code"] == code and got["message"]


def test_failed_pull_and_unknown_ids(daemon, registry) -> None:
    """A pull of a missing tag fails with its error; unknown jobs and views are 404/400 JSON."""
    job = daemon.call("POST", "/v1/pulls", {"ref": f"oci://{registry.host}/api/absent:v1"})[1]
    failed = daemon.wait_pull(job["id"])
    assert failed["state"] == "failed" and failed["error"]["code"] == "NotFound"
    assert daemon.call("GET", "/v1/pulls/nope")[0] == 404
    assert daemon.call("PUT", "/v1/pins/sha256:" + "0" * 64)[0] == 404
    assert daemon.call("PUT", "/v1/pins/not-a-digest")[0] == 400
