"""The two small interfaces every source implements, and the factory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from ..model import Blob, Model
from ..refs import DirRef, HfRef, LayoutRef, OciRef, Ref, S3Ref
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


def open_source(ref: Ref, options: SourceOptions, *,
                learned: Callable[[str], str | None] | None = None) -> Source:
    """The source that serves ``ref``; ``learned`` maps an origin's key to a sha256 already known."""
    if isinstance(ref, OciRef):
        from .registry import RegistrySource

        return RegistrySource(ref, options)
    if isinstance(ref, LayoutRef):
        from .layout import LayoutSource

        return LayoutSource(ref)
    if isinstance(ref, HfRef):
        from .hf import HfSource

        return HfSource(ref, options, learned=learned)
    if isinstance(ref, S3Ref):
        from .s3 import S3Source

        return S3Source(ref, options, learned=learned)
    if isinstance(ref, DirRef):
        from .local import DirectorySource

        return DirectorySource(ref)
    raise TypeError(f"no source for {ref!r}")
