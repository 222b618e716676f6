"""A fault-injecting reverse proxy in front of a real registry, for transfer tests.

:class:`FaultProxy` forwards every request to the upstream registry and logs
each one (method, path, Range, status, body bytes served), so tests measure
"downloaded once" and "only the missing chunks" instead of assuming them. For
the next N blob GETs it can misbehave: answer an HTTP status (with
``Retry-After``), reset the connection or stall after part of the body,
truncate the body (its Content-Length promised more; the connection is
closed cleanly after fewer bytes), or flip a byte; it can throttle blob
bodies to a total rate so a pull can be killed midway; and with
``ignore_range`` it forwards blob GETs without their Range header, so every
answer is a 200 with the whole blob, as from a server that ignores Range. For uploads (PATCH and PUT under ``/blobs/uploads/``) it can
answer an HTTP status instead of forwarding, or forward only the first N
bytes of the body (so the registry keeps part of a chunk) and then reset the
connection. It listens on loopback only, every fault is consumed by one
request, and a stall ends when the proxy closes.

:class:`BackgroundServer` runs any aiohttp app on its own event loop in a
thread; the proxy and the fake registries of the tests are built on it.
With ``blobs="/BUCKET/"`` the same faults apply to S3 object GETs (the
client's Host goes upstream unchanged, so presigned signatures still hold).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

PIECE = 64 << 10

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BackgroundServer:
    """``with BackgroundServer(handler) as srv:`` serves every path at ``srv.host`` (``ip:port``)."""

    def __init__(self, handler: Handler, *, ip: str = "127.0.0.1") -> None:
        self.handler = handler
        self.ip = ip
        self.host = ""
        self.closing: asyncio.Event | None = None  # set (in the server's loop) when closing
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self.loop.run_until_complete, args=(self._serve(),),
                                        name=f"server-{ip}", daemon=True)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        if not self._ready.wait(10) or self._error:
            raise RuntimeError(f"server on {self.ip} did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.closing is not None:
            self.loop.call_soon_threadsafe(self.closing.set)
        self._thread.join(15)
        assert not self._thread.is_alive(), "server thread did not stop"
        self.loop.close()

    async def on_start(self) -> None:
        """Hook run in the server's loop before it accepts connections."""

    async def on_stop(self) -> None:
        """Hook run in the server's loop after it stopped serving."""

    async def _serve(self) -> None:
        self.closing = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handler)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2, access_log=None)
        try:
            await self.on_start()
            await runner.setup()
            site = web.TCPSite(runner, self.ip, 0)
            await site.start()
            port = runner.addresses[0][1]
            self.host = f"{self.ip}:{port}"
        except BaseException as e:
            self._error = e
            self._ready.set()
            raise
        self._ready.set()
        try:
            await self.closing.wait()
        finally:
            await runner.cleanup()
            await self.on_stop()


@dataclass(frozen=True, slots=True)
class Fault:
    """One misbehaviour for one blob GET (build it with the functions below)."""

    kind: str  # "status" | "reset" | "stall" | "truncate" | "flip"
    status: int = 0
    retry_after: str | None = None
    at: int = 0  # body offset: bytes sent before a reset or stall, or the byte to flip
    seconds: float = 0.0  # how long a stall lasts (cut short when the proxy closes)


def http_error(status: int, retry_after: str | None = None) -> Fault:
    """Answer ``status`` (with ``Retry-After``) instead of forwarding."""
    return Fault("status", status=status, retry_after=retry_after)


def reset_after(n: int) -> Fault:
    """Send ``n`` body bytes, then abort the connection."""
    return Fault("reset", at=n)


def truncate_after(n: int) -> Fault:
    """Send ``n`` body bytes of the Content-Length announced, then close the connection cleanly (FIN)."""
    return Fault("truncate", at=n)


def stall_after(n: int, seconds: float) -> Fault:
    """Send ``n`` body bytes, then say nothing for ``seconds``, then abort."""
    return Fault("stall", at=n, seconds=seconds)


