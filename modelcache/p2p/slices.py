"""Peers from Kubernetes: the EndpointSlices of the daemons' Service, by list and watch (no polling).

:class:`K8sPeers` is the third :class:`~.discovery.Discovery`. It keeps the
slices labelled ``kubernetes.io/service-name=<NAME>`` in ``<NAMESPACE>`` in
a local cache with the shared :class:`~modelcache.kube.informer.Informer`
(list, then watch from the list's resourceVersion with bookmarks; a watch
that ends resumes from the last version; 410 Gone lists again), so a daemon
that joins or leaves is seen within a watch event, without a restart.

Guarantees:

- Only ready endpoints count: ``conditions.ready`` false (not ready, or
  terminating) leaves an address out; absent counts as ready, as the
  EndpointSlice API says consumers should read an unknown state.
- The port is the slice's port named in ``NAMESPACE/NAME:PORT`` (or that
  number), else the slice's only port, else its port named ``http``, else
  this daemon's own listen port.
- An endpoint whose ``nodeName`` is this daemon's node is this daemon: it is
  reported through ``on_self`` (so :class:`~.members.Members` knows its own
  URL at once, before any hello) and never counted as a peer.
- The URL set is rebuilt on the event loop from the cache after every
  change (the informer's thread only schedules that), and swapped whole, so
  :meth:`urls` never sees half an update.
- A failing API keeps the last set (the informer retries with a backoff).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import InvalidReference
from ..kube.informer import Informer

log = logging.getLogger(__name__)

SERVICE_LABEL = "kubernetes.io/service-name"  # set by the EndpointSlice controller on every slice it manages


def parse_service(text: str) -> tuple[str, str, str | None]:
    """``NAMESPACE/NAME[:PORT]`` -> (namespace, name, port name or number or None)."""
    namespace, slash, rest = text.strip().partition("/")
    name, _, port = rest.partition(":")
    if not slash or not namespace or not name or "/" in rest:
        raise InvalidReference(f"--peers-k8s-service {text!r}: expected NAMESPACE/NAME[:PORT]")
    return namespace, name, port or None


def load_api_client(kubeconfig: Path | None) -> Any:
    """An ApiClient: ``kubeconfig``, else the in-cluster config, else the default kubeconfig (blocks)."""
    from kubernetes import client
    from kubernetes import config as kube_config

    configuration = client.Configuration()
    try:
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            kube_config.load_incluster_config(client_configuration=configuration)
        else:
            kube_config.load_kube_config(config_file=str(kubeconfig) if kubeconfig else None,
                                         client_configuration=configuration, persist_config=False)
    except (kube_config.ConfigException, OSError, ValueError) as e:
        where = f"--kubeconfig {kubeconfig}" if kubeconfig else "the in-cluster config or ~/.kube/config"
        raise InvalidReference(f"--peers-k8s-service: cannot load {where}: {e}") from e
    return client.ApiClient(configuration)


def endpoint_urls(slices: Iterable[dict], *, port: str | None, default_port: int, node_name: str | None = None,
                  scheme: str = "http") -> tuple[frozenset[str], frozenset[str]]:
    """(peer URLs, this node's own URLs) from EndpointSlice objects (see the module docstring)."""
    peers: set[str] = set()
    selves: set[str] = set()
    for s in slices:
        number = _slice_port(s.get("ports") or [], port, default_port)
        if number is None:
            continue  # a slice without the named port: not one of our listeners
        ipv6 = s.get("addressType") == "IPv6"
        for endpoint in s.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready") is False:
                continue
            mine = node_name is not None and endpoint.get("nodeName") == node_name
            for address in endpoint.get("addresses") or []:
                url = f"{scheme}://[{address}]:{number}" if ipv6 else f"{scheme}://{address}:{number}"
                (selves if mine else peers).add(url)
    return frozenset(peers - selves), frozenset(selves)


def _slice_port(ports: list[dict], wanted: str | None, default_port: int) -> int | None:
    if wanted is not None and wanted.isdigit():
        return int(wanted)
    if wanted is not None:
        named = [p.get("port") for p in ports if p.get("name") == wanted]
        return int(named[0]) if named and named[0] else None
    if len(ports) == 1 and ports[0].get("port"):
        return int(ports[0]["port"])
    http = [int(p["port"]) for p in ports if p.get("name") == "http" and p.get("port")]
    return http[0] if http else default_port  # no port (or null: "all ports"): our own


class K8sPeers:
    """The ready endpoints of a Service's EndpointSlices, kept by list and watch."""

    def __init__(self, namespace: str, name: str, default_port: int, *, port: str | None = None,
                 node_name: str | None = None, api_client: Any = None, kubeconfig: Path | None = None,
                 watch_timeout: int = 300, on_self: Callable[[str], None] = lambda url: None) -> None:
        from kubernetes import client

        self.namespace, self.name, self.port, self.default_port = namespace, name, port, default_port
        self.node_name = node_name
        self.on_self = on_self
        self._api_client = api_client if api_client is not None else load_api_client(kubeconfig)
        api = client.DiscoveryV1Api(self._api_client)
        self.informer = Informer(f"endpointslices {namespace}/{name}", functools.partial(
            api.list_namespaced_endpoint_slice, namespace, label_selector=f"{SERVICE_LABEL}={name}"),
            self._notify, watch_timeout=watch_timeout)
        self._urls: frozenset[str] = frozenset()
        self._synced = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.changed = asyncio.Event()  # set after every rebuild (tests and waiters clear it)

    def urls(self) -> frozenset[str]:
        """The ready peers' URLs as last seen (never this node's own)."""
        return self._urls

    @property
    def synced(self) -> bool:
        """True once :meth:`urls` reflects a full list (call on the loop)."""
        if not self._synced and self.informer.synced.is_set():
            self.refresh()  # an empty first list reports no key, so no rebuild was scheduled
        return self._synced

    def _notify(self, key: str) -> None:  # the informer's thread: only schedule the rebuild
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.refresh)

    def refresh(self) -> None:
        """Rebuild the URL set from the cache (on the loop)."""
        synced = self.informer.synced.is_set()  # before reading: the cache then holds at least the first list
        peers, selves = endpoint_urls(self.informer.items().values(), port=self.port,
                                      default_port=self.default_port, node_name=self.node_name)
        for url in selves:
            self.on_self(url)
        if peers != self._urls:
            log.info("peers: %d ready in %s/%s", len(peers), self.namespace, self.name)
        self._urls = peers
        self._synced = self._synced or synced
        self.changed.set()

    async def run(self) -> None:
        """Watch until cancelled; the informer's thread is stopped on the way out."""
        self._loop = asyncio.get_running_loop()
        self.informer.start()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.to_thread(self.informer.stop)
            self._api_client.close()
