"""Wiring the node daemon: one store, one engine, HTTP and CSI, one shutdown path.

``run(config)`` opens the store, recovers leases from before a restart,
serves the HTTP API on TCP and the CSI services on a unix socket (claimed
with :mod:`.csisocket`: only a stale socket is ever removed), and runs
every pull job in one task group. On SIGTERM/SIGINT it drains:

1. readiness goes false and no new pull is accepted;
2. the CSI server refuses new calls, running pulls are cancelled (their
   durable chunks stay in ``ingest/`` and resume on the next request; a
   kubelet call waiting on one is answered UNAVAILABLE, so kubelet retries
   against the next daemon), and calls in flight get a short grace;
3. the HTTP server closes, then the engine and the store.

The background scrub (:class:`~modelcache.store.scrub.Scrubber`, at most
``--scrub-rate`` bytes/s) runs in the same task group and is cancelled at
the start of the drain.

Nothing else in the daemon package knows about more than its own job; this
module is the one place that knows all of them.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from aiohttp import web

from ..csi import csi_pb2_grpc as rpc
from ..csi.servicer import IdentityService, NodeService
from ..errors import InvalidReference
from ..p2p.node import PeerConfig, PeerNode
from ..sources import SourceCredentials, SourceOptions
from ..store import Store
from ..store.budget import Budget, enforce
from ..store.scrub import Scrubber
from ..transfer import Engine, TransferConfig
from ..tree import Filters
from . import csisocket
from .access import DEFAULT_TTL, AccessGate
from .api import build_app
from .auth import AuthConfig
from .auth import build as build_auth
from .metrics import Metrics
from .mounts import Mounts
from .policy import RefPolicy
from .prewarm import PrewarmConfig, PrewarmController, load_client
from .pulls import PullManager
from .settled import settled

log = logging.getLogger(__name__)

CSI_GRACE = 5.0  # seconds calls in flight (a mount syscall, say) get to finish at shutdown
HTTP_GRACE = 2.0


@dataclass(frozen=True)
class DaemonConfig:
    """What ``modelcache serve`` is told."""

    store: Path
    listen: str = "127.0.0.1:8470"
    csi_socket: Path = Path("/csi/csi.sock")
    node_name: str = field(default_factory=lambda: os.uname().nodename)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    sources: SourceOptions = field(default_factory=SourceOptions)
    auth: AuthConfig = field(default_factory=AuthConfig)
    mount_credential_check: str = "private"  # always | private | never (daemon.access)
    mount_credential_ttl: float = DEFAULT_TTL
    allow_local: tuple[Path, ...] = ()  # host directories pulls and volumes may name; none by default
    max_pulls: int = 16  # pull jobs queued or running at once; past it, 429 / RESOURCE_EXHAUSTED
    budget: Budget = field(default_factory=Budget)
    scrub_rate: int = 50 << 20  # bytes/s the background scrub reads at most; 0: no scrub
    scrub_interval: float = 86400.0  # seconds between two scrub passes
    prewarm: PrewarmConfig | None = None  # the ModelPrewarm controller; None: off
    peers: PeerConfig | None = None  # peer sharing (issue 11); None: off


class Daemon:
    """The running parts, as the HTTP API and the CSI servicer see them."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.auth = build_auth(config.auth, config.store)  # first: a bad token file or kubeconfig opens nothing
        self._kube = load_client(config.prewarm.kubeconfig) if config.prewarm is not None else None
        self.store = Store(config.store)
        self.engine = Engine(self.store.content, config.transfer)
        self.metrics = Metrics()
        self.pulls = PullManager(self.store, self.engine, config.sources, self.metrics,
                                 policy=RefPolicy(config.allow_local), max_jobs=config.max_pulls)
        self.pulls.gate = AccessGate(self.store, config.sources, policy=config.mount_credential_check,
                                     ttl=config.mount_credential_ttl)
        self.pulls.budget = config.budget
        self.mounts = Mounts(self.store)
        self.prewarm: PrewarmController | None = None
        if config.prewarm is not None:
            self.prewarm = PrewarmController(config.prewarm, config.node_name, self.pulls, self._kube)
        self.ready = asyncio.Event()
        self.csi_socket: tuple[int, int] | None = None  # (device, inode) of the socket we bound
        self.metrics.add_gauges(self.store.disk_usage, str(self.store.root), self.mounts.active)
        self.scrubber = Scrubber(self.store, config.scrub_rate, config.scrub_interval,
                                 on_verdict=self.metrics.record_scrub, on_corrupt=self.metrics.record_corrupt)
        self.peer: PeerNode | None = None
        self.peer_server = None
        if config.peers is not None:
            self.peer = PeerNode(config.peers, on_report=self.metrics.peer_outcome)
            self.peer_server = self.peer.server(self.store, self.engine, self.metrics.peer_served.inc)
            self.pulls.routing = self.peer.router

    def csi_alive(self) -> bool:
        """True while the CSI socket at the configured path is ours and answers (blocks up to a second)."""
        return self.csi_socket is not None and csisocket.alive(self.config.csi_socket, self.csi_socket)

    def close(self) -> None:
        """Stop the engine's threads and close the store."""
        self.engine.close()
        self.store.close()
        self.auth.close()
        if self._kube is not None:
            self._kube.close()

    # -- what the CSI node service needs (csi.servicer.Backend) -----------------

    async def view_for(self, ref: str, filters: Filters, *, credentials: SourceCredentials | None = None,
                       lease: str | None = None) -> Path:
        """The model's read-only tree, pulled first if the store lacks it, if these credentials may have it,
        leased by ``lease``."""
        return await self.pulls.view_for(ref, filters, credentials=credentials, lease=lease)

    async def publish(self, volume_id: str, view: Path, target: Path, holder: dict[str, str]) -> None:
        """Bind-mount ``view`` read-only at ``target`` under a lease (idempotent); cancelled, only once the
        mount's thread has ended (so a failed publish's cleanup comes after its lease, never before)."""
        await settled(self.mounts.publish, volume_id, view, target, holder)

    async def abandon(self, volume_id: str) -> None:
        """Give back the lease a failed publish of ``volume_id`` took, unless the volume was published."""
        await asyncio.to_thread(self.mounts.abandon, volume_id)

    async def unpublish(self, volume_id: str, target: Path) -> None:
        """Unmount ``target`` and drop its lease (idempotent)."""
        await asyncio.to_thread(self.mounts.unpublish, volume_id, target)

    def record_publish(self, code: str, seconds: float) -> None:
        """Account one NodePublishVolume call."""
        self.metrics.record_publish(code, seconds)

    # -- what the HTTP API shows -------------------------------------------------

    def models_json(self) -> dict:
        """Cached models and pull jobs, for GET /v1/models (blocks)."""
        models = [{
            "ref": r.ref, "include_exclude": r.filters, "digest": r.model_digest, "view": r.view,
            "path": str(self.store.views_dir / r.view.partition(":")[2]), "size": r.size, "files": r.files,
            "last_used": datetime.datetime.fromtimestamp(r.last_used, datetime.UTC).isoformat(timespec="seconds"),
            "pinned": r.pinned, "mounts": r.leases,
        } for r in self.store.index.records()]
        return {"models": models, "pulls": [j.as_json() for j in self.pulls.jobs()]}


