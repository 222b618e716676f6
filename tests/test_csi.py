"""The CSI node plugin over its unix socket, as kubelet drives it, with real bind mounts."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import signal
from pathlib import Path

import grpc
import pytest
from daemon_support import mountinfo, publish_request, start_daemon, unmount_all_below
from faultproxy import FaultProxy
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
        daemon.node().NodePublishVolume(request, timeout=30)
        assert _served(proxy) == 6 << 20  # the first call's pull went on; nothing was fetched twice
    assert (tmp_path / "t" / "big.bin").stat().st_size == 6 << 20


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
        os.system(f"umount {tmp_path / 'gone'}")  # the pod went away while the daemon was down
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


def _served(proxy: FaultProxy) -> int:
    return sum(e.bytes for e in proxy.blob_gets())
