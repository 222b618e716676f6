"""A lean HTTP/1.1 GET for blob bodies: socket bytes land straight in large buffers, off the event loop.

Why it exists: profiling pulls on a 2-core node showed the event loop as the
bottleneck: first the general HTTP client's body path (a copy per parsed
piece, many small objects), then, with a buffered protocol, the loop thread
itself doing every ``recv`` of every stream while hashing and writing ran in
threads. Here each connection is a plain blocking socket driven from a small
thread pool: a thread fills a whole 4 MiB buffer with ``recv_into`` (one copy,
kernel to buffer, the GIL released) and the loop sees one hand-off per
buffer. The next buffer is being filled while the caller writes the last.

It speaks only what a ranged blob GET needs: a request line and headers out;
a status line, headers and a ``Content-Length`` body in (RFC 9112). Anything
else (a chunked body, a redirect, an auth challenge, a 1xx) is reported as a
:class:`RawResponse` without a body, and callers take their general client
path for it. Connections are kept alive and pooled per origin, never read
past the end of a response (so a reused connection starts clean), and
dropped, never reused, after any error or abandoned body. A read that waits
``read_timeout`` seconds without a byte fails as a stall.

Proxies (:mod:`.proxy`): an https origin is reached through the proxy's
``CONNECT`` tunnel with TLS end to end; an http one is asked in absolute form
(RFC 9112 3.2.2), and refused there if the request carries credentials.
Connections are pooled per origin and proxy.
"""

from __future__ import annotations

import asyncio
import mmap
import socket
import ssl
import sys
import threading
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..errors import ModelCacheError, Unauthorized, Unavailable
from ..store.direct import anonymous_buffer
from ..transfer.hangup import HANGUP
from ..transfer.meter import RECEIVING, Cell, Meter
from .http import check_range_response, connection_failure, content_length, exact_range, parse_head
from .proxy import Proxy, check_request

BUFFER = 4 << 20
# Bytes handed over per buffer at most, read as a body starts: a reader passing a range on while it arrives
# (p2p/relay.py: a piece's home relaying it to peers) asks for smaller ones than BUFFER, else a 4 MiB piece
# would reach its peers in one hand-off, after its last byte.
FILL: ContextVar[int] = ContextVar("modelcache_raw_fill", default=BUFFER)
_MAX_HEAD = 64 << 10
_SPARES = 64  # buffers kept for reuse (a pull holds a few per stream)
_THREADS = 32  # default for the sockets in a blocking call at once, per pool

Key = tuple[str, str, int, str]  # scheme, host, port, the proxy's URL ("" direct)
Buffer = bytearray | mmap.mmap


@dataclass(slots=True)
class RawResponse:
    """Status and headers (lower-cased names) of a response; the body via :meth:`body`."""

    status: int
    headers: dict[str, str]
    content_length: int | None
    _conn: _Connection | None = field(default=None, repr=False)

    async def body(self) -> AsyncIterator[memoryview]:
        """Yield the body in large pieces.

        The connection goes back to its pool as soon as its last byte is in,
        before the last piece is yielded, so a caller that stops there
        (having all it asked for) still leaves it reusable. Bytes received
        before a failure are yielded before the error is raised, so a retry
        can resume after them; so are bytes received before a cancellation
        (the connection is dropped first), which is raised at the next read,
        and before the caller hangs up (:mod:`modelcache.transfer.hangup`).
        """
        assert self._conn is not None and self.content_length is not None
        conn, self._conn = self._conn, None
        pool = conn.pool
        meter = RECEIVING.get()
        limit = FILL.get()
        hangup = HANGUP.get()  # how the caller drops this connection to end the body early
        if hangup is not None:
            hangup.add(conn.abort)
        done = False
        ahead = None  # (the fill running in a thread, the buffer it fills, its meter cell)
        try:
            if not conn.remaining:
                done = True
                conn.release()
            while not done:
                if ahead is None:
                    ahead = pool.start_fill(conn, meter, limit)
                filling, buf, cell = ahead
                try:
                    # shield: a cancellation must not drop the fill running in its thread, nor its bytes.
                    n, error = await asyncio.shield(filling)
                except asyncio.CancelledError:
                    # Interrupted (Ctrl-C, SIGTERM): hang up, and hand over what this buffer already
                    # holds before the cancellation goes on, so the caller can keep it (issue 10).
                    conn.abort()
                    ahead = None
                    n, _ = await filling
                    if meter is not None:
                        meter.close(cell)
                    if n:
                        yield memoryview(buf)[:n]
                    raise
                ahead = None
                done = error is None and not conn.remaining
                if done:
                    conn.release()
                elif error is None:  # read ahead while the caller writes this piece
                    ahead = pool.start_fill(conn, meter, limit)
                if meter is not None:  # from here the caller counts these bytes
                    meter.close(cell)
                if n:
                    yield memoryview(buf)[:n]
                if error is not None:
                    raise error
        except BaseException:
            if not done:
                conn.abort()
            raise
        finally:
            if hangup is not None:
                hangup.discard(conn.abort)
            if ahead is not None and meter is not None:
                meter.close(ahead[2])

    async def ranged(self, offset: int, length: int, *, what: str,
                     size: int | None) -> AsyncIterator[bytes | memoryview]:
        """Exactly bytes ``[offset, offset + length)`` of a ranged GET's answer, then the connection closed.

        The one reading of a range on this client, for every source: the
        status and ``Content-Range`` checked by :func:`~.http.check_range_response`
        (its errors, retryable or final), a body that ends early
        :class:`Unavailable`, a 200 to a Range skipped up to ``offset``.
        """
        try:
            if self.content_length is None:
                raise Unavailable(f"{what}: HTTP {self.status} without a plain body")
            skip = check_range_response(self.status, self.headers, offset, length, what, size=size)
            async for piece in exact_range(self.body(), offset, length, skip=skip, what=what):
                yield piece
        finally:
            self.close()

    def close(self) -> None:
        """Drop the connection without reading the body."""
        if self._conn is not None:
            self._conn.abort()
            self._conn = None


