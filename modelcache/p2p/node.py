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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidReference
from ..model import Blob
from ..sources.base import ByteSource
from ..store import Store
from ..transfer import Engine
from .client import PeerClient
from .discovery import Discovery, DnsPeers, StaticPeers, normalize, parse_dns
from .gate import LOOKAHEAD, Gate, GatedOrigin, share
from .holders import Holders
from .limit import RateLimit
from .members import Members
from .pieces import piece_minimum, piece_size
from .relay import Relay, RelayedOrigin
from .router import PeerRouter
from .server import PeerServer
from .slices import K8sPeers, parse_service
from .trace import ON as TRACING
from .trace import TracedOrigin

log = logging.getLogger(__name__)

PLACEHOLDER = b"replace-me"  # the value daemonset/examples/peer-secret.yaml ships, known to everyone
HELLO_INTERVAL = 2.0  # seconds between looks at the discovered set for new members to greet


@dataclass(frozen=True)
class PeerConfig:
    """How this node finds and trusts peers (all from flags / MODELCACHE_* variables)."""

    secret: bytes
    peers: tuple[str, ...] = ()
    peers_dns: str | None = None
    peers_k8s_service: str | None = None  # NAMESPACE/NAME[:PORT]: the Service whose EndpointSlices list the peers
    kubeconfig: Path | None = None  # for peers_k8s_service; None: in-cluster, else the default kubeconfig
    node_name: str | None = None  # this daemon's node: its own endpoint in the slices
    listen: str | None = None  # our own HOST:PORT, to know ourselves in a list and default the DNS port
    upload_limit: int = 0  # bytes per second served to peers, 0 = unlimited
    connect_timeout: float = 0.5
    read_timeout: float = 5.0
    piece_min: int = field(default_factory=piece_minimum)


