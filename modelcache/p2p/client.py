"""Asking peers for bytes: every request signed, a dead peer costs a short connect timeout.

A :class:`PeerSource` is a :class:`~modelcache.sources.base.ByteSource`
the engine tries before the origin: untrusted (its bytes are checked), one
attempt (a miss or failure hands over to the next source at once). Modes:

- ``home``: we ask the piece's home, which fetches it if it must (single
  flight) or sends us to another holder (HTTP 307 with ``X-Modelcache-Holder``);
  we then try that holder, and the home itself again if the holder lacks it;
- ``have``: serve it only if held now, else 404 at once.

Timeouts: connect ``connect_timeout`` (well under a second: a dead address
costs no more), then ``read_timeout`` between bytes (a stalled peer is
abandoned there and the engine resumes the piece elsewhere at the byte reached).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Callable

import aiohttp

from ..errors import NotFound, Unavailable
from ..model import Blob
from ..transfer.routing import NotYet
from . import signing, trace

log = logging.getLogger(__name__)

NODE_HEADER = "X-Modelcache-Node"
URL_HEADER = "X-Modelcache-Peer-Url"
HOLDER_HEADER = "X-Modelcache-Holder"
MODE_HEADER = "X-Modelcache-Mode"  # with a 307: ask the holder in this mode; with a 404 from a home: "origin"
BLOCK = 256 << 10
_HEX = re.compile(r"^[0-9a-f]{64}$")


class PeerClient:
    """One HTTP session for every peer, signing with the shared secret."""

    def __init__(self, secret: bytes, node_id: str, *, connect_timeout: float = 0.5, read_timeout: float = 5.0,
                 me: Callable[[], str | None] = lambda: None,
                 found_self: Callable[[str], None] = lambda url: None) -> None:
        self.secret, self.node_id = secret, node_id
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self._me, self._found_self = me, found_self
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        """The shared session (made on first use, in the running loop)."""
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=self.connect_timeout,
                                            sock_read=self.read_timeout)
            self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False, trust_env=False,
                                                  connector=aiohttp.TCPConnector(limit=64))
        return self._session

    async def close(self) -> None:
        """Close the session."""
        if self._session is not None:
            await self._session.close()

    def headers(self, method: str, path: str, range_: str = "") -> dict[str, str]:
        """Signed headers for a request."""
        headers = {signing.HEADER: signing.sign(self.secret, method, path, range_), NODE_HEADER: self.node_id}
        if range_:
            headers["Range"] = range_
        me = self._me()
        if me:
            headers[URL_HEADER] = me
        return headers

    def source(self, url: str, mode: str) -> PeerSource:
        """``url`` as a byte source asked in ``mode`` (home or have)."""
        return PeerSource(self, url, mode)

    async def digests(self, url: str, digest: str) -> list[str] | None:
        """The piece digest list ``url`` serves for ``digest``, or None (no list, or no answer)."""
        path = f"/v1/peer/pieces/{digest}"
        try:
            async with self.session().get(url + path, headers=self.headers("GET", path)) as r:
                if r.status != 200:
                    return None
                doc = json.loads(await r.read())
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            log.debug("peer %s: no piece list for %s: %s", url, digest[:19], e)
            return None
        if not isinstance(doc, list) or not all(isinstance(d, str) and _HEX.match(d) for d in doc):
            return None
        return doc

    async def hello(self, url: str) -> str | None:
        """The node id ``url`` answers with (learning whether it is us), or None."""
        path = "/v1/peer/hello"
        try:
            async with self.session().get(url + path, headers=self.headers("GET", path)) as r:
                node = r.headers.get(NODE_HEADER)
        except (aiohttp.ClientError, TimeoutError):
            return None
        if node == self.node_id:
            self._found_self(url)
        return node


class PeerSource:
    """One peer as a byte source (see the module docstring)."""

    trusted = False
    attempts = 1

    def __init__(self, client: PeerClient, url: str, mode: str) -> None:
        self.client, self.url, self.mode = client, url, mode
        self.name = "peer://" + url.partition("://")[2]

    async def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes]:
        """Yield the range from this peer (or the holder it sends us to)."""
        targets = [(self.url, self.mode)]
        range_ = f"bytes={offset}-{offset + length - 1}"
        while targets:
            url, mode = targets.pop(0)
            path = f"/v1/peer/blobs/{blob.digest}?mode={mode}"
            try:
                async with self.client.session().get(url + path, headers=self.client.headers("GET", path, range_),
                                                     allow_redirects=False) as r:
                    if r.headers.get(NODE_HEADER) == self.client.node_id:
                        self.client._found_self(url)
                        raise NotFound(f"{url} is this daemon")
                    holder = r.headers.get(HOLDER_HEADER)
                    if r.status == 307 and holder and mode == "home":
                        if r.headers.get(MODE_HEADER) == "home":  # the requester elected to fetch it: wait on it
                            targets = [(holder, "home")]
                        else:
                            targets = [(holder, "have"), (url, "held")]  # another holder, else the home itself
                        continue
                    if r.status == 404:
                        if targets:
                            continue
                        if mode == "home" and r.headers.get(MODE_HEADER) != "origin":
                            # the home is not fetching it yet: other pieces first, then on
                            raise NotYet(f"{self.name} does not hold {range_} of {blob.digest[:19]} yet")
                        raise NotFound(f"{self.name} does not hold {range_} of {blob.digest[:19]}")
                    if r.status != 206:
                        raise Unavailable(f"{self.name}: HTTP {r.status} for {blob.digest[:19]}")
                    trace.event("get-start", blob.digest, offset, length, url)
                    got = 0
                    try:
                        async for block in r.content.iter_chunked(BLOCK):
                            got += len(block)
                            yield block
                    finally:
                        trace.event("get-end", blob.digest, offset, got, url)
                    return
            except (aiohttp.ClientError, TimeoutError) as e:
                raise Unavailable(f"{self.name}: {type(e).__name__}: {e}".rstrip(": ")) from e
