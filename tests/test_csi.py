"""The CSI node plugin over its unix socket, as kubelet drives it, with real bind mounts."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from daemon_support import mountinfo, publish_request, start_daemon, unmount_all_below
from faultproxy import FaultProxy, http_error
from support import MP_ARTIFACT, MP_CONFIG, MP_WEIGHT, sha256, tree_digests

from modelcache.csi import csi_pb2 as pb

FILES = {"model.safetensors": os.urandom(3 << 20), "config.json": b'{"a": 1}', "tok/tokenizer.json": b"{}"}


def _push(registry, repo: str, files: dict[str, bytes] = FILES) -> None:
    layers = [(data, MP_WEIGHT, {"org.cncf.model.filepath": name}) for name, data in files.items()]
    registry.push_image(repo, "v1", layers, config=b"{}", config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)


@pytest.fixture
def daemon(tmp_path: Path):
    d = start_daemon(tmp_path / "node", "--retries", "1")
    try:
        yield d
    finally:
        d.stop()
        unmount_all_below(tmp_path)


def test_identity_and_node_info(daemon) -> None:
    """GetPluginInfo names the driver; Probe is ready; the node reports its id and stats capability."""
    identity, node = daemon.identity(), daemon.node()
    info = identity.GetPluginInfo(pb.GetPluginInfoRequest())
    assert info.name == "csi.modelcache.io" and info.vendor_version
    assert identity.Probe(pb.ProbeRequest()).ready.value is True
    assert not identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities
    assert node.NodeGetInfo(pb.NodeGetInfoRequest()).node_id == "test-node"
    caps = node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest()).capabilities
    assert [c.rpc.type for c in caps] == [pb.NodeServiceCapability.RPC.GET_VOLUME_STATS]


def test_publish_read_only_then_unpublish(daemon, registry, tmp_path: Path) -> None:
    """The model appears read-only at the target; twice is fine; unpublish removes it, twice too."""
    _push(registry, "csi/basic")
    node = daemon.node()
    target = tmp_path / "pods" / "uid-1" / "volumes" / "model" / "mount"
    request = publish_request("vol-1", target, f"oci://{registry.host}/csi/basic:v1")
    node.NodePublishVolume(request, timeout=60)
    assert tree_digests(target) == {name: sha256(data) for name, data in FILES.items()}
    assert "ro" in mountinfo()[str(target)]
    with pytest.raises(OSError) as err:
        (target / "new-file").write_bytes(b"x")
    assert err.value.errno == errno.EROFS
    node.NodePublishVolume(request, timeout=10)  # idempotent
    stats = node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id="vol-1", volume_path=str(target)))
    assert {u.unit for u in stats.usage} == {pb.VolumeUsage.BYTES, pb.VolumeUsage.INODES}
    status, models = daemon.call("GET", "/v1/models")
    assert status == 200 and models["models"][0]["mounts"] == 1
    node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="vol-1", target_path=str(target)))
    assert str(target) not in mountinfo() and not target.exists()
    node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="vol-1", target_path=str(target)))
    assert daemon.call("GET", "/v1/models")[1]["models"][0]["mounts"] == 0


def test_include_exclude_attributes(daemon, registry, tmp_path: Path) -> None:
    """include/exclude volume attributes publish only the selected files."""
    _push(registry, "csi/select")
    target = tmp_path / "t"
    daemon.node().NodePublishVolume(publish_request("vol-s", target, f"oci://{registry.host}/csi/select:v1",
                                                    include="*.json", exclude="tok/*"), timeout=60)
    assert set(tree_digests(target)) == {"config.json"}


def test_missing_capability_is_invalid_argument(daemon, tmp_path: Path) -> None:
    """CSI: volume_capability is REQUIRED; without it nothing is pulled or mounted."""
    request = publish_request("vol-c", tmp_path / "t", "oci://127.0.0.1:9/never/pulled:v1")
    request.ClearField("volume_capability")
    with pytest.raises(grpc.RpcError) as err:
        daemon.node().NodePublishVolume(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert daemon.call("GET", "/v1/models")[1]["pulls"] == []


def test_target_holding_another_model_is_already_exists(daemon, registry, tmp_path: Path) -> None:
    """A target mounted with one model is never mounted over with another: ALREADY_EXISTS."""
    _push(registry, "csi/first")
    _push(registry, "csi/second", {"other.bin": os.urandom(1 << 20)})
    target, node = tmp_path / "t", daemon.node()
    node.NodePublishVolume(publish_request("vol-1", target, f"oci://{registry.host}/csi/first:v1"), timeout=60)
    with pytest.raises(grpc.RpcError) as err:
        node.NodePublishVolume(publish_request("vol-2", target, f"oci://{registry.host}/csi/second:v1"), timeout=60)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS, err.value.details()
    assert set(tree_digests(target)) == set(FILES)  # still the first model
    mounts = {m["ref"]: m["mounts"] for m in daemon.call("GET", "/v1/models")[1]["models"]}
    assert mounts == {f"oci://{registry.host}/csi/first:v1": 1, f"oci://{registry.host}/csi/second:v1": 0}


def test_a_publish_that_fails_after_the_pull_leaves_no_lease(daemon, registry, tmp_path: Path) -> None:
    """The model is pulled, then the target cannot be made (under a regular file): INTERNAL, and no lease is
    left rooting the view (nothing was mounted, so no NodeUnpublishVolume will come for it). A published
    volume that kubelet asks again for, at a target that fails, keeps its lease."""
    _push(registry, "csi/badtarget")
    ref, node = f"oci://{registry.host}/csi/badtarget:v1", daemon.node()
    (tmp_path / "a-file").write_bytes(b"")
    with pytest.raises(grpc.RpcError) as err:
        node.NodePublishVolume(publish_request("vol-b", tmp_path / "a-file" / "mount", ref), timeout=60)
    assert err.value.code() == grpc.StatusCode.INTERNAL, err.value.details()
    [model] = daemon.call("GET", "/v1/models")[1]["models"]
    assert model["mounts"] == 0  # pulled, but not leased by the volume that failed

    target = tmp_path / "t"
    node.NodePublishVolume(publish_request("vol-b", target, ref), timeout=60)  # kubelet's retry, a good target
    with pytest.raises(grpc.RpcError):
        node.NodePublishVolume(publish_request("vol-b", tmp_path / "a-file" / "again", ref), timeout=60)
    assert daemon.call("GET", "/v1/models")[1]["models"][0]["mounts"] == 1
    assert set(tree_digests(target)) == set(FILES)


def test_a_second_operation_on_a_volume_still_being_published_is_aborted(daemon, registry, tmp_path: Path) -> None:
    """While a publish of a volume runs (its pull held at the origin), another NodePublishVolume or
    NodeUnpublishVolume for that volume id is ABORTED (CSI: an operation is pending), not run beside it; the
    first one then completes, and the volume can be unpublished."""
    _push(registry, "csi/pending")
    target, node = tmp_path / "t", daemon.node()
    with FaultProxy(registry.host) as proxy, concurrent.futures.ThreadPoolExecutor(1) as pool:
        proxy.hold()
        request = publish_request("vol-p", target, f"oci://{proxy.host}/csi/pending:v1")
        first = pool.submit(node.NodePublishVolume, request, timeout=60)
        deadline = time.monotonic() + 30
        while not daemon.call("GET", "/v1/models")[1]["pulls"]:
            assert time.monotonic() < deadline and not first.done(), "the first publish never started its pull"
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as again:
            node.NodePublishVolume(request, timeout=10)
        assert again.value.code() == grpc.StatusCode.ABORTED, again.value.details()
        with pytest.raises(grpc.RpcError) as gone:
            node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="vol-p", target_path=str(target)),
                                     timeout=10)
        assert gone.value.code() == grpc.StatusCode.ABORTED, gone.value.details()
        proxy.hold(False)
        first.result()
    assert set(tree_digests(target)) == set(FILES)
    node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="vol-p", target_path=str(target)), timeout=10)
    assert str(target) not in mountinfo()


def test_origin_down_then_back(daemon, registry, tmp_path: Path) -> None:
    """While the origin fails, publish answers UNAVAILABLE; kubelet's next try pulls and mounts."""
    data = os.urandom(1 << 20)
    _push(registry, "csi/flaky", {"w.bin": data})
    with FaultProxy(registry.host) as proxy:
        proxy.inject(http_error(503), times=2)  # the daemon runs with --retries 1: two failures end the pull
        request = publish_request("vol-f", tmp_path / "t", f"oci://{proxy.host}/csi/flaky:v1")
        with pytest.raises(grpc.RpcError) as err:
            daemon.node().NodePublishVolume(request, timeout=60)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert str(tmp_path / "t") not in mountinfo()
        daemon.node().NodePublishVolume(request, timeout=60)
    assert (tmp_path / "t" / "w.bin").read_bytes() == data
    assert daemon.metric('modelcache_csi_publish_total{code="UNAVAILABLE"}') == 1
    assert daemon.metric('modelcache_csi_publish_total{code="OK"}') == 1