def from_flags(*, secret_file: str | None, peers: str | None, peers_dns: str | None, listen: str | None,
               upload_limit: int = 0, read_timeout: float = 5.0, peers_k8s_service: str | None = None,
               kubeconfig: Path | None = None, node_name: str | None = None) -> PeerConfig | None:
    """The peer config, or None when peer sharing is off (no secret file)."""
    if not secret_file:
        if peers or peers_dns or peers_k8s_service:
            log.warning("--peers/--peers-dns/--peers-k8s-service given without --peer-secret-file: "
                        "peer sharing stays off")
        return None
    if sum(bool(x) for x in (peers, peers_dns, peers_k8s_service)) > 1:
        raise InvalidReference("--peers, --peers-dns and --peers-k8s-service: give one way to find peers")
    if peers_k8s_service:
        parse_service(peers_k8s_service)  # a bad value fails before anything starts
    path = Path(secret_file).expanduser()
    try:
        secret = path.read_bytes().strip()
    except OSError as e:
        raise InvalidReference(f"--peer-secret-file {path}: {e.strerror or e}") from None
    if len(secret) < 16:
        raise InvalidReference(f"--peer-secret-file {path}: the secret must be at least 16 bytes")
    if secret.startswith(PLACEHOLDER):  # daemonset/examples/peer-secret.yaml applied as it is: a public secret
        raise InvalidReference(f"--peer-secret-file {path}: still the example's placeholder; make a random one "
                               "(openssl rand -hex 32)")
    urls = tuple(u.strip() for u in (peers or "").split(",") if u.strip())
    return PeerConfig(secret=secret, peers=urls, peers_dns=peers_dns or None, listen=listen,
                      upload_limit=upload_limit, read_timeout=read_timeout,
                      peers_k8s_service=peers_k8s_service or None, kubeconfig=kubeconfig, node_name=node_name)


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
        if isinstance(self.discovery, K8sPeers):  # the slices name our own endpoint by node: no hello needed
            self.discovery.on_self = self.members.found_self
        # The cluster opens about as many origin streams for home pieces as one node would (see .gate).
        self.gate = Gate(lambda: share(len(self.members.peers()) + 1))
        self.lookahead = Gate(lambda: LOOKAHEAD * self.gate.limit())
        self.client = PeerClient(config.secret, self.node_id, connect_timeout=config.connect_timeout,
                                 read_timeout=config.read_timeout, me=lambda: self.members.me,
                                 found_self=self.members.found_self, spare=self.spare, took=self.took,
                                 fetching=self.gate.busy)
        self.limit = RateLimit(config.upload_limit)
        self.holders = Holders()  # the peer server's, read by our routers (the requester a home elected)
        self.relay = Relay()  # home pieces streamed to peers as they arrive from the origin
        self._on_report = on_report
        self._greeted: set[str] = set()

    def router(self, origin: ByteSource) -> PeerRouter:
        """The router for one pull from ``origin``."""
        if TRACING:
            origin = TracedOrigin(origin)
        router = PeerRouter(origin, self.members, self.client, minimum=self.config.piece_min,
                            on_report=self._on_report, gate=self.gate, lookahead=self.lookahead,
                            elected=lambda digest, offset: self.holders.elected((digest, offset), time.monotonic()))
        # Inside the gate the relay: a piece is live for peers only once its origin read has begun.
        router.origin = GatedOrigin(RelayedOrigin(router.origin, self.relay, router.relays), router.gated)
        return router

    def server(self, store: Store, engine: Engine, on_served: Callable[[int], None]) -> PeerServer:
        """The ``/v1/peer/`` handlers over this daemon's store and engine."""
        # The home's wait leaves half the requester's read timeout for the answer to arrive: on a loaded
        # machine the event loop lags, and an answer past the timeout fails the home (and benches it).
        return PeerServer(store, engine, self.config.secret, self.node_id, minimum=self.config.piece_min,
                          limit=self.limit, home_wait=home_wait(self.config.read_timeout), on_served=on_served,
                          holders=self.holders, relay=self.relay, hurry=self.hurry, give=self.give)

    def hurry(self, digest: str, offset: int) -> None:
        """A peer waits on the piece of ``digest`` holding ``offset``: if we fetch it ahead, it goes in now."""
        tag = self.gate.tag(digest, offset)
        if tag is not None:
            self.lookahead.hurry(tag)
            self.gate.hurry(tag)

    def spare(self) -> bool:
        """Whether every home piece of ours has started, an origin stream is free and we were home for no more
        than our part of the pieces (a home may give us one: .gate)."""
        return not self.lookahead.waiting() and self.gate.spare(time.monotonic()) \
            and self.gate.light(len(self.members.peers()) + 1)

    def took(self, blob: Blob, offset: int) -> None:
        """A home gave us the piece of ``blob`` at ``offset`` to fetch from the origin."""
        self.gate.borrow((blob.digest, offset // piece_size(blob.size, self.config.piece_min)), time.monotonic())

    def give(self, digest: str, offset: int) -> bool:
        """A peer with a stream to spare asks for the piece of ``digest`` at ``offset``: give it up if our fetch
        of it still waits for its turn (it is then had from that peer); whether we did."""
        tag = self.gate.tag(digest, offset)
        return tag is not None and (self.lookahead.give(tag) or self.gate.give(tag))

    async def greet(self) -> None:
        """Say hello to members not greeted yet (learning which one is us)."""
        new = [u for u in self.discovery.urls() if u not in self._greeted and not self.members.is_self(u)]
        if not new:
            return
        answers = await asyncio.gather(*(self.client.hello(u) for u in new))
        self._greeted.update(u for u, node in zip(new, answers, strict=True) if node is not None)

    async def discovered(self, seconds: float) -> None:
        """Wait (at most ``seconds``) until discovery has an answer: for a one-shot CLI pull."""
        if isinstance(self.discovery, StaticPeers):
            return  # nothing to look up
        deadline = asyncio.get_running_loop().time() + seconds
        # The informer's first list lands in a thread and sets a threading.Event: polled, bounded.
        while not self.discovery.urls() and not getattr(self.discovery, "synced", False):  # noqa: ASYNC110
            if asyncio.get_running_loop().time() >= deadline:
                log.warning("peers: none discovered in %.0fs; pulling from the origin", seconds)
                return
            await asyncio.sleep(0.05)

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


def home_wait(read_timeout: float) -> float:
    """How long a home waits for a piece before answering ``wait``: half the requester's read timeout."""
    return read_timeout * 0.5


def _discovery(config: PeerConfig) -> Discovery:
    port = int(config.listen.rpartition(":")[2]) if config.listen and config.listen[-1].isdigit() else 8470
    if config.peers_k8s_service:
        namespace, name, port_name = parse_service(config.peers_k8s_service)
        return K8sPeers(namespace, name, port, port=port_name, node_name=config.node_name,
                        kubeconfig=config.kubeconfig)
    if config.peers_dns:
        name, port = parse_dns(config.peers_dns, port)
        return DnsPeers(name, port)
    return StaticPeers(config.peers)