async def run(config: DaemonConfig, *, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set), then drain."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        # First of all, before the store is touched: a daemon that may not have
        # the socket path (a live socket or a non-socket there) stops here, and
        # leaves both alone; only a stale socket is removed.
        claim = await asyncio.to_thread(csisocket.claim, config.csi_socket)
        try:
            daemon = await asyncio.to_thread(Daemon, config)  # opening the index may wait on another process
            try:
                await _serve(daemon, config, stop)
            finally:
                daemon.close()
        finally:
            claim.release()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def _serve(daemon: Daemon, config: DaemonConfig, stop: asyncio.Event) -> None:
    kept, dropped = await asyncio.to_thread(daemon.mounts.recover)
    log.info("store %s: kept %d leases of mounted volumes, dropped %d stale ones", config.store, kept, dropped)
    evicted = await asyncio.to_thread(enforce, daemon.store, config.budget)  # a budget lowered since last time
    if evicted.views_removed:
        log.info("store %s: evicted %d models to fit the budget", config.store, len(evicted.views_removed))

    # Sockets are bound before the task group opens, so a busy port or socket
    # path fails plainly (an OSError the CLI reports), not inside an ExceptionGroup.
    csi = await _start_csi(daemon, config)
    try:
        http = await _start_http(daemon, config.listen)
        try:
            async with asyncio.TaskGroup() as tasks:
                daemon.pulls.spawn = tasks.create_task
                scrub = tasks.create_task(daemon.scrubber.run()) if config.scrub_rate > 0 else None
                prewarm = tasks.create_task(daemon.prewarm.run()) if daemon.prewarm is not None else None
                daemon.engine.spawn = tasks.create_task  # shared fetches outlive any one caller, not the daemon
                peers = tasks.create_task(daemon.peer.run()) if daemon.peer is not None else None
                daemon.ready.set()
                log.info("serving HTTP on %s and CSI on %s as node %s",
                         config.listen, config.csi_socket, config.node_name)
                await stop.wait()
                daemon.ready.clear()
                daemon.pulls.accepting = False
                log.info("draining: no new work; running pulls keep their chunks for resume")
                if prewarm is not None:  # first: it would start pulls; it gives its Lease up as it stops
                    prewarm.cancel()
                if scrub is not None:
                    scrub.cancel()  # at most one block is still being read, in its thread
                await asyncio.gather(csi.stop(CSI_GRACE), daemon.pulls.drain())
                if peers is not None:
                    peers.cancel()
                    await daemon.peer.close()  # type: ignore[union-attr]
        finally:
            await http.cleanup()
    finally:
        await csi.stop(None)


async def _start_csi(daemon: Daemon, config: DaemonConfig) -> grpc.aio.Server:
    server = grpc.aio.server()
    rpc.add_IdentityServicer_to_server(IdentityService(daemon.ready), server)
    rpc.add_NodeServicer_to_server(NodeService(daemon, config.node_name), server)
    try:
        server.add_insecure_port(f"unix://{config.csi_socket}")
        await server.start()
        daemon.csi_socket = await asyncio.to_thread(csisocket.identity, config.csi_socket)
    except BaseException:
        await server.stop(None)
        raise
    return server


async def _start_http(daemon: Daemon, listen: str) -> web.AppRunner:
    host, _, port = listen.rpartition(":")
    if not port.isdigit():
        raise InvalidReference(f"--listen {listen!r}: expected HOST:PORT")
    runner = web.AppRunner(build_app(daemon, auth=daemon.auth, peer=daemon.peer_server), handle_signals=False, shutdown_timeout=HTTP_GRACE)
    await runner.setup()
    try:
        await web.TCPSite(runner, host.strip("[]") or "0.0.0.0", int(port)).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
