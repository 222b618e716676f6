"""Which peers a piece belongs to, in order: rendezvous hashing of the piece's name.

The home of a piece is the member ranked first for its key, the fallback the
next, and so on (:mod:`modelcache.rendezvous`).
"""

from __future__ import annotations

from ..rendezvous import rank, score

__all__ = ["piece_key", "rank", "score"]


def piece_key(digest: str, index: int) -> str:
    """The name of piece ``index`` of a blob (for unverified blobs the digest is the source's stable key)."""
    return f"{digest}/{index}"