@pytest.mark.parametrize("attrs,code", [
    ({"model": ""}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"model": "ftp://nope/x"}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"model": "oci://127.0.0.1:9/csi/down:v1"}, grpc.StatusCode.UNAVAILABLE),
], ids=["missing", "bad-ref", "origin-down"])
def test_publish_errors_map_to_grpc_codes(daemon, tmp_path: Path, attrs: dict, code) -> None:
    """Bad attributes and an unreachable origin get the codes kubelet understands."""
    request = publish_request("vol-e", tmp_path / "t", "placeholder")
    request.volume_context.update(attrs)
    with pytest.raises(grpc.RpcError) as err:
        daemon.node().NodePublishVolume(request, timeout=60)
    assert err.value.code() == code, err.value.details()
    assert str(tmp_path / "t") not in mountinfo()


def test_missing_model_is_not_found(daemon, registry, tmp_path: Path) -> None:
    """A tag the registry does not have: NOT_FOUND."""
    with pytest.raises(grpc.RpcError) as err:
        daemon.node().NodePublishVolume(
            publish_request("vol-n", tmp_path / "t", f"oci://{registry.host}/csi/absent:v1"), timeout=60)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_slow_pull_past_deadline_then_retry(daemon, registry, tmp_path: Path) -> None:
    """A pull longer than the call's deadline: DEADLINE_EXCEEDED, and kubelet's retry finds it done."""
    _push(registry, "csi/slow", {"big.bin": os.urandom(6 << 20)})
    with FaultProxy(registry.host, rate=3 << 20) as proxy:
        request = publish_request("vol-d", tmp_path / "t", f"oci://{proxy.host}/csi/slow:v1")
        with pytest.raises(grpc.RpcError) as err:
            daemon.node().NodePublishVolume(request, timeout=1.0)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # As kubelet does, again after ABORTED: a client deadline can end before the daemon's side of the
        # first call has finished its cleanup on a loaded machine.
        deadline = time.monotonic() + 30
        while True:
            try:
                daemon.node().NodePublishVolume(request, timeout=30)
                break
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.ABORTED or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert _served(proxy) == 6 << 20  # the first call's pull went on; nothing was fetched twice
    assert (tmp_path / "t" / "big.bin").stat().st_size == 6 << 20


