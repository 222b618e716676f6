"""A fault-injecting reverse proxy in front of the real registry, for transfer tests.

Runs an aiohttp server on its own event loop in a thread. It forwards every
request to the registry and, for blob GETs, counts the bytes it served per
digest and can inject one queued fault per request: an HTTP status (with
Retry-After), a reset or a stall after some bytes, a flipped byte, or a rate
limit. Everything stays on loopback and every fault is bounded.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web


@dataclass
class Fault:
    """One misbehaviour for one blob GET."""

    status: int | None = None          # answer this status instead of forwarding
    retry_after: str | None = None     # with this Retry-After header
    reset_after: int | None = None     # send this many body bytes, then abort the connection
    stall_after: int | None = None     # send this many body bytes, then go silent for `stall_for`
    stall_for: float = 5.0
    flip_at: int | None = None         # invert the byte at this offset of the response body


@dataclass
class Counters:
    """What the proxy served."""

    blob_bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    blob_requests: int = 0
    times: list[float] = field(default_factory=list)


class FaultProxy:
    """``with FaultProxy(upstream_host) as proxy:`` then pull from ``proxy.host``."""

    def __init__(self, upstream: str, *, rate: float | None = None) -> None:
        self.upstream = upstream
        self.rate = rate  # bytes per second per blob response, None = unlimited
        self.faults: list[Fault] = []
        self.counters = Counters()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.host = ""

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def inject(self, *faults: Fault) -> None:
        """Queue faults for the next blob GETs, one each."""
        with self._lock:
            self.faults.extend(faults)

    def served(self, digest: str) -> int:
        """Body bytes served for a blob."""
        return self.counters.blob_bytes.get(digest, 0)

    def _next_fault(self) -> Fault | None:
        with self._lock:
            return self.faults.pop(0) if self.faults else None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.host = f"127.0.0.1:{port}"
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()
        await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        is_blob = request.method == "GET" and "/blobs/sha256:" in request.path
        fault = self._next_fault() if is_blob else None
        if is_blob:
            self.counters.blob_requests += 1
            self.counters.times.append(time.monotonic())
        if fault and fault.status:
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            return web.Response(status=fault.status, headers=headers, text="injected")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        body = await request.read()
        upstream = await self._session.request(request.method, f"http://{self.upstream}{request.path_qs}",
                                               headers=headers, data=body or None, allow_redirects=False)
        async with upstream:
            response = web.StreamResponse(status=upstream.status)
            for key, value in upstream.headers.items():
                if key.lower() not in ("transfer-encoding", "connection", "content-encoding"):
                    response.headers[key] = value
            await response.prepare(request)
            digest = request.path.rsplit("/", 1)[-1]
            sent = 0
            started = time.monotonic()
            async for piece in upstream.content.iter_chunked(64 << 10):
                if fault and fault.flip_at is not None and sent <= fault.flip_at < sent + len(piece):
                    i = fault.flip_at - sent
                    piece = piece[:i] + bytes([piece[i] ^ 0xFF]) + piece[i + 1:]
                for limit, action in ((fault and fault.reset_after, "reset"), (fault and fault.stall_after, "stall")):
                    if limit is not None and sent + len(piece) > limit:
                        piece = piece[: max(0, limit - sent)]
                        await response.write(piece)
                        self._count(is_blob, digest, len(piece))
                        if action == "stall":
                            await asyncio.sleep(fault.stall_for)  # type: ignore[union-attr]
                        request.transport.abort()  # type: ignore[union-attr]
                        return response
                await response.write(piece)
                sent += len(piece)
                self._count(is_blob, digest, len(piece))
                if self.rate and is_blob:
                    ahead = sent / self.rate - (time.monotonic() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
            await response.write_eof()
            return response

    def _count(self, is_blob: bool, digest: str, n: int) -> None:
        if is_blob:
            self.counters.blob_bytes[digest] += n
