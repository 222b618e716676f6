"""The two small interfaces every source implements, and the options they share.

This module names no concrete source (they import it); :mod:`.open` picks one for a reference.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from ..model import Blob, Model
from .credentials import SourceCredentials


class ByteSource(Protocol):
    """Somewhere the bytes of a blob can be read from, by range.

    ``read`` yields the bytes ``[offset, offset + length)`` of ``blob`` in
    pieces. It raises :class:`~modelcache.errors.Unavailable` for failures
    worth retrying (the caller retries from where the bytes stopped) and other
    :class:`~modelcache.errors.ModelCacheError` subclasses for final ones.
    """

    name: str

    def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes | memoryview]:
        """Yield the requested byte range of ``blob``."""
        ...


class Source(ByteSource, Protocol):
    """A resolvable reference that is also the origin of its blobs."""

    async def resolve(self) -> Model:
        """Resolve the reference to an immutable Model (manifests are verified)."""
        ...

    async def close(self) -> None:
        """Release connections and files."""
        ...


class Probe(Protocol):
    """A remote source that can check access without resolving the whole model."""

    @property
    def needed_credentials(self) -> bool:
        """After resolve: whether the origin gave the model only because we showed credentials."""
        ...

    async def probe(self) -> None:
        """Read the model's manifest (or listing, or revision) at the origin; raise if refused."""
        ...


@dataclass(frozen=True, slots=True)
class SourceOptions:
    """Knobs shared by sources (all have defaults)."""

    plain_http: bool = False
    connect_timeout: float = 30.0
    read_timeout: float = 30.0
    connections: int = 16
    # None: the daemon's own (Docker config, AWS chain, HF_TOKEN); set: only these (a pod's secret).
    credentials: SourceCredentials | None = None
