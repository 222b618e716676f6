"""The daemon's HTTP API against a running daemon and the real registry."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from daemon_support import start_daemon, unmount_all_below
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


def _wait(daemon, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, job = daemon.call("GET", f"/v1/pulls/{job_id}")
        assert status == 200
        if job["state"] in ("done", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"pull {job_id} did not finish")


def test_health_and_readiness(daemon) -> None:
    """healthz and readyz answer 200 with JSON once the daemon serves."""
    assert daemon.call("GET", "/healthz") == (200, {"status": "ok"})
    assert daemon.call("GET", "/readyz") == (200, {"ready": True})


def test_prewarm_pull_models_pins_and_metrics(daemon, registry) -> None:
    """POST /v1/pulls answers 202 at once; the job finishes; the model is listed, pinnable, measured."""
    registry.push_image("api/model", "v1", [(DATA, MP_WEIGHT, {"org.cncf.model.filepath": "w.bin"}),
                                            (b"{}", MP_WEIGHT, {"org.cncf.model.filepath": "config.json"})],
                        config=b"{}", config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)
    ref = f"oci://{registry.host}/api/model:v1"
    status, job = daemon.call("POST", "/v1/pulls", {"ref": ref})
    assert status == 202 and job["state"] in ("pending", "running", "done") and job["id"]
    # Asking again while it runs joins the same job.
    again = daemon.call("POST", "/v1/pulls", {"ref": ref})[1]
    assert again["id"] == job["id"] or again["state"] == "pending"
    done = _wait(daemon, job["id"])
    assert done["state"] == "done" and done["bytes_done"] == done["bytes_total"] == len(DATA) + 2
    assert tree_digests(Path(done["path"])) == {"w.bin": sha256(DATA), "config.json": sha256(b"{}")}

    [model] = daemon.call("GET", "/v1/models")[1]["models"]
    assert model["ref"] == ref and model["files"] == 2 and model["pinned"] is False
    assert daemon.call("PUT", f"/v1/pins/{model['view']}")[1] == {"view": model["view"], "pinned": True}
    assert daemon.call("GET", "/v1/models")[1]["models"][0]["pinned"] is True
    assert daemon.call("DELETE", f"/v1/pins/{model['view']}")[0] == 200
    assert daemon.call("DELETE", f"/v1/pins/{model['view']}")[0] == 404

    # A second pull of the cached model is a cache hit; metrics show both.
    _wait(daemon, daemon.call("POST", "/v1/pulls", {"ref": ref})[1]["id"])
    text = daemon.call("GET", "/metrics")[1]["text"]
    for name in ("modelcache_fetched_bytes_total", "modelcache_cache_hits_total 1.0",
                 "modelcache_cache_misses_total 1.0", "modelcache_pull_duration_seconds_bucket",
                 "modelcache_chunks_retried_total", "modelcache_store_bytes_used", "modelcache_store_bytes_free",
                 "modelcache_mounts_active 0.0"):
        assert name in text, name
    prefix = f'modelcache_fetched_bytes_total{{source="{ref}"}} '
    [fetched] = [float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix)]
    assert fetched == len(DATA) + 2


@pytest.mark.parametrize("body,status,code", [
    ({"ref": "ftp://x/y"}, 400, "InvalidReference"),
    ({"nope": 1}, 400, "InvalidReference"),
    ({"ref": "oci://h/r:v1", "include": "not-a-list"}, 400, "InvalidReference"),
])
def test_bad_pull_requests_are_json_errors(daemon, body: dict, status: int, code: str) -> None:
    """Bad requests get a JSON error with a code and message, never a traceback."""
    got_status, got = daemon.call("POST", "/v1/pulls", body)
    assert got_status == status and got["code"] == code and got["message"]


def test_failed_pull_and_unknown_ids(daemon, registry) -> None:
    """A pull of a missing tag fails with its error; unknown jobs and views are 404/400 JSON."""
    job = daemon.call("POST", "/v1/pulls", {"ref": f"oci://{registry.host}/api/absent:v1"})[1]
    failed = _wait(daemon, job["id"])
    assert failed["state"] == "failed" and failed["error"]["code"] == "NotFound"
    assert daemon.call("GET", "/v1/pulls/nope")[0] == 404
    assert daemon.call("PUT", "/v1/pins/sha256:" + "0" * 64)[0] == 404
    assert daemon.call("PUT", "/v1/pins/not-a-digest")[0] == 400