@pytest.mark.timeout(120)
def test_fifty_concurrent_publishes_download_once(daemon, registry, tmp_path: Path) -> None:
    """50 pods asking at once for one uncached model: one download, 50 mounts, 50 clean unmounts."""
    files = {"w.bin": os.urandom(4 << 20), "config.json": b"{}"}
    _push(registry, "csi/load", files)
    node = daemon.node()
    with FaultProxy(registry.host) as proxy:
        model = f"oci://{proxy.host}/csi/load:v1"
        targets = [tmp_path / "pods" / f"p{i}" / "mount" for i in range(50)]
        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            futures = [pool.submit(node.NodePublishVolume, publish_request(f"vol-{i}", t, model), timeout=120)
                       for i, t in enumerate(targets)]
            for f in futures:
                f.result()
        assert _served(proxy) == sum(len(d) for d in files.values())
    # The daemon's own account agrees: one pull job, the model's bytes fetched once, 50 successful calls.
    assert daemon.metric("modelcache_cache_misses_total") == 1
    assert daemon.metric('modelcache_fetched_bytes_total{source="oci"}') == sum(len(d) for d in files.values())
    assert daemon.metric('modelcache_csi_publish_total{code="OK"}') == 50
    assert len(daemon.call("GET", "/v1/models")[1]["pulls"]) == 1
    assert daemon.metric("modelcache_mounts_active") == 50
    points = mountinfo()
    assert all("ro" in points[str(t)] for t in targets)
    assert all((t / "w.bin").stat().st_size == 4 << 20 for t in targets)
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        list(pool.map(lambda it: node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(
            volume_id=f"vol-{it[0]}", target_path=str(it[1]))), enumerate(targets)))
    points = mountinfo()
    assert not any(str(t) in points for t in targets)
    assert daemon.call("GET", "/v1/models")[1]["models"][0]["mounts"] == 0


