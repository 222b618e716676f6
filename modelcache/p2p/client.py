"""Asking peers for bytes: every request signed, a dead peer costs a short connect timeout.

A :class:`PeerSource` is a :class:`~modelcache.sources.base.ByteSource`
the engine tries before the origin: untrusted (its bytes are checked), one
attempt (a miss or failure hands over to the next source at once). Modes:

- ``home``: we ask the piece's home, which fetches it if it must (single
  flight) or sends us to another holder (HTTP 307 with ``X-Modelcache-Holder``);
  we then try that holder, and the home itself again if the holder lacks it;
- ``have``: serve it only if held now, else 404 at once.

A node with an origin stream to spare (``spare``, :mod:`.gate`) adds
``spare=1`` to a home ask; a home whose fetch of that piece still queues
gives it away, answering 404 ``origin`` as to an elected requester (and
sends later requesters to us): we fetch it from the origin and relay it.

A home that is fetching the piece (or about to: its pull is resolving or
has the blob queued) and does not hold it after its short wait answers 404
with ``X-Modelcache-Mode: wait``: a peer fetches it, so the origin must not.
The first such answer raises :class:`~modelcache.transfer.routing.NotYet`
(the engine does other pieces first); the piece's sources then hold the same
home again as a *patient* ask, which re-asks while the home keeps answering
``wait`` (up to :data:`PATIENCE` seconds), so a slow home never sends us to
the origin. The asks of one piece share a :class:`Round`: when the home
failed (refused, cut off, an error, or silent past the read timeout twice:
the patient ask retries a home that timed out once, since on a loaded
machine lagging event loops make live peers miss deadlines), the piece's
fallback, the next candidate, is asked as its home instead of whether it
holds it (``fallback`` mode), so every requester a departed home failed
converges on one fetch there instead of each going to the origin.

Timeouts: connect ``connect_timeout`` (well under a second: a dead address
costs no more), then ``read_timeout`` between bytes (a stalled peer is
abandoned there and the engine resumes the piece elsewhere at the byte reached).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp

from ..errors import NotFound, Unavailable
from ..model import Blob
from ..transfer.routing import NotYet
from . import signing, trace

log = logging.getLogger(__name__)

NODE_HEADER = "X-Modelcache-Node"
URL_HEADER = "X-Modelcache-Peer-Url"
HOLDER_HEADER = "X-Modelcache-Holder"
MODE_HEADER = "X-Modelcache-Mode"  # with a 307: ask the holder in this mode; with a 404 from a home: origin | wait
CATCHUP = 6  # peer bodies read at once at most while this node reads its own pieces from the origin
BLOCK = 256 << 10
_SMALL = 64 << 10  # a 404 or 307 body this short is read to the end, keeping the connection
PATIENCE = 30.0  # seconds a patient ask re-asks a home that keeps answering that it fetches the piece
_HEX = re.compile(r"^[0-9a-f]{64}$")


class PeerClient:
    """One HTTP session for every peer, signing with the shared secret."""

    def __init__(self, secret: bytes, node_id: str, *, connect_timeout: float = 0.5, read_timeout: float = 5.0,
                 me: Callable[[], str | None] = lambda: None,
                 found_self: Callable[[str], None] = lambda url: None,
                 spare: Callable[[], bool] = lambda: False,
                 took: Callable[[Blob, int], None] = lambda blob, offset: None,
                 fetching: Callable[[], bool] = lambda: False) -> None:
        self.secret, self.node_id = secret, node_id
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self._me, self._found_self = me, found_self
        self.spare, self.took = spare, took  # an origin stream to spare here; a home gave us a piece (.gate)
        # Peers' bytes share our download link with our own origin reads, the pieces every peer waits on; those
        # cross two capped links (the origin's, ours) and lose to flows crossing one: beside 10 to 16 peer
        # bodies they crawled at 1 MB/s for seconds (issue 11's namespace test). So while we have some, at most
        # CATCHUP peer bodies at once: with our ~2 origin streams, about our share of the origin beside them.
        self.catchup = Throttle(lambda: CATCHUP if fetching() else None)
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

    def asks(self, plan: list[tuple[str, str]]) -> list[PeerSource]:
        """The sources for one piece's ``plan`` (url, mode), sharing one :class:`Round`: the home, the home
        again as a patient ask, then the rest (``fallback``: asked as home only if the home failed)."""
        shared = Round()
        out = []
        for url, mode in plan:
            out.append(PeerSource(self, url, mode, round_=shared))
            if mode == "home":
                out.append(PeerSource(self, url, mode, round_=shared, patient=True))
        return out

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


class Round:
    """What the asks of one piece learnt so far (see the module docstring)."""

    __slots__ = ("home_failed", "late", "waiting")

    def __init__(self) -> None:
        self.home_failed = False  # the home was refused, cut off or silent twice: its fallback stands in as home
        self.late = False  # the home timed out once: the patient ask tries it again
        self.waiting = False  # the home answered that it fetches the piece: the patient ask waits on it


class PeerSource:
    """One peer as a byte source (see the module docstring)."""

    trusted = False
    attempts = 1

    def __init__(self, client: PeerClient, url: str, mode: str, *, round_: Round | None = None,
                 patient: bool = False) -> None:
        self.client, self.url, self.mode, self.patient = client, url, mode, patient
        self.round = round_ or Round()
        self.slow = False  # our last ask timed out (the router tells members: a strike, not a verdict)
        self.failed_at = url  # the peer that failed us last: the home, or a holder it sent us to
        self.name = "peer://" + url.partition("://")[2]

    async def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes]:
        """Yield the range from this peer (or the holder it sends us to)."""
        mode, patient = self.mode, self.patient
        if mode == "fallback":  # the piece's next candidate: its home (and waited on as one) once the home is gone
            mode = "home" if self.round.home_failed else "have"
            patient = mode == "home"
        elif patient and (self.round.home_failed or not (self.round.waiting or self.round.late)):
            raise NotFound(f"{self.name}: nothing to wait for")  # the home answered for good, or is gone
        deadline = time.monotonic() + PATIENCE
        while True:
            try:
                async for block in self._ask(blob, mode, offset, length):
                    yield block
                return
            except _Fetching as e:
                self.round.waiting = True
                if not patient or time.monotonic() >= deadline:
                    raise NotYet(str(e)) from None
                await asyncio.sleep(0.05)  # the home waited for it already: ask again at once
            except Unavailable:
                if mode == "home" and self.mode == "home":
                    # A holder the home sent us to failed, or the home timed out once: the patient ask goes
                    # back to the home. Else the home itself failed: the fallback stands in.
                    if not patient and (self.slow or self.failed_at != self.url):
                        self.round.late = True
                    else:
                        self.round.home_failed = self.failed_at == self.url or self.round.home_failed
                raise

    async def _ask(self, blob: Blob, mode: str, offset: int, length: int) -> AsyncIterator[bytes]:
        """One pass: the peer, then wherever it sends us."""
        range_ = f"bytes={offset}-{offset + length - 1}"
        targets = [(self.url, mode)]
        while targets:
            url, mode = targets.pop(0)
            path = f"/v1/peer/blobs/{blob.digest}?mode={mode}"
            # Asking the home itself, with an origin stream to spare: it may give us the piece if it still
            # queues there (.gate). In the signed path, so nobody on the way can make us take it.
            spare = mode == "home" and url == self.url and self.mode == "home" and self.client.spare()
            if spare:
                path += "&spare=1"
            started = False
            try:
                async with self.client.session().get(url + path, headers=self.client.headers("GET", path, range_),
                                                     allow_redirects=False) as r:
                    if r.headers.get(NODE_HEADER) == self.client.node_id:
                        self.client._found_self(url)
                        raise NotFound(f"{url} is this daemon")
                    if r.status != 206 and r.content_length is not None and r.content_length <= _SMALL:
                        # Read the short answer (a 307, a 404), so the connection goes back to the pool: a
                        # patient ask re-asks a home every few hundred ms, and a new connection each time
                        # overflows a busy home's accept backlog (connect timeouts under load).
                        await r.read()
                    holder = r.headers.get(HOLDER_HEADER)
                    if r.status == 307 and holder and mode == "home":
                        if r.headers.get(MODE_HEADER) == "home":  # the requester elected to fetch it: wait on it
                            targets = [(holder, "home")]
                        else:
                            targets = [(holder, "have"), (url, "held")]  # another holder, else the home itself
                        continue
                    if r.status == 404:
                        if mode in ("home", "held") and r.headers.get(MODE_HEADER) == "wait":
                            # it fetches the piece (or is about to): never the origin for this one
                            raise _Fetching(f"{url} fetches {range_} of {blob.digest[:19]}: not there yet")
                        if targets:
                            continue
                        if mode == "home" and r.headers.get(MODE_HEADER) != "origin":
                            # the home is not fetching it yet: other pieces first, then on
                            raise NotYet(f"{self.name} does not hold {range_} of {blob.digest[:19]} yet")
                        if spare and r.headers.get(MODE_HEADER) == "origin":
                            self.client.took(blob, offset)  # ours to fetch from the origin, on a spare stream
                        raise NotFound(f"{self.name} does not hold {range_} of {blob.digest[:19]}")
                    if r.status != 206:
                        self.failed_at = url
                        raise Unavailable(f"{self.name}: HTTP {r.status} for {blob.digest[:19]}")
                    async with self.client.catchup.hold():
                        trace.event("get-start", blob.digest, offset, length, url)
                        got = 0
                        try:
                            async for block in r.content.iter_chunked(BLOCK):
                                started = True
                                got += len(block)
                                yield block
                        finally:
                            trace.event("get-end", blob.digest, offset, got, url)
                    return
            except (aiohttp.ClientError, TimeoutError) as e:
                if targets and not started:
                    continue  # a holder we were sent to is gone or silent: back to the home, in held mode
                self.slow = isinstance(e, TimeoutError)  # aiohttp's connect and read timeouts are TimeoutErrors
                self.failed_at = url
                raise Unavailable(f"{self.name}: {type(e).__name__}: {e}".rstrip(": ")) from e


class Throttle:
    """At most ``limit()`` holders at once (None: any number); the limit is read again every few ms."""

    def __init__(self, limit: Callable[[], int | None]) -> None:
        self._limit = limit
        self._active = 0
        self._freed = asyncio.Event()

    @property
    def active(self) -> int:
        """Holders now."""
        return self._active

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Hold a place for the body of the ``async with``."""
        while True:
            limit = self._limit()
            if limit is None or self._active < limit:
                break
            with contextlib.suppress(TimeoutError):  # the limit may lift without anyone leaving
                await asyncio.wait_for(self._freed.wait(), 0.05)
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1
            self._freed.set()
            self._freed = asyncio.Event()


class _Fetching(Exception):
    """A home answered that it fetches the piece but does not hold it yet."""
