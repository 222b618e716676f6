"""How a range fetch ends other than with every byte: the signals between the engine's layers.

Guarantees: these never leave the engine; each is caught by the layer
named in its docstring (a caller outside sees :class:`Unavailable`,
:class:`DigestMismatch` or cancellation only).
"""

from __future__ import annotations

from ..errors import ModelCacheError, Unavailable
from ..sources.base import ByteSource


class WholeBody(Exception):
    """A source answered a chunk's range with the whole blob: read the blob as one stream from it
    (caught by the engine, which switches the blob to the sequential path)."""

    def __init__(self, source: ByteSource) -> None:
        super().__init__(source.name)
        self.source = source


class Deferred(ModelCacheError):
    """The piece's first source is not ready: fetch the blob's other pieces first (caught by the worker)."""


class Miss(ModelCacheError):
    """A source that does not hold the range (or refused it for good): the next source may (caught by failover)."""


class Partial(Unavailable):
    """A retryable failure after ``written`` bytes of the range were kept (caught by failover, which resumes)."""

    def __init__(self, written: int, cause: Unavailable) -> None:
        super().__init__(str(cause), retry_after=cause.retry_after)
        self.written = written
