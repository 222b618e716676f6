"""CSI Identity and Node services for inline ephemeral volumes of cached models.

A pod names a model in its volume's attributes (``volume_context``):
``model`` (a reference), and optionally ``include`` / ``exclude``
(comma-separated globs). NodePublishVolume makes the model's read-only tree
appear at kubelet's target path:

- a model already in the store is mounted straight from the index (a warm
  mount costs two mount(2) calls, whatever its size), once the mount
  credential policy is met: a model that needed credentials at its origin is
  mounted only for a pod whose volume secret (``nodePublishSecretRef``, passed
  by kubelet as ``secrets``) can read it there (see daemon.access);
- otherwise one pull job fetches it, however many pods ask at once; if the
  call's deadline comes first, the answer is DEADLINE_EXCEEDED and kubelet's
  retry finds the same job further along.

This module is the gRPC edge: it validates requests, calls the daemon through
the small :class:`Backend` protocol, and is the one place where our errors
become the status codes kubelet understands (CSI spec, "Error Scheme"):
INVALID_ARGUMENT for a bad request or reference, NOT_FOUND for a model its
source does not have, ALREADY_EXISTS for a target that holds another mount,
PERMISSION_DENIED for refused credentials or a forbidden host path,
UNAUTHENTICATED, RESOURCE_EXHAUSTED when too many pulls are queued, UNAVAILABLE when the source is
down (or the daemon is draining), DEADLINE_EXCEEDED while the pull runs on,
ABORTED while an earlier operation on the same volume is still running,
INTERNAL otherwise. A publish that fails leaves no lease behind for a volume
that was never published.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import grpc
from google.protobuf import wrappers_pb2

from .. import __version__
from ..errors import (
    Busy,
    Conflict,
    Forbidden,
    InvalidContent,
    InvalidReference,
    ModelCacheError,
    NoSpace,
    NotFound,
    Unauthenticated,
    Unauthorized,
    Unavailable,
)
from ..sources import SourceCredentials
from ..tree import Filters
from . import DRIVER_NAME
from . import csi_pb2 as pb
from . import csi_pb2_grpc as rpc

log = logging.getLogger(__name__)

_DEADLINE_MARGIN = 0.5  # seconds kept back to answer before kubelet's deadline
_NO_DEADLINE_WAIT = 60.0  # a caller without a deadline still gets an answer, and retries


class Backend(Protocol):
    """What the node service needs from the daemon (implemented by daemon.server.Daemon)."""

    async def view_for(self, ref: str, filters: Filters, *, credentials: SourceCredentials | None = None,
                       lease: str | None = None) -> Path:
        """The model's read-only tree, pulled first if needed, already held by ``lease`` (a volume id)
        when returned; cancelling the wait leaves the pull running.

        ``credentials`` are the pod's (its volume's secret): used for a pull, checked for a cached model.
        """
        ...

    async def publish(self, volume_id: str, view: Path, target: Path, holder: dict[str, str]) -> None:
        """Bind-mount ``view`` read-only at ``target`` under a lease (idempotent)."""
        ...

    async def abandon(self, volume_id: str) -> None:
        """Give back the lease :meth:`view_for` took for a volume whose publish failed, unless that volume
        was published before (kubelet asking again for a running pod's volume)."""
        ...

    async def unpublish(self, volume_id: str, target: Path) -> None:
        """Unmount ``target`` and drop its lease (idempotent)."""
        ...

    def record_publish(self, code: str, seconds: float) -> None:
        """Account one NodePublishVolume call."""
        ...


def grpc_code(error: BaseException) -> grpc.StatusCode:
    """The gRPC status for an error raised below this edge."""
    if isinstance(error, InvalidReference):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, NotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, Conflict):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(error, Unauthorized | Forbidden):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(error, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(error, Busy | NoSpace):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, Unavailable):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(error, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
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


class _Pending(Exception):
    """Another operation on the same volume is still running (CSI: ABORTED, the caller retries)."""


class NodeService(rpc.NodeServicer):
    """Publishes cached models into pods, one operation per volume at a time."""

    def __init__(self, backend: Backend, node_id: str) -> None:
        self._backend = backend
        self._node_id = node_id
        # Volume ids with a Publish or Unpublish running. Kubelet runs one operation per volume, but one it
        # gave up on (its deadline) may still be cleaning up here when its retry comes: the retry is told
        # ABORTED (CSI spec: an operation is pending for the volume) rather than run beside it, where the
        # first one's cleanup could give back the lease the second had just taken.
        self._pending: set[str] = set()

    @contextlib.contextmanager
    def _alone(self, volume_id: str) -> Iterator[None]:
        if volume_id in self._pending:
            raise _Pending(f"an operation on volume {volume_id} is still running; retry")
        if volume_id:  # an empty id is refused by the operation itself, as invalid
            self._pending.add(volume_id)
        try:
            yield
        finally:
            self._pending.discard(volume_id)

    async def NodeGetInfo(self, request, context):  # noqa: N802
        return pb.NodeGetInfoResponse(node_id=self._node_id)

    async def NodeGetCapabilities(self, request, context):  # noqa: N802
        stats = pb.NodeServiceCapability(
            rpc=pb.NodeServiceCapability.RPC(type=pb.NodeServiceCapability.RPC.GET_VOLUME_STATS))
        return pb.NodeGetCapabilitiesResponse(capabilities=[stats])

    async def NodePublishVolume(self, request, context):  # noqa: N802
        started = time.monotonic()
        code = grpc.StatusCode.OK
        try:
            with self._alone(request.volume_id):
                await self._publish(request, context)
            return pb.NodePublishVolumeResponse()
        except _Pending as e:
            code = grpc.StatusCode.ABORTED
            await context.abort(code, str(e))
        except (ModelCacheError, TimeoutError, OSError) as e:
            code = grpc_code(e)
            message = f"mount failed: {e}" if code is grpc.StatusCode.INTERNAL else str(e)
            await context.abort(code, message)
        except Exception as e:  # a bug: say so to kubelet (it retries) and in our log
            log.exception("NodePublishVolume %s failed unexpectedly", request.volume_id)
            code = grpc.StatusCode.INTERNAL
            await context.abort(code, f"internal error: {type(e).__name__}: {e}")
        finally:
            self._backend.record_publish(code.name, time.monotonic() - started)

    async def _publish(self, request, context) -> None:
        volume_id, target = request.volume_id, request.target_path
        # CSI spec, NodePublishVolume: volume_id, target_path and volume_capability are REQUIRED.
        if not volume_id or not target:
            raise InvalidReference("volume_id and target_path are required")
        if not request.HasField("volume_capability"):
            raise InvalidReference("volume_capability is required")
        if request.volume_capability.HasField("block"):
            raise InvalidReference("block access is not supported: models are published as filesystems")
        attrs = dict(request.volume_context)
        ref = attrs.get("model", "").strip()
        if not ref:
            raise InvalidReference("volume attribute 'model' is required (a model reference such as oci://…)")
        filters = Filters.of(_globs(attrs.get("include")), _globs(attrs.get("exclude")))
        credentials = SourceCredentials.from_secrets(dict(request.secrets))  # never logged: repr redacts
        remaining = context.time_remaining()
        wait = _NO_DEADLINE_WAIT if remaining is None else remaining - _DEADLINE_MARGIN
        try:
            try:
                async with asyncio.timeout(max(0.0, wait)):
                    view = await self._backend.view_for(ref, filters, credentials=credentials, lease=volume_id)
            except TimeoutError:
                raise TimeoutError(f"{ref} is still being pulled; the pull goes on and a retry will find it "
                                   "(GET /v1/models shows its progress)") from None
            # The pod's identity (podInfoOnMount) is kept with the lease, for people reading the index.
            holder = {k: v for k, v in attrs.items() if k.startswith("csi.storage.k8s.io/")}
            holder["model"] = ref
            # Always read-only, whatever the access mode asks: the tree is the store's own files.
            await self._backend.publish(volume_id, view, Path(target), holder)
        except BaseException:
            # Nothing mounted, so nothing will unpublish it: a lease left now would root the view until a
            # restart. Kubelet's retry takes it again. A failure here must not hide the one being answered.
            try:
                await self._backend.abandon(volume_id)
            except Exception:
                log.warning("volume %s: the lease of its failed publish was not given back", volume_id,
                            exc_info=True)
            raise

    async def NodeUnpublishVolume(self, request, context):  # noqa: N802
        if not request.volume_id or not request.target_path:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "volume_id and target_path are required")
        try:
            with self._alone(request.volume_id):
                await self._backend.unpublish(request.volume_id, Path(request.target_path))
        except _Pending as e:
            await context.abort(grpc.StatusCode.ABORTED, str(e))
        except OSError as e:
            await context.abort(grpc.StatusCode.INTERNAL, f"unmount failed: {e}")
        return pb.NodeUnpublishVolumeResponse()

    async def NodeGetVolumeStats(self, request, context):  # noqa: N802
        path = request.volume_path
        if not request.volume_id or not path:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "volume_id and volume_path are required")
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
