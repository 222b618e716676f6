"""Shared HTTP plumbing for sources: sessions, status mapping, ranged reads, origins, connection errors."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol, TypeVar
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
A = TypeVar("A", bound="Answer")


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


REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5


class Answer(Protocol):
    """What :func:`follow_redirects` reads of a response (aiohttp's and the lean reader's both have it)."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...


async def follow_redirects(url: str, send: Callable[[str], Awaitable[A]], drop: Callable[[A], object], *,
                           what: str) -> tuple[str, A]:
    """``send(url)``, then again at each redirect's target; (the final URL, its response).

    The one redirect loop of the sources: at most :data:`MAX_REDIRECTS` hops,
    each checked by :func:`redirect_target`; ``drop`` releases a redirect's
    response. Whether credentials go along is ``send``'s to decide per URL
    (only to the origin that asked for them, see :func:`same_origin`).
    """
    for _ in range(MAX_REDIRECTS + 1):
        resp = await send(url)
        if resp.status not in REDIRECTS:
            return url, resp
        location = resp.headers.get("location")  # the lean reader's names are lower case; aiohttp's fold case
        drop(resp)
        url = redirect_target(url, location, what=what)
    raise InvalidContent(f"{what}: too many redirects")


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
    import email.utils  # here: a date in Retry-After is rare, and the email package costs every start-up

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# Statuses worth asking again (RFC 9110 15): 408 (the server closed an idle request), 425 (RFC 8470:
# resend, it is not early data any more), 429 (throttled, S3's SlowDown too when sent as 503), and the
# 5xx family, where the server or a gateway failed on its side (CDNs in front of registries add their
# own, Cloudflare's 520-530). Left out: the 5xx that name a permanent condition of the server or
# the exchange, not of the moment: 501 Not Implemented, 505 HTTP Version Not Supported, 506 Variant
# Also Negotiates, 508 Loop Detected, 510 Not Extended, 511 Network Authentication Required.
_FINAL_5XX = frozenset({501, 505, 506, 508, 510, 511})


def is_transient(status: int) -> bool:
    """Whether a request that got ``status`` is worth sending again unchanged."""
    return status in (408, 425, 429) or (500 <= status < 600 and status not in _FINAL_5XX)


def error_for_status(status: int, what: str, *, retry_after: str | None = None, not_found: str | None = None,
                     hint: str = "", detail: str = "") -> ModelCacheError:
    """The one mapping of a failed HTTP status to our errors, for every source and target.

    404 is :class:`NotFound` (``not_found`` replaces its message), 401 and 403
    :class:`Unauthorized` (``hint`` says what to check), 416 a blob whose size
    is not the one announced (:class:`InvalidContent`), the transient statuses
    (:func:`is_transient`) :class:`Unavailable` with the server's
    ``Retry-After``, and anything else a final :class:`ModelCacheError`.
    ``detail`` (the server's own words) is appended to the final ones.
    """
    if status == 404:
        return NotFound(not_found or f"{what}: not found (HTTP 404)")
    if status in (401, 403):
        return Unauthorized(f"{what}: access denied (HTTP {status})" + (f"; {hint}" if hint else ""))
    if status == 416:
        return InvalidContent(f"{what}: range not satisfiable (HTTP 416); the blob size differs from the manifest's")
    if is_transient(status):
        return Unavailable(f"{what}: HTTP {status}", retry_after=parse_retry_after(retry_after))
    return ModelCacheError(f"{what}: unexpected HTTP {status}" + (f": {detail}" if detail else ""))


def status_error(resp: aiohttp.ClientResponse, what: str, **kwargs: str) -> ModelCacheError:
    """:func:`error_for_status` for an aiohttp response."""
    return error_for_status(resp.status, what, retry_after=resp.headers.get("Retry-After"), **kwargs)


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
    raise error_for_status(status, what, retry_after=headers.get("retry-after"))


def content_range_start(value: str | None) -> int | None:
    # "bytes START-END/TOTAL" (RFC 9110 14.4)
    if not value or not value.startswith("bytes "):
        return None
    try:
        return int(value[6:].split("-", 1)[0])
    except ValueError:
        return None


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status and headers of an HTTP/1.x response head, without its blank line (RFC 9112 4, 5.2).

    Header names come lower-cased; a repeated field is joined with ", ". Raises ValueError if malformed.
    """
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


def content_length(headers: Mapping[str, str]) -> int | None:
    """The ``Content-Length`` of parsed headers (:func:`parse_head`), or None when absent or not a number."""
    value = headers.get("content-length")
    if value is None or not value.isdigit():
        return None
    return int(value)
