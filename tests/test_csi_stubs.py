"""The committed CSI stubs are what csi/csi.proto compiles to (tools/gen_csi.sh was re-run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from modelcache.csi import DRIVER_NAME
from modelcache.csi import csi_pb2 as pb
from modelcache.csi import csi_pb2_grpc as rpc

ROOT = Path(__file__).resolve().parent.parent


def _without_json_names(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    # protoc's descriptor sets carry json_name; the descriptor embedded in csi_pb2 does not.
    def strip(messages) -> None:
        for message in messages:
            for f in message.field:
                f.ClearField("json_name")
            strip(message.nested_type)

    strip(file.message_type)
    file.ClearField("source_code_info")
    return file


def test_stubs_match_the_proto(tmp_path: Path) -> None:
    """Compiling csi/csi.proto gives exactly the descriptor the committed csi_pb2.py embeds."""
    pytest.importorskip("grpc_tools")
    out = tmp_path / "csi.pb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'csi'}", f"--descriptor_set_out={out}",
                    "csi.proto"], check=True, capture_output=True)
    compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert _without_json_names(compiled) == committed, "run bash tools/gen_csi.sh and commit the result"


def test_services_are_csi_v1() -> None:
    """kubelet calls /csi.v1.Identity/... and /csi.v1.Node/...: the package and method names must match."""
    assert pb.DESCRIPTOR.package == "csi.v1"
    services = {s.full_name: sorted(m.name for m in s.methods) for s in pb.DESCRIPTOR.services_by_name.values()}
    assert services == {
        "csi.v1.Identity": ["GetPluginCapabilities", "GetPluginInfo", "Probe"],
        "csi.v1.Node": ["NodeGetCapabilities", "NodeGetInfo", "NodeGetVolumeStats", "NodePublishVolume",
                        "NodeUnpublishVolume"],
    }
    assert hasattr(rpc, "add_NodeServicer_to_server") and hasattr(rpc, "IdentityStub")
    # CSI spec, GetPluginInfo: at most 63 characters, domain-name style.
    assert len(DRIVER_NAME) <= 63 and DRIVER_NAME.replace(".", "").isalnum()