def test_restart_keeps_leases_of_mounted_volumes(registry, tmp_path: Path) -> None:
    """After a crash, leases of volumes still mounted are kept and the others dropped."""
    _push(registry, "csi/restart")
    model = f"oci://{registry.host}/csi/restart:v1"
    first = start_daemon(tmp_path / "node")
    try:
        node = first.node()
        node.NodePublishVolume(publish_request("keep", tmp_path / "keep", model), timeout=60)
        node.NodePublishVolume(publish_request("gone", tmp_path / "gone", model), timeout=60)
        first.stop(signal.SIGKILL)
        # The pod went away while the daemon was down.
        subprocess.run(["umount", str(tmp_path / "gone")], check=True)
        second = start_daemon(tmp_path / "node")
        try:
            [model_row] = second.call("GET", "/v1/models")[1]["models"]
            assert model_row["mounts"] == 1
            assert (tmp_path / "keep" / "config.json").read_bytes() == FILES["config.json"]
            second.node().NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="keep",
                                                                            target_path=str(tmp_path / "keep")))
            assert second.call("GET", "/v1/models")[1]["models"][0]["mounts"] == 0
        finally:
            assert second.stop() == 0  # SIGTERM drains and exits cleanly
    finally:
        first.stop()
        unmount_all_below(tmp_path)


@pytest.mark.timeout(90)
def test_sigterm_drains_and_the_pull_resumes(registry, tmp_path: Path) -> None:
    """SIGTERM mid-pull: the waiting publish gets UNAVAILABLE, the daemon exits 0 at once, the
    durable chunks stay, and the restarted daemon fetches only what was missing."""
    data = os.urandom(16 << 20)
    _push(registry, "csi/drain", {"big.bin": data})
    with FaultProxy(registry.host, rate=4 << 20) as proxy:
        request = publish_request("vol-t", tmp_path / "t", f"oci://{proxy.host}/csi/drain:v1")
        first = start_daemon(tmp_path / "node")
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                call = pool.submit(first.node().NodePublishVolume, request, timeout=60)
                deadline = time.monotonic() + 30
                # 8 parallel 1 MiB chunks at 4 MiB/s complete together after about 2 s: wait for them.
                while _pulled(first) < 10 << 20:
                    assert time.monotonic() < deadline, "the pull made no progress"
                    time.sleep(0.05)
                stopped = time.monotonic()
                assert first.stop() == 0
                assert time.monotonic() - stopped < 8
                with pytest.raises(grpc.RpcError) as err:
                    call.result()
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        finally:
            first.stop(signal.SIGKILL)
        assert str(tmp_path / "t") not in mountinfo()
        assert list((tmp_path / "node" / "store" / "ingest").glob("*/chunks"))  # kept for resume
        before = _served(proxy)
        assert 8 << 20 <= before < len(data)

        proxy.rate = None
        second = start_daemon(tmp_path / "node")
        try:
            second.node().NodePublishVolume(request, timeout=60)
            assert (tmp_path / "t" / "big.bin").read_bytes() == data
            # Only the chunks not durable before SIGTERM came again.
            assert second.metric('modelcache_fetched_bytes_total{source="oci"}') <= len(data) - (8 << 20)
            assert _served(proxy) - before <= len(data) - (8 << 20)
        finally:
            second.stop()
            unmount_all_below(tmp_path)


def _pulled(daemon) -> int:
    pulls = daemon.call("GET", "/v1/models")[1]["pulls"]
    return pulls[0]["bytes_done"] if pulls else 0


def _served(proxy: FaultProxy) -> int:
    return sum(e.bytes for e in proxy.blob_gets())