class _Connection:
    """One keep-alive connection, used by one request at a time, from pool threads."""

    def __init__(self, pool: RawPool, key: Key, sock: socket.socket) -> None:
        self.pool = pool
        self.key = key
        self._sock = sock
        self._lock = threading.Lock()
        self._busy = False
        self._dead = False
        self._pending = b""  # body bytes that came in with the headers
        self.remaining = 0  # body bytes not yet handed out
        self.reusable = True

    # -- run in pool threads ---------------------------------------------------------

    def request(self, target: str, host: str, headers: Mapping[str, str]) -> tuple[int, dict[str, str]]:
        """Send the GET and read the response head (blocks)."""
        lines = [f"GET {target} HTTP/1.1", f"Host: {host}", "Connection: keep-alive"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        head = bytearray()
        with self._operation():
            try:
                self._sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
                while (end := head.find(b"\r\n\r\n")) < 0:
                    if len(head) >= _MAX_HEAD:
                        raise Unavailable("response headers over 64 KiB")
                    got = self._sock.recv(_MAX_HEAD)
                    if not got:
                        raise Unavailable("server closed the connection in the response headers")
                    head += got
            except (Unavailable, ConnectionError) as e:
                if head:
                    raise
                # Nothing came back: a kept-alive connection the server had already closed.
                raise _Stale(f"server closed the connection before answering ({e})") from e
        try:
            status, fields = parse_head(bytes(head[:end]))
        except ValueError as e:
            raise Unavailable(f"malformed HTTP response: {e}") from e
        extra = bytes(head[end + 4:])
        length = content_length(fields)
        if fields.get("connection", "").lower() == "close":
            self.reusable = False
        if status < 200 or length is None or fields.get("transfer-encoding"):
            self.reusable = False  # not ours to read: the caller takes another path
            self.remaining = 0
            return status, fields
        if len(extra) > length:
            raise Unavailable("server sent more than its Content-Length")
        self._pending, self.remaining = extra, length
        return status, fields

    def fill(self, buf: Buffer, cell: Cell | None = None, limit: int = BUFFER) -> tuple[int, BaseException | None]:
        """Fill ``buf`` from the body (up to what remains, ``limit`` bytes at most); (bytes, the error that
        stopped it early).

        ``cell.n`` follows the bytes in ``buf`` after every ``recv``, for progress.
        """
        view = memoryview(buf)[: min(len(buf), self.remaining, limit)]
        n = len(self._pending)
        view[:n] = self._pending
        self._pending = b""
        if cell is None:
            cell = Cell()  # nobody watches: one branch here instead of one per recv
        cell.n = n
        try:
            with self._operation():
                while n < len(view):
                    got = self._sock.recv_into(view[n:])
                    if not got:
                        raise Unavailable("server closed the connection mid-response")
                    n += got
                    cell.n = n
        except Unavailable as e:
            return self._took(n), e
        return self._took(n), None

    def _took(self, n: int) -> int:
        self.remaining -= n
        return n

    # -- the loop's side -----------------------------------------------------------------

    def release(self) -> None:
        """Back to the pool if the response was read cleanly, else closed."""
        if self.reusable and not self.remaining and not self._dead:
            self.pool._put(self.key, self)
        else:
            self.abort()

    def abort(self) -> None:
        """Never use this connection again; unblock a thread still reading it."""
        with self._lock:
            self.reusable = False
            if self._dead:
                return
            self._dead = True
            if self._busy:  # the reading thread closes it when its call returns
                try:
                    # The plain socket's shutdown even for TLS: SSLSocket.shutdown would drop the
                    # SSL object under the thread still reading through it.
                    socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
                except OSError:
                    pass
                return
        self._sock.close()

    @property
    def alive(self) -> bool:
        return not self._dead

    def _operation(self) -> _Operation:
        return _Operation(self)


class _Operation:
    """One blocking call on a connection: socket errors become Unavailable; an abort closes it after."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        conn = self._conn
        with conn._lock:
            if conn._dead:
                raise Unavailable("connection closed")
            conn._busy = True

    def __exit__(self, kind, error, tb) -> None:
        conn = self._conn
        with conn._lock:
            conn._busy = False
            aborted = conn._dead
        if aborted:
            conn._sock.close()
        if error is None:
            return
        conn.reusable = False
        if not aborted:
            conn.abort()
        if isinstance(error, TimeoutError | socket.timeout):
            raise Unavailable(f"no data for {conn.pool.read_timeout:g}s") from error
        if isinstance(error, OSError):
            raise Unavailable(f"connection lost: {error}") from error


class _Stale(Unavailable):
    """A kept-alive connection the server had closed: try a fresh one."""


class RawPool:
    """Keep-alive connections per origin for :meth:`get`, and the threads that read them."""

    def __init__(self, *, connect_timeout: float, read_timeout: float,
                 ssl_context: ssl.SSLContext | None = None, threads: int = _THREADS) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._ssl = ssl_context
        self._idle: dict[Key, list[_Connection]] = {}
        self._spares: list[Buffer] = []
        # One thread per connection in a blocking call: as many as the streams a pull runs.
        self.threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mc-net")

    def buffer(self) -> Buffer:
        """A BUFFER-sized buffer, recycled when nothing else refers to it any more.

        Fresh multi-MiB allocations cost page faults on every piece
        (measured: more kernel time than the copy itself). A buffer handed
        out earlier is free again once its only references are this list and
        the call's argument; that refcount test is CPython's, and safe: with
        no other reference, nobody can still read or write it. New buffers
        are anonymous mappings (:func:`anonymous_buffer`), whose pages are faulted in by the first
        ``recv_into``, in a reader thread, rather than zero-filled here on the
        event loop with the GIL held (measured: 0.35 s of a 2 GiB pull).
        Called on the event loop thread only.
        """
        for buf in self._spares:
            if sys.getrefcount(buf) == 3:  # the list, the loop variable, getrefcount's argument
                return buf
        buf = anonymous_buffer(BUFFER)
        if len(self._spares) < _SPARES:
            self._spares.append(buf)
        return buf

    def _put(self, key: Key, conn: _Connection) -> None:
        self._idle.setdefault(key, []).append(conn)

    async def get(self, url: str, headers: Mapping[str, str]) -> RawResponse:
        """Send a GET; return the response head (a body only for plain Content-Length bodies)."""
        parts = urlsplit(url)
        secure = parts.scheme == "https"
        port = parts.port or (443 if secure else 80)
        host = parts.hostname or ""
        proxy = check_request(url, headers, what=parts.netloc)
        key = (parts.scheme, host, port, proxy.url if proxy else "")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if proxy is not None and not secure:  # absolute form, and the proxy's own credentials if any
            target = f"http://{parts.netloc}{target}"
            headers = {**headers, **proxy.headers()}
        idle = self._idle.get(key) or []
        while idle:
            conn = idle.pop()
            if conn.alive:
                try:
                    return await self._ask(conn, target, parts.netloc, headers)
                except _Stale:
                    continue  # the server dropped it while idle: try the next one, or a new one
        conn = await self._run(self._connect, key, proxy)
        try:
            return await self._ask(conn, target, parts.netloc, headers)
        except _Stale as e:
            raise Unavailable(f"{parts.netloc}: {e}") from e

    async def _ask(self, conn: _Connection, target: str, host: str, headers: Mapping[str, str]) -> RawResponse:
        try:
            status, fields = await self._run(conn.request, target, host, headers)
        except BaseException:
            conn.abort()
            raise
        if conn.remaining or content_length(fields) == 0 and conn.reusable:
            return RawResponse(status, fields, conn.remaining, conn)
        conn.abort()  # no body of ours: the caller uses another client for this one
        return RawResponse(status, fields, None)

    def _connect(self, key: Key, proxy: Proxy | None = None) -> _Connection:
        scheme, host, port, _ = key
        where = (proxy.host, proxy.port) if proxy is not None else (host, port)
        try:
            sock = socket.create_connection(where, timeout=self.connect_timeout)
        except OSError as e:
            via = f" (proxy {proxy.url})" if proxy is not None else ""
            raise Unavailable(f"{where[0]}:{where[1]}{via}: cannot connect: {connection_failure(e)}") from e
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if proxy is not None and scheme == "https":
                try:
                    _tunnel(sock, host, port, proxy)
                except (TimeoutError, ConnectionError) as e:
                    if isinstance(e, ModelCacheError):
                        raise
                    raise Unavailable(f"proxy {proxy.url}: CONNECT {host}:{port}: {connection_failure(e)}") from e
            if scheme == "https":
                ctx = self._ssl or ssl.create_default_context()
                sock = ctx.wrap_socket(sock, server_hostname=host)
            sock.settimeout(self.read_timeout)
        except ModelCacheError:  # the tunnel's answer (Unavailable, Unauthorized are OSErrors too)
            sock.close()
            raise
        except ssl.SSLCertVerificationError as e:
            sock.close()
            # Not worth retrying: the same certificate comes back every time.
            raise ModelCacheError(f"{host}:{port}: TLS certificate not trusted ({e.verify_message}); "
                                  "add its CA to SSL_CERT_FILE") from e
        except OSError as e:
            sock.close()
            raise Unavailable(f"{host}:{port}: TLS handshake failed: {e}") from e
        except BaseException:
            sock.close()
            raise
        return _Connection(self, key, sock)

    def start_fill(self, conn: _Connection, meter: Meter | None = None, limit: int = BUFFER
                   ) -> tuple[asyncio.Future[tuple[int, BaseException | None]], Buffer, Cell | None]:
        """Start filling a fresh buffer from ``conn``'s body in a thread (counted in ``meter``), ``limit``
        bytes at most."""
        buf = self.buffer()
        cell = meter.open() if meter is not None else None
        return asyncio.get_running_loop().run_in_executor(self.threads, conn.fill, buf, cell, limit), buf, cell

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.threads, fn, *args)

    def close(self) -> None:
        """Close every idle connection and let the threads go."""
        for conns in self._idle.values():
            for conn in conns:
                conn.abort()
        self._idle.clear()
        self.threads.shutdown(wait=False)


def _tunnel(sock: socket.socket, host: str, port: int, proxy: Proxy) -> None:
    """Open a CONNECT tunnel to ``host:port`` through ``proxy`` on ``sock`` (RFC 9110 9.3.6; blocks)."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    lines += [f"{k}: {v}" for k, v in proxy.headers().items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    head = bytearray()
    while (end := head.find(b"\r\n\r\n")) < 0:
        if len(head) >= _MAX_HEAD:
            raise Unavailable(f"proxy {proxy.url}: CONNECT answer over 64 KiB")
        got = sock.recv(_MAX_HEAD - len(head))  # never past the head: the TLS handshake comes next
        if not got:
            raise Unavailable(f"proxy {proxy.url} closed the connection to CONNECT {authority}")
        head += got
    if end + 4 != len(head):
        raise Unavailable(f"proxy {proxy.url}: bytes after its CONNECT answer")
    try:
        status, _ = parse_head(bytes(head[:end]))
    except ValueError as e:
        raise Unavailable(f"proxy {proxy.url}: malformed CONNECT answer: {e}") from e
    if status == 407:
        raise Unauthorized(f"proxy {proxy.url} wants a login (HTTP 407): put USER:PASSWORD@ in HTTPS_PROXY")
    if not 200 <= status < 300:
        raise Unavailable(f"proxy {proxy.url}: CONNECT {authority} answered HTTP {status}")
