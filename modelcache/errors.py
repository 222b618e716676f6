"""One small exception tree for modelcache.

Everything the code raises on purpose is a :class:`ModelCacheError`. Each
subclass also inherits the built-in exception that fits, so generic handlers
keep working, and carries the wire codes it maps to at the edges: the CLI exit
code here, HTTP status and gRPC code in the daemon. Messages are one line and
say what to do, because they are shown to people as they are.
"""

from __future__ import annotations


class ModelCacheError(Exception):
    """Base of every error modelcache raises on purpose."""

    exit_code = 1
    http_status = 500


class InvalidReference(ModelCacheError, ValueError):
    """A reference, flag or glob that cannot be parsed."""

    exit_code = 2
    http_status = 400


class InvalidBody(InvalidReference):
    """A request body that is not what the API takes: not UTF-8, not JSON, nested too deeply, wrong shape."""


class NotFound(ModelCacheError, LookupError):
    """The model, tag, blob or file does not exist at its source."""

    exit_code = 3
    http_status = 404


class Unauthorized(ModelCacheError, PermissionError):
    """The source refused our credentials, or we had none to offer."""

    exit_code = 4
    http_status = 403


class Unauthenticated(ModelCacheError, PermissionError):
    """A caller of the daemon (HTTP API, a peer) gave no credential, or one that is not valid."""

    exit_code = 4
    http_status = 401


class Forbidden(ModelCacheError, PermissionError):
    """A known caller asked for something it may not have (a host path, an unauthorized verb)."""

    exit_code = 4
    http_status = 403


class InvalidContent(ModelCacheError, ValueError):
    """Bytes from a source that we refuse: bad digest, bad manifest, unsafe paths."""

    exit_code = 5
    http_status = 502


class DigestMismatch(InvalidContent):
    """Bytes whose sha256 is not the one they were announced with."""


class UnsafePath(InvalidContent):
    """A path in a layer that would escape the model directory, or a device file."""


class Conflict(ModelCacheError, FileExistsError):
    """A name already taken by something else (a volume target holding another mount)."""

    http_status = 409


class Unavailable(ModelCacheError, ConnectionError):
    """The source could not be reached, or kept failing after retries.

    Transfers retry these; ``retry_after`` is the source's own hint (seconds)
    when it gave one (``Retry-After`` on 429 and 503).
    """

    exit_code = 6
    http_status = 503

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RangeIgnored(Unavailable):
    """A source answered a request for part of a blob with all of it (HTTP 200 to a Range).

    Not a failure: the transfer engine reads that blob as one stream instead
    of asking ranges that would each restart at byte 0.
    """


class Busy(ModelCacheError, RuntimeError):
    """The daemon has as much work queued as it takes; ask again after ``retry_after`` seconds."""

    exit_code = 6
    http_status = 429

    def __init__(self, message: str, *, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NoSpace(ModelCacheError, OSError):
    """The store's disk (or its budget) has no room for what a pull needs, and nothing can be evicted."""

    exit_code = 7
    http_status = 507
