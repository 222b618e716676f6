"""The daemon's surfaces on a shared node: host paths, its CSI socket, bounded work, request bodies.

Everything runs against a real ``modelcache serve`` process, over HTTP and over
the CSI unix socket as kubelet calls it.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from daemon_support import (
    DaemonProcess,
    mountinfo,
    publish_request,
    start_daemon,
    unmount_all_below,
)
from faultproxy import FaultProxy, stall_after
from formats_support import hand_layout
from support import MP_ARTIFACT, MP_CONFIG, MP_WEIGHT, run_cli, sha256, tree_digests

from modelcache.csi import csi_pb2 as pb

SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- not for pods\n"


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A 0600 key inside a 0700 directory, as on a node (the tests run as root, like the daemon)."""
    d = tmp_path / "host" / "secrets"
    d.mkdir(parents=True)
    (d / "id_ed25519").write_bytes(SECRET)
    (d / "id_ed25519").chmod(0o600)
    d.chmod(0o700)
    return d


@pytest.fixture
def daemon(tmp_path: Path):
    d = start_daemon(tmp_path / "node", "--retries", "1")
    try:
        yield d
    finally:
        d.stop()
        unmount_all_below(tmp_path)


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """The one host directory the operator allows."""
    root = tmp_path / "models"
    (root / "m").mkdir(parents=True)
    (root / "m" / "w.bin").write_bytes(b"weights" * 1000)
    (root / "m" / "config.json").write_bytes(b"{}")
    return root


@pytest.fixture
def allowing(tmp_path: Path, models: Path):
    d = start_daemon(tmp_path / "node", "--retries", "1", "--allow-local", str(models))
    try:
        yield d
    finally:
        d.stop()
        unmount_all_below(tmp_path)


def _store_holds_secret(daemon: DaemonProcess) -> bool:
    blobs = daemon.store / "blobs" / "sha256"
    return blobs.is_dir() and SECRET in b"".join(p.read_bytes() for p in blobs.iterdir())


# -- 1. host paths ------------------------------------------------------------


@pytest.mark.parametrize("form", ["file", "plain", "oci-layout", "FILE", "dotdot", "missing", "relative"])
def test_host_paths_are_refused_over_http(daemon, secret: Path, form: str) -> None:
    """Without --allow-local, no spelling of a host path becomes a model: 403, nothing pulled."""
    ref = {"file": f"file://{secret}", "plain": str(secret), "oci-layout": f"oci-layout://{secret}",
           "FILE": f"FILE://{secret}", "dotdot": f"{secret}/../secrets", "missing": f"{secret}/../nope",
           "relative": "secrets"}[form]
    status, body = daemon.call("POST", "/v1/pulls", {"ref": ref})
    assert status == 403 and body["code"] == "Forbidden", body
    assert "--allow-local" in body["message"]
    # The answer is the same whether or not the path exists: nothing about the host leaks.
    assert "exist" not in body["message"] and "directory (" not in body["message"]
    assert daemon.call("GET", "/v1/models")[1] == {"models": [], "pulls": []}
    assert not _store_holds_secret(daemon)


@pytest.mark.parametrize("form", ["plain", "file", "oci-layout"])
def test_host_paths_are_refused_over_csi(daemon, secret: Path, tmp_path: Path, form: str) -> None:
    """A pod naming a host directory as its model gets PERMISSION_DENIED, and no mount."""
    model = {"plain": str(secret), "file": f"file://{secret}", "oci-layout": f"oci-layout://{secret}"}[form]
    target = tmp_path / "pods" / "uid-x" / "mount"
    with pytest.raises(grpc.RpcError) as err:
        daemon.node().NodePublishVolume(publish_request("vol-h", target, model), timeout=30)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()
    assert "--allow-local" in (err.value.details() or "")
    assert str(target) not in mountinfo()
    assert not (target / "id_ed25519").exists()
    assert not _store_holds_secret(daemon)


