"""A lean HTTP/1.1 GET for blob bodies: socket bytes land straight in large buffers.

Why it exists: profiling a 2 GiB pull showed the event loop, the bottleneck
of a pull on a small node, spending about half its time in the general HTTP
client's body path (a copy per parsed piece, many small objects, garbage
collection). Here a :class:`asyncio.BufferedProtocol` receives into 4 MiB
bytearrays (one copy, kernel to buffer) and whole buffers are handed to the
writer, which writes them with ``pwritev`` without copying again.

It speaks only what a ranged blob GET needs: a request line and headers out;
a status line, headers and a ``Content-Length`` body in (RFC 9112). Anything
else (a chunked body, a redirect, an auth challenge, a 1xx) is reported as a
:class:`RawResponse` without a body, and callers take their general client
path for it. Connections are kept alive and pooled per origin, and never read
past the end of a response, so a reused connection starts clean.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..errors import Unavailable

BUFFER = 4 << 20
_MAX_HEAD = 64 << 10
_QUEUE_LIMIT = 3  # buffers waiting for the writer before the socket is paused
_SPARES = 64  # buffers kept for reuse (a pull holds a few per stream)


@dataclass(slots=True)
class RawResponse:
    """Status and headers (lower-cased names) of a response; the body via :meth:`body`."""

    status: int
    headers: dict[str, str]
    content_length: int | None
    _conn: _Connection | None = field(default=None, repr=False)

    async def body(self) -> AsyncIterator[memoryview]:
        """Yield the body in large pieces; the connection returns to its pool at the end."""
        assert self._conn is not None and self.content_length is not None
        conn, self._conn = self._conn, None
        try:
            async for piece in conn.body():
                yield piece
        except BaseException:
            conn.close()
            raise
        conn.release()

    def close(self) -> None:
        """Drop the connection without reading the body."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class _Connection(asyncio.BufferedProtocol):
    """One keep-alive connection; receives one response at a time."""

    def __init__(self, pool: RawPool, key: tuple[str, str, int], read_timeout: float) -> None:
        self._pool = pool
        self._key = key
        self._read_timeout = read_timeout
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray(_MAX_HEAD)
        self._cap = _MAX_HEAD  # where this buffer's usable part ends (never past the body)
        self._filled = 0
        self._in_body = False
        self._has_body = False  # this response's body is ours to read (it may be whole already)
        self._remaining = 0
        self._ready: deque[memoryview] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._head: tuple[int, dict[str, str]] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False
        self.reusable = True

    # -- protocol callbacks -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buf)[self._filled:self._cap]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        self._arm_timer()
        if self._in_body:
            self._remaining -= nbytes
            if self._filled == self._cap or self._remaining == 0:
                self._hand_off()
            return
        end = self._buf.find(b"\r\n\r\n", 0, self._filled)
        if end < 0:
            if self._filled == self._cap:
                self._fail(Unavailable("response headers over 64 KiB"))
            return
        try:
            self._head = _parse_head(bytes(self._buf[:end]))
        except ValueError as e:
            self._fail(Unavailable(f"malformed HTTP response: {e}"))
            return
        extra = bytes(self._buf[end + 4:self._filled])
        self._filled = 0
        self._wake()
        status, headers = self._head
        length = _content_length(headers)
        if status < 200 or length is None or headers.get("transfer-encoding"):
            self.reusable = False  # not ours to read: the caller takes another path
            return
        if len(extra) > length:
            self._fail(Unavailable("server sent more than its Content-Length"))
            return
        self._in_body = self._has_body = True
        self._remaining = length - len(extra)  # still to come from the socket
        # The first buffer holds what came with the headers plus what follows.
        self._buf = self._pool.buffer()
        self._cap = min(len(self._buf), length)
        self._buf[:len(extra)] = extra
        self._filled = len(extra)
        if self._remaining == 0 or self._filled == self._cap:
            self._hand_off()

    def eof_received(self) -> bool | None:
        self._fail(Unavailable("server closed the connection early"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self._cancel_timer()
        if not self._in_body or self._remaining > 0:
            self._fail(Unavailable(f"connection lost: {exc}" if exc else "connection closed mid-response"))

    # -- internals ----------------------------------------------------------------

    def _new_buffer(self) -> None:
        self._buf = self._pool.buffer()
        self._cap = min(len(self._buf), self._remaining)
        self._filled = 0

    def _hand_off(self) -> None:
        if self._filled:
            self._ready.append(memoryview(self._buf)[:self._filled])
        if self._remaining > 0:
            self._new_buffer()
            if len(self._ready) >= _QUEUE_LIMIT and self.transport and not self._paused:
                self.transport.pause_reading()
                self._paused = True
                self._cancel_timer()  # a slow disk is not a stalled server
        else:
            self._in_body = False
            self._cancel_timer()
        self._wake()

    def _fail(self, error: BaseException) -> None:
        self.reusable = False
        if self._in_body and self._filled:
            # Bytes received before the failure are good: hand them over, so the
            # retry resumes after them instead of at the start of the buffer.
            self._ready.append(memoryview(self._buf)[:self._filled])
            self._buf, self._cap, self._filled = bytearray(1), 0, 0
        if self._error is None:
            self._error = error
        self._cancel_timer()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _arm_timer(self) -> None:
        loop = asyncio.get_running_loop()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_later(self._read_timeout, self._stalled)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _stalled(self) -> None:
        self._fail(Unavailable(f"no data for {self._read_timeout:g}s"))
        if self.transport is not None:
            self.transport.abort()

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    # -- what the pool and responses call ------------------------------------------

    async def request(self, target: str, host: str, headers: Mapping[str, str]) -> RawResponse:
        assert self.transport is not None
        self._head = None
        self._error = None
        self._has_body = False
        self._buf = bytearray(_MAX_HEAD)
        self._cap = _MAX_HEAD
        self._filled = 0
        lines = [f"GET {target} HTTP/1.1", f"Host: {host}", "Connection: keep-alive"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        self._arm_timer()
        while self._head is None and self._error is None:
            await self._wait()
        if self._head is None:
            assert self._error is not None
            raise self._error
        status, headers_in = self._head
        length = _content_length(headers_in)
        if headers_in.get("connection", "").lower() == "close":
            self.reusable = False
        body = self._has_body
        if not body:
            self.close()  # the caller will use another client for this one
        return RawResponse(status, headers_in, length if body else None, self if body else None)

    async def body(self) -> AsyncIterator[memoryview]:
        while True:
            while self._ready:
                piece = self._ready.popleft()
                if self._paused and len(self._ready) < _QUEUE_LIMIT and self.transport:
                    self.transport.resume_reading()
                    self._paused = False
                    self._arm_timer()
                yield piece
            if self._error is not None:
                raise self._error
            if not self._in_body:
                return
            await self._wait()

    def release(self) -> None:
        if self.reusable and not self._in_body and self._error is None:
            self._pool._put(self._key, self)
        else:
            self.close()

    def close(self) -> None:
        self.reusable = False
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()
            self.transport = None


class RawPool:
    """Keep-alive connections per origin for :meth:`get`."""

    def __init__(self, *, connect_timeout: float, read_timeout: float,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._ssl = ssl_context
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._spares: list[bytearray] = []

    def buffer(self) -> bytearray:
        """A BUFFER-sized bytearray, recycled when nothing else refers to it any more.

        Fresh multi-MiB allocations cost page faults and zero-filling on every
        piece (measured: more kernel time than the copy itself). A buffer
        handed out earlier is free again once its only references are this
        list and the call's argument; that refcount test is CPython's, and
        safe: with no other reference, nobody can still read or write it.
        """
        for buf in self._spares:
            if sys.getrefcount(buf) == 3:  # the list, the loop variable, getrefcount's argument
                return buf
        buf = bytearray(BUFFER)
        if len(self._spares) < _SPARES:
            self._spares.append(buf)
        return buf

    def _put(self, key: tuple[str, str, int], conn: _Connection) -> None:
        self._idle.setdefault(key, []).append(conn)

    async def get(self, url: str, headers: Mapping[str, str]) -> RawResponse:
        """Send a GET; return the response head (a body only for plain Content-Length bodies)."""
        parts = urlsplit(url)
        secure = parts.scheme == "https"
        port = parts.port or (443 if secure else 80)
        host = parts.hostname or ""
        key = (parts.scheme, host, port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        idle = self._idle.get(key) or []
        while idle:
            conn = idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                try:
                    return await conn.request(target, parts.netloc, headers)
                except Unavailable:
                    conn.close()  # a stale keep-alive connection: retry on a new one
        loop = asyncio.get_running_loop()
        ctx = (self._ssl or ssl.create_default_context()) if secure else None
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self, key, self._read_timeout), host, port,
                                       ssl=ctx, server_hostname=host if ctx else None),
                self._connect_timeout)
        except (TimeoutError, OSError) as e:
            raise Unavailable(f"{parts.netloc}: cannot connect: {type(e).__name__} {e}".rstrip()) from e
        return await conn.request(target, parts.netloc, headers)

    def close(self) -> None:
        """Close every idle connection."""
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    if not version.startswith("HTTP/1."):
        raise ValueError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    status = int(rest[:3])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"bad header line {line[:80]!r}")
        name = name.strip().lower()
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return status, headers


def _content_length(headers: Mapping[str, str]) -> int | None:
    value = headers.get("content-length")
    if value is None or not value.isdigit():
        return None
    return int(value)
