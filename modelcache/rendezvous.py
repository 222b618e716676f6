"""Rendezvous (highest random weight) hashing: who a key belongs to, best first.

Each member scores ``sha256(key | member)``; members ranked by score give a
key's home, its fallback and so on. Every node that sees the same members
computes the same order with no coordination, and a membership change moves
only the keys whose top scorers joined or left. Peers place pieces with it
(:mod:`modelcache.p2p.ring`) and the pre-warm controller chooses nodes with
it (:mod:`modelcache.kube.rendezvous`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def score(key: str, member: str) -> int:
    """The member's weight for ``key`` (bigger wins)."""
    return int.from_bytes(hashlib.sha256(f"{key}|{member}".encode()).digest()[:8], "big")


def rank(key: str, members: Iterable[str]) -> list[str]:
    """``members`` best first for ``key`` (ties, which sha256 makes vanishingly rare, by name)."""
    return sorted(set(members), key=lambda m: (score(key, m), m), reverse=True)