def flip_byte(at: int) -> Fault:
    """Invert the body byte at offset ``at``."""
    return Fault("flip", at=at)


@dataclass(slots=True)
class Event:
    """One request the proxy answered."""

    start: float
    method: str
    path: str
    range: str | None
    status: int = 0
    bytes: int = 0  # body bytes written to the client
    end: float = 0.0
    fault: Fault | None = None

    @property
    def digest(self) -> str | None:
        """The blob digest of a blob request."""
        return self.path.rsplit("/", 1)[-1] if "/blobs/sha256:" in self.path else None

    @property
    def range_start(self) -> int:
        """First byte asked for (0 without a Range header)."""
        return int(self.range.removeprefix("bytes=").split("-")[0]) if self.range else 0


class FaultProxy(BackgroundServer):
    """``with FaultProxy(registry.host) as proxy:`` then pull from ``oci://{proxy.host}/...``."""

    def __init__(self, upstream: str, *, rate: float | None = None, blobs: str = "/blobs/sha256:",
                 ignore_range: bool = False) -> None:
        super().__init__(self._handle)
        self.ignore_range = ignore_range  # blob GETs go upstream without Range: always 200, whole blob
        self.upstream = upstream
        self.blobs = blobs  # what a path holds when it is a blob (for S3: "/BUCKET/")
        self.rate = rate  # blob body bytes per second, all responses together; None: unlimited
        self.events: list[Event] = []
        self._faults: list[Fault] = []
        self._upload_faults: list[tuple[str, Fault]] = []  # (method, fault)
        self._lock = threading.Lock()
        self._held = threading.Event()  # set: blob GETs wait before answering (see hold)
        self._next_slot = 0.0
        self._session: aiohttp.ClientSession | None = None

    # -- the test's side -----------------------------------------------------

    def inject(self, fault: Fault, times: int = 1) -> None:
        """Make each of the next ``times`` blob GETs misbehave with ``fault``."""
        with self._lock:
            self._faults.extend([fault] * times)

    def inject_upload(self, fault: Fault, times: int = 1, *, method: str = "PATCH") -> None:
        """Make each of the next ``times`` upload ``method`` requests (PATCH or PUT) misbehave:
        a status, or a reset after forwarding ``fault.at`` body bytes."""
        assert fault.kind in ("status", "reset") and method in ("PATCH", "PUT")
        with self._lock:
            self._upload_faults.extend([(method, fault)] * times)

    def uploads(self) -> list[Event]:
        """The upload PATCH/PUTs so far; ``bytes`` is the body bytes forwarded to the registry."""
        with self._lock:
            return [e for e in self.events if e.method in ("PATCH", "PUT") and "/blobs/uploads/" in e.path]

    def hold(self, held: bool = True) -> None:
        """Make blob GETs wait (until ``hold(False)`` or the proxy closes) before they are answered:
        lets a test line up several clients before any byte flows, without guessing at timings."""
        if held:
            self._held.set()
        else:
            self._held.clear()

    def pending_faults(self) -> int:
        """Faults queued but not yet used."""
        with self._lock:
            return len(self._faults)

    def clear(self) -> None:
        """Forget the log (between two pulls through one proxy)."""
        with self._lock:
            self.events = []

    def blob_gets(self, digest: str | None = None) -> list[Event]:
        """The blob GETs so far (of one blob, if given), in arrival order."""
        with self._lock:
            events = list(self.events)
        return [e for e in events if e.method == "GET" and e.digest and digest in (None, e.digest)]

    def served(self, digest: str) -> int:
        """Body bytes served for blob ``digest``."""
        return sum(e.bytes for e in self.blob_gets(digest))

    def requests(self, fragment: str) -> list[Event]:
        """Requests whose path contains ``fragment``."""
        with self._lock:
            return [e for e in self.events if fragment in e.path]

    # -- the server's side ---------------------------------------------------

    async def on_start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)

    async def on_stop(self) -> None:
        assert self._session is not None
        await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        event = Event(time.monotonic(), request.method, request.path, request.headers.get("Range"))
        with self._lock:
            self.events.append(event)
            if event.method == "GET" and self.blobs in event.path and self._faults:
                event.fault = self._faults.pop(0)
            if "/blobs/uploads/" in event.path:
                for i, (method, _fault) in enumerate(self._upload_faults):
                    if method == event.method:
                        event.fault = self._upload_faults.pop(i)[1]
                        break
        try:
            return await self._answer(request, event)
        except ConnectionResetError:  # the client went away (killed, or gave up on a stall)
            return web.Response(status=499)
        finally:
            event.end = time.monotonic()

    async def _answer(self, request: web.Request, event: Event) -> web.StreamResponse:
        assert self.closing is not None
        # Polled: hold() is called from the test's thread, where an asyncio.Event must not be set.
        while self._held.is_set() and self.blobs in event.path and not self.closing.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        fault = event.fault
        if fault and fault.kind == "status":
            event.status = fault.status
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            return web.Response(status=fault.status, headers=headers, text="injected fault\n")
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        # The client's Host goes upstream, so upload Locations the registry builds point back here.
        headers["Host"] = request.host
        if self.ignore_range and request.method == "GET" and self.blobs in request.path:
            headers = {k: v for k, v in headers.items() if k.lower() != "range"}
        body = await request.read()
        if request.method in ("PATCH", "PUT"):
            event.bytes = len(body)
        if fault and fault.kind == "reset" and request.method in ("PATCH", "PUT"):
            return await self._partial_upload(request, event, headers, body[: fault.at])
        async with self._session.request(request.method, f"http://{self.upstream}{request.path_qs}",
                                         headers=headers, data=body or None, allow_redirects=False) as up:
            event.status = up.status
            response = web.StreamResponse(status=up.status)
            for key, value in up.headers.items():
                if key.lower() not in ("transfer-encoding", "connection", "content-encoding", "date", "server"):
                    response.headers[key] = value
            await response.prepare(request)
            async for piece in up.content.iter_chunked(PIECE):
                if fault and fault.kind == "flip" and event.bytes <= fault.at < event.bytes + len(piece):
                    i = fault.at - event.bytes
                    piece = piece[:i] + bytes([piece[i] ^ 0xFF]) + piece[i + 1:]
                if fault and fault.kind in ("reset", "stall", "truncate") and event.bytes + len(piece) > fault.at:
                    await self._send(response, event, piece[: fault.at - event.bytes])
                    if fault.kind == "stall":
                        await self._sleep(fault.seconds)
                    if request.transport is None:  # a stalled client may have hung up already
                        return response
                    if fault.kind == "truncate":
                        request.transport.close()  # what was written goes out first, then FIN
                    else:
                        request.transport.abort()
                    return response
                await self._send(response, event, piece)
            await response.write_eof()
            return response

    async def _partial_upload(self, request: web.Request, event: Event, headers: dict[str, str],
                              part: bytes) -> web.StreamResponse:
        """Forward ``part`` of a PATCH (as a smaller chunk), then drop the client's connection."""
        assert self._session is not None
        event.bytes = len(part)
        if part and request.method == "PATCH":
            start = int(headers.get("Content-Range", "0-0").split("-")[0])
            headers = {**headers, "Content-Range": f"{start}-{start + len(part) - 1}"}
            async with self._session.patch(f"http://{self.upstream}{request.path_qs}", headers=headers,
                                           data=part) as up:
                event.status = up.status
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=499)

    async def _send(self, response: web.StreamResponse, event: Event, piece: bytes) -> None:
        if self.rate and self.blobs in event.path:
            now = time.monotonic()
            self._next_slot = max(self._next_slot, now) + len(piece) / self.rate
            await self._sleep(self._next_slot - now)
        await response.write(piece)
        event.bytes += len(piece)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up when the proxy closes (so no stall outlives a test)."""
        assert self.closing is not None
        try:
            await asyncio.wait_for(self.closing.wait(), max(0.0, seconds))
        except TimeoutError:
            pass
