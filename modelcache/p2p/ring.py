"""Rendezvous (highest random weight) hashing: which peers a piece belongs to, in order.

Each member scores ``sha256(key | member)``; the highest is the piece's home,
the next its fallback, and so on. A membership change moves only the keys
whose top scorer joined or left, and every node that sees the same members
computes the same order, with no coordination.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def piece_key(digest: str, index: int) -> str:
    """The name of piece ``index`` of a blob (for unverified blobs the digest is the source's stable key)."""
    return f"{digest}/{index}"


def score(key: str, member: str) -> int:
    """The member's weight for ``key``."""
    return int.from_bytes(hashlib.sha256(f"{key}|{member}".encode()).digest()[:8], "big")


def rank(key: str, members: Iterable[str]) -> list[str]:
    """``members`` best first for ``key``: home, fallback, then the rest."""
    return sorted(set(members), key=lambda m: score(key, m), reverse=True)
