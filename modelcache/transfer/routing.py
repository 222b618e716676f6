"""Where each chunk comes from: one small interface, decided per chunk.

Today every chunk comes from the origin. Peer-to-peer sharing plugs in here
by returning peers first and the origin last; the engine tries the sources in
order and moves on when one fails.
"""

from __future__ import annotations

from collections.abc import Sequence
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
