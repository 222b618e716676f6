"""Wiring the node daemon: one store, one engine, HTTP and CSI, one shutdown path.

``run(config)`` opens the store, recovers leases from before a restart,
serves the HTTP API on TCP and the CSI services on a unix socket, and on
SIGTERM/SIGINT drains: it stops taking requests, cancels running pulls (their
durable chunks stay in ingest/ and resume on the next request), and closes
the store.
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
from ..sources import SourceOptions
from ..store import Store
from ..transfer import Engine, TransferConfig
from ..tree import Filters
from .api import build_app
from .metrics import Metrics
from .mounts import Mounts
from .pulls import PullManager

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DaemonConfig:
    """What ``modelcache serve`` is told."""

    store: Path
    listen: str = "127.0.0.1:8470"
    csi_socket: Path = Path("/csi/csi.sock")
    node_name: str = field(default_factory=lambda: os.uname().nodename)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    sources: SourceOptions = field(default_factory=SourceOptions)


class Daemon:
    """The running parts, as the API and the CSI servicer see them."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.store = Store(config.store)
        self.engine = Engine(self.store.content, config.transfer)
        self.metrics = Metrics()
        self.pulls = PullManager(self.store, self.engine, config.sources, self.metrics)
        self.mounts = Mounts(self.store)
        self.ready = asyncio.Event()
        self.metrics.add_gauges(self.store.disk_usage, str(self.store.root), self.mounts.active)

    def cached_view(self, ref: str, filters: Filters) -> Path | None:
        """The view a reference was last pulled into, if it is still there (blocks)."""
        found = self.store.index.lookup(ref, filters.key())
        if found is None:
            return None
        path = self.store.views_dir / found[0].partition(":")[2]
        if not path.is_dir():
            return None
        self.store.index.touch(found[0])
        return path

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
    daemon = Daemon(config)
    kept, dropped = await asyncio.to_thread(daemon.mounts.recover)
    log.warning("store %s: kept %d mounted leases, dropped %d stale ones", config.store, kept, dropped)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    config.csi_socket.parent.mkdir(parents=True, exist_ok=True)
    config.csi_socket.unlink(missing_ok=True)  # a socket left by a killed daemon
    server = grpc.aio.server()
    rpc.add_IdentityServicer_to_server(IdentityService(daemon.ready), server)
    rpc.add_NodeServicer_to_server(NodeService(daemon, config.node_name), server)
    server.add_insecure_port(f"unix://{config.csi_socket}")
    await server.start()

    host, _, port = config.listen.rpartition(":")
    runner = web.AppRunner(build_app(daemon), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host.strip("[]") or "0.0.0.0", int(port)).start()
    daemon.ready.set()
    log.warning("serving HTTP on %s and CSI on %s as node %s", config.listen, config.csi_socket, config.node_name)
    try:
        await stop.wait()
    finally:
        daemon.ready.clear()
        log.warning("draining: no new work; running pulls keep their chunks for resume")
        await server.stop(grace=5)
        await daemon.pulls.drain()
        await runner.cleanup()
        daemon.engine.close()
        daemon.store.close()