def test_allowed_prefix_works_over_http_and_csi(allowing, models: Path, tmp_path: Path) -> None:
    """Under an allowed prefix, a local directory is pulled and mounted like any model."""
    job = allowing.call("POST", "/v1/pulls", {"ref": f"file://{models}/m"})
    assert job[0] == 202, job
    done = allowing.wait_pull(job[1]["id"])
    assert done["state"] == "done", done
    assert tree_digests(Path(done["path"])) == {"w.bin": sha256(b"weights" * 1000), "config.json": sha256(b"{}")}
    target = tmp_path / "pods" / "uid-a" / "mount"
    allowing.node().NodePublishVolume(publish_request("vol-a", target, str(models / "m")), timeout=30)
    assert (target / "config.json").read_bytes() == b"{}" and "ro" in mountinfo()[str(target)]


def test_tricks_to_leave_the_allowed_prefix(allowing, models: Path, secret: Path, tmp_path: Path) -> None:
    """A string prefix, .., a symlinked directory, DIR:TAG through a link: all refused as host paths."""
    evil = tmp_path / "models-evil"  # a string prefix of the allowed path, not under it
    evil.mkdir()
    (evil / "k").write_bytes(SECRET)
    (models / "link").symlink_to(secret)  # a directory link leading out
    (models / "layout-link").symlink_to(secret)
    (secret / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')  # so DIR:TAG reads it as a layout
    for ref in (str(evil), f"file://{evil}", f"{models}/../host/secrets", str(models / "link"),
                f"file://{models}/link", f"oci-layout://{models}/link", f"{models}/layout-link:v1",
                f"{models}/m/../../host/secrets"):
        status, body = allowing.call("POST", "/v1/pulls", {"ref": ref})
        assert status == 403 and body["code"] == "Forbidden", (ref, body)
        with pytest.raises(grpc.RpcError) as err:
            allowing.node().NodePublishVolume(publish_request("vol-t", tmp_path / "t", ref), timeout=30)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (ref, err.value.details())
    assert allowing.call("GET", "/v1/models")[1]["pulls"] == []
    assert not _store_holds_secret(allowing)


def test_symlinks_inside_an_allowed_directory_never_lead_out(allowing, models: Path, secret: Path) -> None:
    """A file link in a directory, a layout blob or index.json linked to a host file: the pull fails, unread."""
    leaky = models / "leaky"
    leaky.mkdir()
    (leaky / "config.json").write_bytes(b"{}")
    (leaky / "key").symlink_to(secret / "id_ed25519")

    # A layout whose only layer is a symlink to the key, announced with the key's true digest:
    # reading through the link would store the key (and the digest check would pass).
    config = b"{}"
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": MP_ARTIFACT,
        "config": {"mediaType": MP_CONFIG, "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": MP_WEIGHT, "digest": sha256(SECRET), "size": len(SECRET),
                    "annotations": {"org.cncf.model.filepath": "key"}}],
    }).encode()
    layout = hand_layout(models / "layout", [(manifest, {})], blobs=(config,))
    (layout / "blobs" / "sha256" / sha256(SECRET)[7:]).symlink_to(secret / "id_ed25519")

    # A layout whose index.json is a link to a host file.
    index_link = hand_layout(models / "index-link", [(manifest, {})], blobs=(config,))
    (index_link / "index.json").unlink()
    (secret / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha256(manifest),
         "size": len(manifest)}]}))
    (index_link / "index.json").symlink_to(secret / "index.json")

    for ref in (f"file://{leaky}", f"oci-layout://{layout}", str(index_link)):
        status, job = allowing.call("POST", "/v1/pulls", {"ref": ref})
        assert status == 202, job
        failed = allowing.wait_pull(job["id"])
        assert failed["state"] == "failed" and failed["error"]["code"] == "UnsafePath", (ref, failed)
        assert "outside" in failed["error"]["message"]
    assert not _store_holds_secret(allowing)


def test_cli_still_pulls_local_paths(models: Path, tmp_path: Path) -> None:
    """The CLI, run by a user as themselves, keeps local paths (no allowlist)."""
    proc = run_cli("pull", "-q", str(models / "m"), store=tmp_path / "cli-store", check=True)
    assert tree_digests(Path(proc.stdout.strip().splitlines()[-1]))["config.json"] == sha256(b"{}")


