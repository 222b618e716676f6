"""Shared HTTP plumbing for sources: sessions, status mapping, ranged reads, origins, connection errors."""

from __future__ import annotations

import email.utils
import os
import time
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

if TYPE_CHECKING:  # imported where used: S3 and Hub pulls never need the general client (0.2 s to import)
    import aiohttp

from ..errors import (
    InvalidContent,
    ModelCacheError,
    NotFound,
    RangeIgnored,
    Unauthorized,
    Unavailable,
)

READ_BUFSIZE = 1 << 20
Buffer = bytes | memoryview
# Set by a caller reading the rest of a blob as one stream: a 200 to its Range is expected, not news.
STREAMING: ContextVar[bool] = ContextVar("modelcache_streaming", default=False)


def new_session(*, connections: int, connect_timeout: float, read_timeout: float) -> aiohttp.ClientSession:
    """A session tuned for big downloads: large read buffer, per-read stall timeout."""
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, limit_per_host=connections, ttl_dns_cache=300),
        timeout=aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=read_timeout),
        read_bufsize=READ_BUFSIZE,
        auto_decompress=False,
    )


_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a URL, lower-cased, with the scheme's default port filled in (RFC 6454 4)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme)


def same_origin(a: str, b: str) -> bool:
    """True when both URLs are on one origin: the only place credentials for ``a`` may be sent."""
    return origin(a) == origin(b)


def redirect_target(url: str, location: str | None, *, what: str) -> str:
    """Where a redirect from ``url`` leads; refused content unless it is another http(s) URL.

    A registry or Hub that sends us to ``file:``, ``ftp:`` or anything else is
    not an origin that is down (nothing to retry) but an answer we refuse.
    """
    if not location:
        raise InvalidContent(f"{what}: redirect without Location")
    target = urljoin(url, location)
    if urlsplit(target).scheme not in ("http", "https"):
        raise InvalidContent(f"{what}: redirected to {target.split(':', 1)[0]}: URL {location[:80]!r}; "
                             "only http and https are followed")
    return target


def connection_failure(e: BaseException) -> str:
    """What went wrong on a connection, in words and without the client library's internals.

    ``Connection refused``, ``timed out``, ``Name or service not known``...
    aiohttp wraps the socket error (``ClientConnectorError: Cannot connect to
    host ... ssl:default [...]``); the OS error underneath is what a person
    needs to read.
    """
    cause: BaseException = getattr(e, "os_error", None) or e
    if isinstance(cause, TimeoutError) or type(cause).__name__ in ("ServerTimeoutError", "ConnectionTimeoutError"):
        return "timed out"
    if isinstance(cause, OSError) and isinstance(cause.errno, int) and cause.errno > 0:
        return os.strerror(cause.errno)  # asyncio's strerror is "Connect call failed (addr)"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    text = str(cause).strip()
    return text or type(cause).__name__


def retry_after(resp: aiohttp.ClientResponse) -> float | None:
    """Seconds from a response's ``Retry-After`` header, if any."""
    return parse_retry_after(resp.headers.get("Retry-After"))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` value: a delay or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def status_error(resp: aiohttp.ClientResponse, what: str) -> ModelCacheError:
    """The error for a failed response: retryable (Unavailable) or final."""
    status = resp.status
    if status == 404:
        return NotFound(f"{what}: not found (HTTP 404)")
    if status in (401, 403):
        return Unauthorized(f"{what}: access denied (HTTP {status})")
    if status == 429 or status >= 500 or status == 408:
        return Unavailable(f"{what}: HTTP {status}", retry_after=retry_after(resp))
    return ModelCacheError(f"{what}: unexpected HTTP {status}")


async def body_pieces(resp: aiohttp.ClientResponse, offset: int, length: int, *, skip: int, what: str) -> AsyncIterator[Buffer]:
    """Yield exactly ``length`` bytes of an aiohttp response body after dropping ``skip``."""
    import aiohttp

    async def pieces() -> AsyncIterator[Buffer]:
        try:
            async for piece in resp.content.iter_any():
                yield piece
        except (aiohttp.ClientError, TimeoutError) as e:
            raise Unavailable(f"{what}: connection failed: {connection_failure(e)}") from e

    async for piece in exact_range(pieces(), offset, length, skip=skip, what=what):
        yield piece


async def exact_range(pieces: AsyncIterator[Buffer], offset: int, length: int, *, skip: int,
                      what: str) -> AsyncIterator[Buffer]:
    """Yield exactly ``length`` bytes of a body after dropping ``skip``.

    ``skip`` is non-zero only when a server ignored our Range header and sent
    the whole blob. A body that ends early raises :class:`Unavailable`, so the
    caller retries from the last byte it got.
    """
    remaining = length
    if not remaining:
        return
    async for piece in pieces:
        if skip:
            if len(piece) <= skip:
                skip -= len(piece)
                continue
            piece, skip = piece[skip:], 0
        if len(piece) >= remaining:
            yield piece[:remaining]
            return
        remaining -= len(piece)
        yield piece
    raise Unavailable(f"{what}: body ended {remaining} bytes early (at byte {offset + length - remaining})")


def check_range_response(status: int, headers: dict[str, str], offset: int, length: int, what: str, *,
                         size: int | None = None) -> int:
    """Validate a ranged GET's status and range; return the bytes to skip (Range ignored).

    206 must start where asked; 200 means the server ignored the Range and the
    whole object is coming; other statuses become our errors (retryable or not).
    With the object's ``size``, a 200 to a range that stops short of its end
    raises :class:`RangeIgnored`: the caller reads the rest as one stream
    rather than restarting at byte 0 for every range (issue 10).
    """
    if status == 206:
        start = content_range_start(headers.get("content-range"))
        if start != offset:
            raise Unavailable(f"{what}: asked for byte {offset}, got a range from {start}")
        return 0
    if status == 200:
        if size is not None and offset + length < size and not STREAMING.get():
            raise RangeIgnored(f"{what}: the server ignores byte ranges (HTTP 200 to a Range)")
        return offset  # Range ignored: the whole blob is coming
    if status == 416:
        raise InvalidContent(f"{what}: range {offset}+{length} not satisfiable; blob size differs from manifest")
    if status == 404:
        raise NotFound(f"{what}: not found")
    if status in (401, 403):
        raise Unauthorized(f"{what}: access denied (HTTP {status})")
    if status in (408, 429) or status >= 500:
        raise Unavailable(f"{what}: HTTP {status}", retry_after=parse_retry_after(headers.get("retry-after")))
    raise ModelCacheError(f"{what}: unexpected HTTP {status}")


def content_range_start(value: str | None) -> int | None:
    # "bytes START-END/TOTAL" (RFC 9110 14.4)
    if not value or not value.startswith("bytes "):
        return None
    try:
        return int(value[6:].split("-", 1)[0])
    except ValueError:
        return None
