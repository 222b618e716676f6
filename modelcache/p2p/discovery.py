"""Who the peers are: a static list or DNS, kept current without a restart.

A :class:`Discovery` only knows base URLs (``http://host:port``); whether
one of them is this daemon, and whether a peer is healthy, is for
:mod:`.members`. Kubernetes EndpointSlices are the third Discovery, with
the same two methods: :class:`~.slices.K8sPeers` (a list-then-watch loop in
a thread that replaces the URL set on every change).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

log = logging.getLogger(__name__)

DNS_INTERVAL = 10.0  # seconds between resolutions of the headless Service's name

Resolver = Callable[..., Awaitable[list[tuple[Any, ...]]]]  # getaddrinfo's shape


class Discovery(Protocol):
    """The peers' base URLs as last seen."""

    def urls(self) -> frozenset[str]:
        """Every peer URL known now (this daemon's own may be among them)."""
        ...

    async def run(self) -> None:
        """Keep :meth:`urls` current until cancelled (returns at once for a fixed list)."""
        ...


def normalize(url: str) -> str:
    """``host:port`` or ``http://host:port/`` -> ``http://host:port``."""
    url = url.strip().rstrip("/")
    return url if "://" in url else "http://" + url


class StaticPeers:
    """A fixed list (``--peers URL,...``); also the in-memory version tests change with :meth:`set`."""

    def __init__(self, urls: Iterable[str] = ()) -> None:
        self._urls = frozenset(normalize(u) for u in urls if u.strip())

    def urls(self) -> frozenset[str]:
        """The list."""
        return self._urls

    def set(self, urls: Iterable[str]) -> None:
        """Replace the list (membership changes without a restart)."""
        self._urls = frozenset(normalize(u) for u in urls if u.strip())

    async def run(self) -> None:
        """Nothing to watch."""


class DnsPeers:
    """The A/AAAA records of a name (a headless Service), re-resolved every ``interval`` seconds.

    A failed resolution keeps the last answer: a DNS hiccup must not empty the ring.
    """

    def __init__(self, name: str, port: int, *, scheme: str = "http", interval: float = DNS_INTERVAL,
                 resolver: Resolver | None = None) -> None:
        self.name, self.port, self.scheme, self.interval = name, port, scheme, interval
        self._resolver = resolver  # None: the system's (getaddrinfo, in the loop's executor)
        self._urls: frozenset[str] = frozenset()

    def urls(self) -> frozenset[str]:
        """The addresses of the last successful resolution."""
        return self._urls

    async def resolve(self) -> frozenset[str]:
        """Resolve once and remember the answer."""
        resolver = self._resolver or asyncio.get_running_loop().getaddrinfo
        infos = await resolver(self.name, self.port, type=socket.SOCK_STREAM)
        urls = set()
        for family, _, _, _, address in infos:
            host = str(address[0])
            urls.add(f"{self.scheme}://[{host}]:{self.port}" if family == socket.AF_INET6
                     else f"{self.scheme}://{host}:{self.port}")
        self._urls = frozenset(urls)
        return self._urls

    async def run(self) -> None:
        """Resolve now and then every ``interval`` seconds."""
        while True:
            try:
                await self.resolve()
            except OSError as e:
                log.warning("peers: resolving %s failed (%s); keeping %d peers", self.name, e, len(self._urls))
            await asyncio.sleep(self.interval)


def parse_dns(text: str, default_port: int) -> tuple[str, int]:
    """``NAME`` or ``NAME:PORT`` (the port defaults to this daemon's own)."""
    name, _, port = text.rpartition(":")
    if name and port.isdigit():
        return name, int(port)
    return text, default_port