# -- 2. the CSI socket --------------------------------------------------------


def _serve_once(tmp_path: Path, sock: Path) -> subprocess.CompletedProcess:
    """``modelcache serve`` that is expected to refuse to start (bounded in time)."""
    from daemon_support import free_port

    return run_cli("serve", "--listen", f"127.0.0.1:{free_port()}", "--csi-socket", str(sock),
                   store=tmp_path / "other-store", timeout=30)


def _one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode != 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("modelcache: error:") and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[-1], lines[-1]


def test_second_daemon_on_a_live_socket_is_refused(daemon, tmp_path: Path) -> None:
    """A second daemon on a live daemon's socket exits with an error; the first keeps its socket and is ready."""
    inode = os.lstat(daemon.socket).st_ino
    _one_line_error(_serve_once(tmp_path, daemon.socket), str(daemon.socket))
    assert os.lstat(daemon.socket).st_ino == inode
    assert daemon.call("GET", "/readyz") == (200, {"ready": True})
    assert daemon.identity().Probe(pb.ProbeRequest(), timeout=10).ready.value is True
    assert not (tmp_path / "other-store").exists()  # refused before it touched a store


def test_second_daemon_on_a_live_socket_without_the_lock(daemon, tmp_path: Path) -> None:
    """Even a live socket served by something else (no lock file held) is never removed."""
    other = tmp_path / "elsewhere" / "csi.sock"
    other.parent.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(other))
        server.listen()
        _one_line_error(_serve_once(tmp_path, other), "another process serves")
        assert other.is_socket()


def test_regular_file_at_the_socket_path_is_left_intact(tmp_path: Path) -> None:
    """A regular file where the socket should go: refused, and the file is untouched."""
    path = tmp_path / "csi" / "csi.sock"
    path.parent.mkdir()
    path.write_bytes(b"precious")
    _one_line_error(_serve_once(tmp_path, path), "not a socket")
    assert path.read_bytes() == b"precious"


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    """A socket left by a killed daemon (connect refused) is removed and served again."""
    root = tmp_path / "node"
    stale = root / "csi" / "csi.sock"
    stale.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(stale))  # bound and closed without listening: the file stays, connects are refused
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        with pytest.raises(ConnectionRefusedError):
            probe.connect(str(stale))
    # Not compared by inode: ext4 hands the freed inode number straight to the new socket.
    d = start_daemon(root)
    try:
        assert d.identity().Probe(pb.ProbeRequest(), timeout=10).ready.value is True  # served again there
    finally:
        d.stop()


def test_readyz_is_false_when_the_socket_is_gone_or_replaced(daemon, tmp_path: Path) -> None:
    """/readyz follows the CSI socket: deleted, or another socket in its place, means not ready."""
    assert daemon.call("GET", "/readyz")[0] == 200
    daemon.socket.unlink()
    assert daemon.call("GET", "/readyz") == (503, {"ready": False})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as impostor:
        impostor.bind(str(daemon.socket))
        impostor.listen()
        assert daemon.call("GET", "/readyz") == (503, {"ready": False})


# -- 3. bounded work ----------------------------------------------------------


def _push(registry, repo: str, data: bytes) -> None:
    registry.push_image(repo, "v1", [(data, MP_WEIGHT, {"org.cncf.model.filepath": "w.bin"})],
                        config=b"{}", config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)


