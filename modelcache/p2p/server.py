"""Serving pieces to peers on the daemon's listener, under ``/v1/peer/``.

    GET /v1/peer/hello                 200, this daemon's node id in X-Modelcache-Node
    GET /v1/peer/blobs/{digest}?mode=  206 with the Range asked for (home | have | held), 404 if not held,
                                       307 + X-Modelcache-Holder: ask that holder instead (as its
                                       home when X-Modelcache-Mode says so); a 404 with
                                       X-Modelcache-Mode: origin elects the requester to fetch it,
                                       with X-Modelcache-Mode: wait says we fetch it: ask again
    GET /v1/peer/pieces/{digest}       the sha256 of each piece of a committed blob (JSON list)

Every request must carry a fresh HMAC signature (:mod:`.signing`): without
one it gets 401 and no bytes. These routes are exempt from the API's bearer
auth (peers have no API credential) and exist only when a secret is set.

A daemon serves what it holds: committed blobs and the durable chunks of
ingests still in progress, each read under an ``upload`` lease so gc never
takes them mid-read. Asked as a piece's home (``mode=home``) for a piece it
does not hold yet but is fetching, it fetches that piece now (single flight
with its own pull and every other requester, :meth:`Engine.ensure_piece`)
and then serves it; not done within ``home_wait`` (well inside the
requester's read timeout, so a loaded node still answers in time), it says
``wait``, and the requester asks again rather than going to the origin. It
remembers who it served whole pieces to, and sends later requesters to
those holders (:mod:`.holders`), so no node serves everyone.
A piece it fetches from the origin as their home is streamed to the
requesters waiting on it while it arrives (:mod:`.relay`), not after.
Uploads share a byte-rate limit (``--peer-upload-limit``) and a bound on
concurrent uploads.

A blob whose sha256 the requester does not know (an S3 object, a small Hub
file) is asked for by its stand-in digest (:func:`~modelcache.model.standin_digest`
of the origin's key): served from the ingest under that name while it
downloads, then as the sha256 learnt for it, in this run or an earlier one.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from ..errors import InvalidContent, NotFound
from ..model import standin_digest
from ..store import Store, liveness
from ..transfer import Engine
from . import signing, trace
from .client import HOLDER_HEADER, MODE_HEADER, NODE_HEADER, URL_HEADER
from .holders import Holders
from .limit import RateLimit
from .pieces import digest_list, piece_size
from .relay import Broken, LivePiece, Relay

PREFIX = "/v1/peer/"
BLOCK = 1 << 20
UPLOADS = 8  # concurrent uploads of stored bytes at most
RELAYS = 2 * UPLOADS  # concurrent uploads of live pieces at most, apart (each goes at its origin read's pace)
_DIGEST_CACHE = 1024
_GIVEN = 100_000  # pieces given away remembered at most
STANDIN_REFRESH = 5.0  # seconds between reads of the learnt digests, when asked for an unknown stand-in


class PeerServer:
    """The handlers of the peer routes over one store and engine."""

    def __init__(self, store: Store, engine: Engine, secret: bytes, node_id: str, *, minimum: int,
                 limit: RateLimit, home_wait: float, on_served: Callable[[int], None] = lambda n: None,
                 holders: Holders | None = None, relay: Relay | None = None,
                 hurry: Callable[[str, int], None] = lambda digest, offset: None,
                 give: Callable[[str, int], bool] = lambda digest, offset: False) -> None:
        self.store, self.engine, self.secret, self.node_id = store, engine, secret, node_id
        self.relay, self._hurry, self._give = relay, hurry, give
        self._given: set[tuple[str, int]] = set()  # pieces we gave to a requester with a stream to spare
        self.minimum, self.limit, self.home_wait, self._on_served = minimum, limit, home_wait, on_served
        self._uploads = asyncio.Semaphore(UPLOADS)
        # Live pieces have slots of their own: a relay goes at its origin read's pace, and on a home whose
        # origin streams crawl (its download link full) relays held every shared slot for seconds while its
        # whole pieces could not be served (issue 11's namespace test: 9 MB/s out of 40 for 3.5 s).
        self._relays = asyncio.Semaphore(RELAYS)
        self._digests: dict[str, list[str]] = {}
        # who holds each piece we served, whom to send the next requester to, whom we elected (our router reads it)
        self._holders = holders or Holders()
        self._standins: dict[str, str] = {}  # stand-in digest -> sha256 learnt in an earlier run
        self._standins_at = -STANDIN_REFRESH

    def add_routes(self, app: web.Application) -> None:
        """Register the routes."""
        app.router.add_get(PREFIX + "hello", self.hello)
        app.router.add_get(PREFIX + "blobs/{digest}", self.blob)
        app.router.add_get(PREFIX + "pieces/{digest}", self.pieces)

    def _refuse(self, request: web.Request) -> web.Response | None:
        why = signing.check(self.secret, request.method, request.path_qs, request.headers.get("Range", ""),
                            request.headers.get(signing.HEADER))
        if why is None:
            return None
        return web.json_response({"code": "Unauthenticated", "message": why}, status=401,
                                 headers={NODE_HEADER: self.node_id})

    async def hello(self, request: web.Request) -> web.Response:
        """Who we are (signed callers only)."""
        return self._refuse(request) or web.json_response({"node": self.node_id}, headers={NODE_HEADER: self.node_id})

    def _stored(self, digest: str) -> str:
        """The digest the blob is stored under (an unverified blob's stand-in maps to its sha256)."""
        self.store.content.path(digest)  # InvalidContent for a malformed digest
        return self.engine.learned.get(digest) or self._standins.get(digest) or digest

    async def _learnt_standin(self, digest: str) -> bool:
        """Asked for a digest held nowhere here, which may be a stand-in: map the sha256s the store learnt
        in earlier runs (``learned_digests``, by source key) to their stand-ins (read at most every few
        seconds); True when ``digest`` maps to a sha256 now."""
        if digest not in self._standins and time.monotonic() - self._standins_at >= STANDIN_REFRESH:
            self._standins_at = time.monotonic()
            rows = await asyncio.to_thread(self.store.index.learned_digests)
            self._standins = {standin_digest(key): sha for key, sha in rows}
        return digest in self._standins

    async def pieces(self, request: web.Request) -> web.Response:
        """The piece digest list of a committed blob, computed once (in a thread) and kept."""
        asked = self._asked(request)
        if isinstance(asked, web.Response):
            return asked
        digest, stored = asked
        size = self.store.content.size(stored)
        if size is None and stored == digest and await self._learnt_standin(digest):
            stored = self._stored(digest)
            size = self.store.content.size(stored)
        if size is None:
            return _not_found(f"{digest} is not committed here", self.node_id)
        found = self._digests.get(digest)
        if found is None:
            computed: list[str] = await asyncio.to_thread(
                self._under_lease, stored,
                lambda: digest_list(lambda o, n: self.store.content.read(stored, o, n), size,
                                    piece_size(size, self.minimum)))
            if len(self._digests) >= _DIGEST_CACHE:
                self._digests.pop(next(iter(self._digests)))
            found = self._digests[digest] = computed
        return web.json_response(found, headers={NODE_HEADER: self.node_id})

    def _asked(self, request: web.Request) -> tuple[str, str] | web.Response:
        """(digest asked for, digest stored under) of a signed request, or the refusal to send."""
        refused = self._refuse(request)
        if refused:
            return refused
        digest = request.match_info["digest"]
        try:
            return digest, self._stored(digest)
        except InvalidContent as e:
            return web.json_response({"code": "InvalidContent", "message": str(e)}, status=400)

    async def blob(self, request: web.Request) -> web.StreamResponse:
        """A byte range of a blob we hold (see the module docstring)."""
        asked = self._asked(request)
        if isinstance(asked, web.Response):
            return asked
        began = time.monotonic()
        digest, stored = asked
        span = _range(request.headers.get("Range", ""))
        if span is None:
            return web.json_response({"code": "InvalidRange", "message": "expected Range: bytes=A-B"}, status=416)
        start, end = span
        mode = request.query.get("mode", "have")
        requester = request.headers.get(URL_HEADER)
        held = self._holds(stored, digest, start, end)
        if not held and stored == digest and await self._learnt_standin(digest):
            stored = self._stored(digest)
            held = self._holds(stored, digest, start, end)
        if not held and mode == "home" and requester:
            given = self._given_away(request, digest, start, requester)
            if given is not None:
                return given
        if not held and mode == "home":
            waited = time.monotonic()
            live, held = await self._await_piece(stored, digest, start, end)
            trace.event("home-wait", digest, start, int((time.monotonic() - waited) * 1000), requester or "-")
            if live is not None:
                # The same one wait in all for an upload slot as a held piece below (a wait answer, not a timeout).
                left = max(0.05, self.home_wait - (time.monotonic() - began))
                served = await self._send_live(request, live, digest, start, end, wait=left)
                if served < 0:
                    return _wait(f"{digest}: every upload slot is busy, ask again", self.node_id)
                if served == end - start + 1 and requester:
                    self._holders.served((digest, start), requester)
                return served_response(request)
            if not held and self.engine.fetches(digest):
                # We fetch it (or are about to: resolving, queued) but not in time: the requester asks again.
                # Never "not here" for this: it would send the requester to the origin for a piece we fetch.
                return _wait(f"{digest}: fetching it, ask again", self.node_id)
            if not held and requester:
                # We cannot fetch it (no pull of ours wants it): one requester does, the others wait on it.
                elected = self._holders.elect((digest, start), requester, time.monotonic())
                headers = {NODE_HEADER: self.node_id}
                if elected is not None:
                    return web.Response(status=307, headers={**headers, HOLDER_HEADER: elected, MODE_HEADER: "home"})
                return web.json_response({"code": "NotFound", "message": f"{digest} is not fetched here: fetch it"},
                                         status=404, headers={**headers, MODE_HEADER: "origin"})
        if not held:
            return _not_found(f"bytes {start}-{end} of {digest} are not held here", self.node_id)
        if mode == "home":
            holder = self._holders.next_holder((digest, start), requester)
            if holder is not None:
                return web.Response(status=307, headers={HOLDER_HEADER: holder, NODE_HEADER: self.node_id})
        # Asked as a home (or back at the home after a redirect), every upload slot busy: say so in time (the
        # requester asks again) rather than keep it past its read timeout, which fails us for it and sends
        # it to our fallback or the origin.
        left = max(0.05, self.home_wait - (time.monotonic() - began))  # one wait in all, inside the read timeout
        served = await self._send(request, stored, digest, start, end,
                                  wait=left if mode in ("home", "held") else None)
        if served < 0:
            return _wait(f"{digest}: every upload slot is busy, ask again", self.node_id)
        if served == end - start + 1 and requester:
            self._holders.served((digest, start), requester)
        return served_response(request)

    def _given_away(self, request: web.Request, digest: str, start: int, requester: str) -> web.Response | None:
        """As its home, for a piece not held here: if we gave it away, send the requester to its taker; if the
        requester has an origin stream to spare and our fetch of it still queues, give it (:mod:`.gate`)."""
        key, now = (digest, start), time.monotonic()
        headers = {NODE_HEADER: self.node_id}
        taker = self._holders.elected(key, now)
        if key in self._given and taker is not None and taker != requester:
            return web.Response(status=307, headers={**headers, HOLDER_HEADER: taker, MODE_HEADER: "home"})
        if request.query.get("spare") == "1" and taker is None and self._give(digest, start):
            self._holders.elect(key, requester, now)
            if len(self._given) >= _GIVEN:
                self._given.clear()
            self._given.add(key)
            trace.event("give", digest, start, 0, requester)
            return web.json_response({"code": "NotFound", "message": f"{digest}: queued here, fetch it"},
                                     status=404, headers={**headers, MODE_HEADER: "origin"})
        return None

    async def _await_piece(self, stored: str, digest: str, start: int, end: int) -> tuple[LivePiece | None, bool]:
        """As its home, for a piece not held here yet: its live bytes if it is relayed now or its origin read
        starts within the wait (:mod:`.relay`), else whether it is held once :meth:`Engine.ensure_piece` returns."""
        live = self.relay.find(digest, start) if self.relay is not None else None
        if live is not None and end < live.start + live.length:
            return live, False
        ensure = asyncio.ensure_future(self.engine.ensure_piece(digest, start, wait=self.home_wait))
        began = asyncio.ensure_future(asyncio.wait_for(self.relay.started(digest, start), self.home_wait)) \
            if self.relay is not None and self.engine.fetches(digest) else None
        try:
            if began is not None:
                # Half the wait for the piece to start in its turn; then it goes in next (.gate's hurry), and the
                # requester hears ``wait`` now: it asks again at once, saying afresh whether it has an origin
                # stream to spare, so a piece still queued here can be given to it (.gate) half a wait sooner.
                await asyncio.wait([ensure, began], timeout=self.home_wait / 2, return_when=asyncio.FIRST_COMPLETED)
                if not ensure.done() and not began.done():
                    self._hurry(digest, start)
                    return None, False
                if began.done() and not began.cancelled() and began.exception() is None \
                        and end < began.result().start + began.result().length \
                        and not (ensure.done() and ensure.result()):
                    return began.result(), False
            await ensure
            return None, self._holds(stored, digest, start, end)  # also when the whole blob was committed meanwhile
        finally:
            for waiting in (ensure, began):
                if waiting is not None and not waiting.done():
                    waiting.cancel()

    async def _send_live(self, request: web.Request, live: LivePiece, digest: str, start: int, end: int, *,
                         wait: float | None = None) -> int:
        """Stream bytes ``start..end`` of a piece while it arrives from the origin; return how many went out,
        or -1 when no upload slot came free, or no byte arrived, within ``wait`` seconds. If its origin read
        breaks off, the connection is closed: the requester resumes elsewhere."""
        deadline = time.monotonic() + (wait if wait is not None else self.home_wait)
        async with self._upload_slot(wait, self._relays) as slot:
            if not slot:
                return -1
            # The 206 goes out with the first byte, not before: an origin read that has not begun to answer
            # (its server or a proxy holding it) would keep the requester past its read timeout, which fails
            # us as its home and sends it to our fallback, a second origin fetch (it asks again instead).
            if not await live.arrived(start, max(0.0, deadline - time.monotonic())):
                return -1
            return await self._stream(request, digest, start, end, live.read)

    def _holds(self, stored: str, digest: str, start: int, end: int) -> bool:
        if self.store.content.has(stored):
            return True
        try:
            self.store.content.read_durable(digest, end, 1)
            self.store.content.read_durable(digest, start, 1)
        except (NotFound, InvalidContent, OSError):
            return False
        return True

    def _under_lease(self, stored: str, work: Callable[[], Any]) -> Any:
        """Run ``work`` holding an ``upload`` lease on the blob (blocks; in a thread)."""
        lease = f"upload:peer:{secrets.token_hex(6)}"
        self.store.index.add_lease(lease, kind="upload", owner="peer", blobs=[stored], process=liveness.me())
        try:
            return work()
        finally:
            self.store.index.drop_lease(lease)

    @contextlib.asynccontextmanager
    async def _upload_slot(self, wait: float | None, pool: asyncio.Semaphore | None = None) -> AsyncIterator[bool]:
        """Hold a slot of ``pool`` (the stored bytes' uploads by default): True, or False when none came free
        within ``wait`` seconds (None: no limit)."""
        slots = pool or self._uploads
        try:
            await asyncio.wait_for(slots.acquire(), wait)
        except TimeoutError:
            yield False
            return
        try:
            yield True
        finally:
            slots.release()

    async def _send(self, request: web.Request, stored: str, digest: str, start: int, end: int, *,
                    wait: float | None = None) -> int:
        """Stream bytes ``start..end`` (inclusive), rate limited; return how many went out, or -1 when no
        upload slot came free within ``wait`` seconds."""
        async with self._upload_slot(wait) as slot:
            if not slot:
                return -1

            def read(offset: int, length: int) -> bytes:
                if self.store.content.has(stored):
                    return self.store.content.read(stored, offset, length)
                return self.store.content.read_durable(digest, offset, length)

            lease = f"upload:peer:{secrets.token_hex(6)}"
            await asyncio.to_thread(self.store.index.add_lease, lease, kind="upload", owner="peer",
                                    blobs=[stored], process=liveness.me())
            try:
                return await self._stream(request, digest, start, end, lambda at, n: asyncio.to_thread(read, at, n))
            finally:
                await asyncio.to_thread(self.store.index.drop_lease, lease)

    async def _stream(self, request: web.Request, digest: str, start: int, end: int,
                      read: Callable[[int, int], Awaitable[bytes]]) -> int:
        """The 206 for bytes ``start..end`` (inclusive), each block from ``read(offset, most)``, rate limited;
        return how many went out. Stored bytes and live pieces alike: a live piece that breaks off (or stalls)
        closes the connection short of its Content-Length (the requester sees it cut and resumes elsewhere);
        an ingest that went away, or a peer that hung up, ends it where it is."""
        response = _piece_response(request, self.node_id, start, end)
        sent = 0
        who = request.headers.get(URL_HEADER) or "-"
        trace.event("serve-start", digest, start, end - start + 1, who)
        try:
            await response.prepare(request)
            at = start
            while at <= end:
                block = await read(at, min(BLOCK, end - at + 1))
                if not block:
                    break
                await self.limit.take(len(block))
                await response.write(block)
                at += len(block)
                sent += len(block)
                self._on_served(len(block))
            await response.write_eof()
        except (Broken, TimeoutError):
            if request.transport is not None:
                request.transport.close()  # short of its Content-Length: the requester sees it cut
        except (NotFound, OSError, ConnectionError):
            pass  # the ingest went away or the peer hung up: it resumes elsewhere
        finally:
            trace.event("serve-end", digest, start, sent, who)
        return sent


_PEER_RESPONSE = web.RequestKey("peer_response", web.StreamResponse)


def _piece_response(request: web.Request, node_id: str, start: int, end: int) -> web.StreamResponse:
    """The 206 for bytes ``start..end`` (inclusive) of a piece, kept on ``request`` for :func:`served_response`."""
    response = web.StreamResponse(status=206, headers={
        NODE_HEADER: node_id, "Content-Length": str(end - start + 1),
        "Content-Range": f"bytes {start}-{end}/*", "Content-Type": "application/octet-stream"})
    request[_PEER_RESPONSE] = response
    return response


def served_response(request: web.Request) -> web.StreamResponse:
    """The response already streamed for ``request``."""
    return request[_PEER_RESPONSE]


def _wait(message: str, node_id: str) -> web.Response:
    """404 with ``X-Modelcache-Mode: wait``: we fetch the piece or hold it but cannot serve it yet."""
    return web.json_response({"code": "NotFound", "message": message}, status=404,
                             headers={NODE_HEADER: node_id, MODE_HEADER: "wait"})


def _not_found(message: str, node_id: str) -> web.Response:
    return web.json_response({"code": "NotFound", "message": message}, status=404, headers={NODE_HEADER: node_id})


def _range(header: str) -> tuple[int, int] | None:
    """``bytes=A-B`` -> (A, B); anything else (suffixes, several ranges) -> None."""
    unit, _, spec = header.partition("=")
    first, _, last = spec.partition("-")
    if unit.strip() != "bytes" or not first.isdigit() or not last.isdigit() or int(last) < int(first):
        return None
    return int(first), int(last)

