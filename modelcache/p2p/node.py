"""One node's peer layer, wired: discovery, membership, the client, the router factory, the server.

:func:`from_flags` turns the flags into a :class:`PeerConfig` (peer
sharing is off unless a secret file is given: no secret means off, not
open). :class:`PeerNode` is what the daemon (and a CLI pull with
``--peers``) holds: :meth:`router` wraps a pull's origin in a
:class:`~.router.PeerRouter`; :meth:`run` keeps the membership current;
:meth:`server` makes the ``/v1/peer/`` handlers.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidReference
from ..sources.base import ByteSource
from ..store import Store
from ..transfer import Engine
from .client import PeerClient
from .discovery import Discovery, DnsPeers, StaticPeers, normalize, parse_dns
from .limit import RateLimit
from .members import Members
from .pieces import piece_minimum
from .router import PeerRouter
from .server import PeerServer

log = logging.getLogger(__name__)

HELLO_INTERVAL = 2.0  # seconds between looks at the discovered set for new members to greet


@dataclass(frozen=True)
class PeerConfig:
    """How this node finds and trusts peers (all from flags / MODELCACHE_* variables)."""

    secret: bytes
    peers: tuple[str, ...] = ()
    peers_dns: str | None = None
    listen: str | None = None  # our own HOST:PORT, to know ourselves in a list and default the DNS port
    upload_limit: int = 0  # bytes per second served to peers, 0 = unlimited
    connect_timeout: float = 0.5
    read_timeout: float = 5.0
    piece_min: int = field(default_factory=piece_minimum)


def from_flags(*, secret_file: str | None, peers: str | None, peers_dns: str | None, listen: str | None,
               upload_limit: int = 0, read_timeout: float = 5.0) -> PeerConfig | None:
    """The peer config, or None when peer sharing is off (no secret file)."""
    if not secret_file:
        if peers or peers_dns:
            log.warning("--peers/--peers-dns given without --peer-secret-file: peer sharing stays off")
        return None
    path = Path(secret_file).expanduser()
    try:
        secret = path.read_bytes().strip()
    except OSError as e:
        raise InvalidReference(f"--peer-secret-file {path}: {e.strerror or e}") from None
    if len(secret) < 16:
        raise InvalidReference(f"--peer-secret-file {path}: the secret must be at least 16 bytes")
    urls = tuple(u.strip() for u in (peers or "").split(",") if u.strip())
    return PeerConfig(secret=secret, peers=urls, peers_dns=peers_dns or None, listen=listen,
                      upload_limit=upload_limit, read_timeout=read_timeout)


class PeerNode:
    """This node's peer layer."""

    def __init__(self, config: PeerConfig, *, discovery: Discovery | None = None,
                 on_report: Callable[[str, str], None] = lambda url, outcome: None) -> None:
        self.config = config
        self.node_id = secrets.token_hex(8)
        self.discovery = discovery or _discovery(config)
        me = normalize(config.listen) if config.listen and not config.listen.startswith(("0.0.0.0", "[::]")) \
            else None
        self.members = Members(self.discovery, self.node_id, me=me)
        self.client = PeerClient(config.secret, self.node_id, connect_timeout=config.connect_timeout,
                                 read_timeout=config.read_timeout, me=lambda: self.members.me,
                                 found_self=self.members.found_self)
        self.limit = RateLimit(config.upload_limit)
        self._on_report = on_report
        self._greeted: set[str] = set()

    def router(self, origin: ByteSource) -> PeerRouter:
        """The router for one pull from ``origin``."""
        return PeerRouter(origin, self.members, self.client, minimum=self.config.piece_min,
                          on_report=self._on_report)

    def server(self, store: Store, engine: Engine, on_served: Callable[[int], None]) -> PeerServer:
        """The ``/v1/peer/`` handlers over this daemon's store and engine."""
        return PeerServer(store, engine, self.config.secret, self.node_id, minimum=self.config.piece_min,
                          limit=self.limit, home_wait=max(0.5, self.config.read_timeout * 0.8), on_served=on_served)

    async def greet(self) -> None:
        """Say hello to members not greeted yet (learning which one is us)."""
        new = [u for u in self.discovery.urls() if u not in self._greeted and not self.members.is_self(u)]
        if not new:
            return
        answers = await asyncio.gather(*(self.client.hello(u) for u in new))
        self._greeted.update(u for u, node in zip(new, answers, strict=True) if node is not None)

    async def run(self) -> None:
        """Keep discovery and membership current until cancelled."""
        watcher = asyncio.create_task(self.discovery.run())
        try:
            while True:
                try:
                    await self.greet()
                except Exception:  # a bug here must not take the daemon (and its mounts) down
                    log.exception("peers: greeting new members failed")
                await asyncio.sleep(HELLO_INTERVAL)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    async def close(self) -> None:
        """Close the HTTP session."""
        await self.client.close()


def _discovery(config: PeerConfig) -> Discovery:
    if config.peers_dns:
        port = int(config.listen.rpartition(":")[2]) if config.listen and config.listen[-1].isdigit() else 8470
        name, port = parse_dns(config.peers_dns, port)
        return DnsPeers(name, port)
    return StaticPeers(config.peers)
