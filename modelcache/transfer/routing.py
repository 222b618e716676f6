"""Where each chunk comes from: one small interface, decided per chunk.

Today every chunk comes from the origin. Peer-to-peer sharing plugs in here
by returning peers first and the origin last; the engine tries the sources in
order and moves on when one fails.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from ..model import Blob
from ..sources.base import ByteSource


class ChunkRouter(Protocol):
    """Chooses the sources to try for one chunk, best first."""

    def sources(self, blob: Blob, chunk: int) -> Sequence[ByteSource]:
        """Sources for chunk ``chunk`` of ``blob``, in order of preference."""
        ...


class OriginOnly:
    """Every chunk from the origin."""

    def __init__(self, origin: ByteSource) -> None:
        self._origin = (origin,)

    def sources(self, blob: Blob, chunk: int) -> Sequence[ByteSource]:
        """Just the origin."""
        return self._origin


class WithinOrigin:
    """Reads files that sit inside larger origin blobs (single-file tar layers).

    ``spans`` maps a file's digest to (the origin blob holding it, the offset
    of its bytes there); other blobs are read from the origin as they are.
    """

    def __init__(self, origin: ByteSource, spans: dict[str, tuple[Blob, int]]) -> None:
        self.name = origin.name
        self._origin = origin
        self._spans = spans

    def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes | memoryview]:
        """Read ``blob``'s range, translated into its origin blob when it has one."""
        span = self._spans.get(blob.digest)
        if span is None:
            return self._origin.read(blob, offset, length)
        origin, base = span
        return self._origin.read(origin, base + offset, length)
