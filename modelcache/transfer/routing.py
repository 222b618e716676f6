"""Where each chunk comes from: one small interface, decided per chunk.

A :class:`ChunkRouter` names the sources to try for a chunk, best first; the
engine tries each in turn with that source's own attempt budget
(``ByteSource.attempts``, default the engine's retries) and backoff, and
moves on to the next at once when one misses or fails for good, so a peer
miss never waits out a backoff meant for the origin.

A :class:`PieceRouter` (peer-to-peer, issue 11) also says how a blob is cut
(its pieces are a function of the blob alone, so every node agrees), in
which order this node walks them, which per-piece sha256 list checks bytes
from untrusted sources (``ByteSource.trusted`` false), and hears back how
each source did. ``OriginOnly`` is the plain one: every chunk from the origin.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

from ..errors import NotFound
from ..model import Blob
from ..sources.base import ByteSource


class ChunkRouter(Protocol):
    """Chooses the sources to try for one chunk, best first."""

    def sources(self, blob: Blob, chunk: int) -> Sequence[ByteSource]:
        """Sources for chunk ``chunk`` of ``blob``, in order of preference."""
        ...


class NotYet(NotFound):
    """A source that does not hold the range yet but likely soon (a piece's home still starting its own pull):
    the engine fetches the blob's other pieces first and comes back to this one once."""


Outcome = str  # "ok" | "miss" (did not hold it) | "failed" (dead, stalled, refused) | "lied" (bad bytes)


@runtime_checkable
class PieceRouter(ChunkRouter, Protocol):
    """A router that also cuts blobs into pieces, orders them, checks them and hears how sources did."""

    def piece_size(self, blob: Blob) -> int:
        """The chunk size for ``blob``: the same on every node, whatever its own --chunk-size."""
        ...

    def order(self, blob: Blob, indexes: list[int]) -> list[int]:
        """The order this node fetches ``indexes`` of ``blob`` in."""
        ...

    async def piece_digests(self, blob: Blob) -> list[str] | None:
        """The sha256 (hex) of each piece of ``blob`` if some holder knows them, else None."""
        ...

    def report(self, source: ByteSource, blob: Blob, index: int, outcome: Outcome) -> None:
        """How ``source`` did for piece ``index`` of ``blob``."""
        ...

    def trusted(self, blob: Blob) -> Sequence[ByteSource]:
        """Sources whose bytes are trusted, for a refetch after a blob failed its digest check."""
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
