"""How a blob is cut into pieces for peers: a function of the blob's size alone.

Every node must agree on piece ``i`` of a blob whatever its own
``--chunk-size``, so the piece length is derived from the content length,
as Dragonfly does: the smallest power-of-two multiple of ``minimum`` that
cuts the blob into at most :data:`TARGET_PIECES` pieces, capped at
``maximum``. ``minimum`` must be the same on every node (4 MiB unless a
test shrinks it with ``MODELCACHE_PEER_PIECE_MIN``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

MIN_PIECE = 4 << 20
MAX_PIECE = 64 << 20
TARGET_PIECES = 1024
_READ = 4 << 20


def piece_minimum() -> int:
    """The cluster's smallest piece: 4 MiB, or the test-only ``MODELCACHE_PEER_PIECE_MIN`` (bytes)."""
    value = os.environ.get("MODELCACHE_PEER_PIECE_MIN", "")
    return int(value) if value.isdigit() and int(value) > 0 else MIN_PIECE


def piece_size(size: int, minimum: int = MIN_PIECE, maximum: int = MAX_PIECE) -> int:
    """The piece length for a blob of ``size`` bytes."""
    piece = minimum
    while piece < maximum and size > piece * TARGET_PIECES:
        piece *= 2
    return piece


def piece_count(size: int, piece: int) -> int:
    """How many pieces a blob of ``size`` has (an empty blob has one, empty)."""
    return max(1, -(-size // piece))


def digest_list(read: Callable[[int, int], bytes], size: int, piece: int) -> list[str]:
    """The sha256 (hex) of every piece, reading through ``read(offset, length)`` (blocks)."""
    out = []
    for start in range(0, max(size, 1), piece):
        h = hashlib.sha256()
        end = min(start + piece, size)
        at = start
        while at < end:
            block = read(at, min(_READ, end - at))
            if not block:
                raise OSError(f"short read at {at}")
            h.update(block)
            at += len(block)
        out.append(h.hexdigest())
    return out


class PieceHasher:
    """The piece digest list of a stream of ``size`` bytes fed in order, in one pass (no read back).

    ``modelcache package`` uses it while it hashes a layer, so the list it
    records is cut exactly as :func:`digest_list` cuts a committed blob.
    """

    def __init__(self, size: int, piece: int) -> None:
        self.size, self.piece = size, piece
        self.digests: list[str] = []
        self._hash = hashlib.sha256()
        self._left = min(piece, size)  # bytes still to come in the current piece
        self._fed = 0

    def update(self, data: bytes | memoryview) -> None:
        """Feed the next bytes of the stream."""
        view = memoryview(data)
        while len(view):
            if self._left == 0:
                raise ValueError(f"more than the {self.size} bytes announced")
            take = view[:self._left]
            self._hash.update(take)
            self._left -= len(take)
            self._fed += len(take)
            view = view[len(take):]
            if self._left == 0 and self._fed < self.size:
                self._close_piece()

    def _close_piece(self) -> None:
        self.digests.append(self._hash.hexdigest())
        self._hash = hashlib.sha256()
        self._left = min(self.piece, self.size - self._fed)

    def result(self) -> list[str]:
        """The list (call once every byte is fed)."""
        if self._fed != self.size:
            raise ValueError(f"{self._fed} of {self.size} bytes fed")
        return [*self.digests, self._hash.hexdigest()]