@pytest.mark.timeout(120)
def test_pulls_past_the_bound_get_429(registry, tmp_path: Path) -> None:
    """With --max-pulls 1 and one pull stalled: another model gets 429 + Retry-After over HTTP and
    RESOURCE_EXHAUSTED over CSI; the same model joins its job; once it ends, the next is taken."""
    _push(registry, "surfaces/stalled", os.urandom(256 << 10))
    _push(registry, "surfaces/next", b"next model")
    d = start_daemon(tmp_path / "node", "--retries", "1", "--max-pulls", "1")
    try:
        with FaultProxy(registry.host) as proxy:
            proxy.inject(stall_after(0, 60), times=16)  # cut short when the proxy closes
            stalled = f"oci://{proxy.host}/surfaces/stalled:v1"
            status, job = d.call("POST", "/v1/pulls", {"ref": stalled})
            assert status == 202, job
            headers: dict[str, str] = {}
            status, body = d.call("POST", "/v1/pulls", {"ref": f"oci://{registry.host}/surfaces/next:v1"},
                                  response_headers=headers)
            assert status == 429 and body["code"] == "Busy" and "--max-pulls" in body["message"], body
            assert int(headers["Retry-After"]) >= 1
            again = d.call("POST", "/v1/pulls", {"ref": stalled})
            assert again[0] == 202 and again[1]["id"] == job["id"]  # joining is always allowed
            with pytest.raises(grpc.RpcError) as err:
                d.node().NodePublishVolume(publish_request(
                    "vol-b", tmp_path / "t", f"oci://{registry.host}/surfaces/next:v1"), timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
            assert str(tmp_path / "t") not in mountinfo()
        assert d.wait_pull(job["id"])["state"] == "failed"  # the proxy is gone
        status, job = d.call("POST", "/v1/pulls", {"ref": f"oci://{registry.host}/surfaces/next:v1"})
        assert status == 202 and d.wait_pull(job["id"])["state"] == "done"
    finally:
        d.stop()
        unmount_all_below(tmp_path)


def test_finished_jobs_are_trimmed_as_they_finish(tmp_path: Path) -> None:
    """Finished jobs are forgotten when they finish, by count and by age, not only when a new one starts."""
    from modelcache.daemon.metrics import Metrics
    from modelcache.daemon.policy import RefPolicy
    from modelcache.daemon.pulls import PullManager
    from modelcache.sources import SourceOptions
    from modelcache.store import Store
    from modelcache.transfer import Engine, TransferConfig
    from modelcache.tree import Filters

    for i in range(5):
        (tmp_path / "m" / str(i)).mkdir(parents=True)
        (tmp_path / "m" / str(i) / "f").write_bytes(b"%d" % i)

    async def run(keep_finished: int, keep_seconds: float) -> list[str]:
        store = Store(tmp_path / f"store-{keep_finished}-{keep_seconds}")
        engine = Engine(store.content, TransferConfig())
        try:
            manager = PullManager(store, engine, SourceOptions(), Metrics(), policy=RefPolicy([tmp_path / "m"]),
                                  keep_finished=keep_finished, keep_seconds=keep_seconds)
            jobs = [await manager.start(str(tmp_path / "m" / str(i)), Filters()) for i in range(5)]
            await asyncio.wait([j.task for j in jobs if j.task is not None], timeout=60)
            assert all(j.state == "done" for j in jobs), [j.error for j in jobs]
            return [j.ref for j in manager.jobs()]
        finally:
            engine.close()
            store.close()

    kept = asyncio.run(run(2, 3600))
    assert len(kept) == 2
    assert asyncio.run(run(100, 0)) == []


# -- 4. request bodies --------------------------------------------------------


@pytest.mark.parametrize("raw,words", [
    (b"[" * 100_000, "nested too deeply"),
    (b'{"ref": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested too deeply"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"{not json", "not JSON"),
    (b"[1, 2]", "JSON object"),
], ids=["deep-array", "deep-in-object", "not-utf8", "not-json", "not-object"])
def test_bad_bodies_are_400_invalid_body(daemon, raw: bytes, words: str) -> None:
    """A body that is not UTF-8, not JSON, nested too deeply or not an object: 400 InvalidBody, never 500."""
    status, body = daemon.call("POST", "/v1/pulls", raw=raw)
    assert status == 400 and body["code"] == "InvalidBody" and words in body["message"], body
    assert daemon.call("GET", "/healthz")[0] == 200


def test_oversized_body_is_a_json_413(daemon) -> None:
    """A body past the API's limit is refused with a JSON 413."""
    status, body = daemon.call("POST", "/v1/pulls", raw=json.dumps({"ref": "x" * (512 << 10)}).encode())
    assert status == 413 and body["code"] and body["message"], body
    started = time.monotonic()
    assert daemon.call("GET", "/healthz")[0] == 200 and time.monotonic() - started < 5

