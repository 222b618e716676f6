"""CSI Identity and Node services for inline ephemeral volumes of cached models.

A pod names a model in its volume's attributes (``volume_context``):
``model`` (a reference), and optionally ``include`` / ``exclude``
(comma-separated globs). NodePublishVolume makes the model's read-only tree
appear at kubelet's target path:

- a model already in the store is mounted straight from the index, without
  asking its origin (a warm mount costs two mount(2) calls, whatever its size);
- otherwise one pull job fetches it, however many pods ask at once; if the
  call's deadline comes first, the answer is DEADLINE_EXCEEDED and kubelet's
  retry finds the same job further along.

Errors become the gRPC codes kubelet understands: INVALID_ARGUMENT for a bad
request or reference, NOT_FOUND for a model its source does not have,
PERMISSION_DENIED for refused credentials, UNAVAILABLE when the source is
down, DEADLINE_EXCEEDED while the pull runs on, INTERNAL otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import grpc
from google.protobuf import wrappers_pb2

from .. import __version__
from ..errors import (
    InvalidContent,
    InvalidReference,
    ModelCacheError,
    NotFound,
    Unauthorized,
    Unavailable,
)
from ..refs import parse
from ..tree import Filters
from . import DRIVER_NAME
from . import csi_pb2 as pb
from . import csi_pb2_grpc as rpc

log = logging.getLogger(__name__)

_DEADLINE_MARGIN = 0.5  # seconds kept back to answer before kubelet's deadline
_NO_DEADLINE_WAIT = 60.0


def grpc_code(error: ModelCacheError) -> grpc.StatusCode:
    """The gRPC status for one of our errors."""
    if isinstance(error, InvalidReference):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, NotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, Unauthorized):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(error, Unavailable):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(error, InvalidContent):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


class IdentityService(rpc.IdentityServicer):
    """Who the plugin is, and whether it is ready."""

    def __init__(self, ready: asyncio.Event) -> None:
        self._ready = ready

    async def GetPluginInfo(self, request, context):  # noqa: N802 - gRPC method names
        return pb.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=__version__)

    async def GetPluginCapabilities(self, request, context):  # noqa: N802
        return pb.GetPluginCapabilitiesResponse()  # a node-only plugin: no controller service

    async def Probe(self, request, context):  # noqa: N802
        return pb.ProbeResponse(ready=wrappers_pb2.BoolValue(value=self._ready.is_set()))


class NodeService(rpc.NodeServicer):
    """Publishes cached models into pods."""

    def __init__(self, daemon, node_id: str) -> None:  # daemon: server.Daemon (avoids an import cycle)
        self._daemon = daemon
        self._node_id = node_id

    async def NodeGetInfo(self, request, context):  # noqa: N802
        return pb.NodeGetInfoResponse(node_id=self._node_id)

    async def NodeGetCapabilities(self, request, context):  # noqa: N802
        stats = pb.NodeServiceCapability(
            rpc=pb.NodeServiceCapability.RPC(type=pb.NodeServiceCapability.RPC.GET_VOLUME_STATS))
        return pb.NodeGetCapabilitiesResponse(capabilities=[stats])

    async def NodePublishVolume(self, request, context):  # noqa: N802
        code = "OK"
        try:
            await self._publish(request, context)
            return pb.NodePublishVolumeResponse()
        except ModelCacheError as e:
            code = grpc_code(e).name
            await context.abort(grpc_code(e), str(e))
        except TimeoutError:
            code = "DEADLINE_EXCEEDED"
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                "the model is still being pulled; the pull goes on and a retry will find it")
        except OSError as e:
            code = "INTERNAL"
            await context.abort(grpc.StatusCode.INTERNAL, f"mount failed: {e}")
        finally:
            self._daemon.metrics.publishes.labels(code=code).inc()

    async def _publish(self, request, context) -> None:
        volume_id, target = request.volume_id, request.target_path
        if not volume_id or not target:
            raise InvalidReference("volume_id and target_path are required")
        if request.volume_capability.HasField("block"):
            raise InvalidReference("block access is not supported: models are published as filesystems")
        attrs = dict(request.volume_context)
        ref = attrs.get("model", "").strip()
        if not ref:
            raise InvalidReference("volume attribute 'model' is required (a model reference such as oci://…)")
        filters = Filters.of(_globs(attrs.get("include")), _globs(attrs.get("exclude")))
        canonical = str(parse(ref))
        view = await asyncio.to_thread(self._daemon.cached_view, canonical, filters)
        if view is None:
            job = self._daemon.pulls.start(canonical, filters)
            remaining = context.time_remaining()
            wait = _NO_DEADLINE_WAIT if remaining is None else max(0.0, remaining - _DEADLINE_MARGIN)
            assert job.task is not None
            await asyncio.wait_for(asyncio.shield(job.task), wait)
            if job.error is not None:
                raise job.error
            assert job.path is not None
            view = job.path
        holder = {k: v for k, v in attrs.items() if k.startswith("csi.storage.k8s.io/")}
        holder["model"] = canonical
        await asyncio.to_thread(self._daemon.mounts.publish, volume_id, view, Path(target), holder)

    async def NodeUnpublishVolume(self, request, context):  # noqa: N802
        if not request.volume_id or not request.target_path:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "volume_id and target_path are required")
        try:
            await asyncio.to_thread(self._daemon.mounts.unpublish, request.volume_id, Path(request.target_path))
        except OSError as e:
            await context.abort(grpc.StatusCode.INTERNAL, f"unmount failed: {e}")
        return pb.NodeUnpublishVolumeResponse()

    async def NodeGetVolumeStats(self, request, context):  # noqa: N802
        path = request.volume_path
        if not path:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "volume_path is required")
        try:
            st = await asyncio.to_thread(os.statvfs, path)
        except FileNotFoundError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{path} does not exist")
        return pb.NodeGetVolumeStatsResponse(usage=[
            pb.VolumeUsage(unit=pb.VolumeUsage.BYTES, total=st.f_blocks * st.f_frsize,
                           available=st.f_bavail * st.f_frsize, used=(st.f_blocks - st.f_bfree) * st.f_frsize),
            pb.VolumeUsage(unit=pb.VolumeUsage.INODES, total=st.f_files, available=st.f_favail,
                           used=st.f_files - st.f_ffree),
        ])


def _globs(value: str | None) -> list[str]:
    return [g.strip() for g in (value or "").split(",") if g.strip()]
