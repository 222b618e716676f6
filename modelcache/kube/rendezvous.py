"""Choosing ``count`` of the matching nodes for a model: rendezvous (highest random weight) hashing.

Each node's weight for a model is sha256 over ``model``, a NUL and the node's
name; the ``count`` heaviest nodes are chosen. Every daemon computes the same
answer from the same node list without talking to the others, and when nodes
come or go only the choices that must change do: a node joining takes a
place only if it outweighs a chosen one, a node leaving hands its place to
the next heaviest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def weight(model: str, node: str) -> int:
    """The node's weight for the model (bigger wins)."""
    return int.from_bytes(hashlib.sha256(f"{model}\0{node}".encode()).digest()[:8], "big")


def choose(model: str, nodes: Iterable[str], count: int | None) -> list[str]:
    """The chosen nodes, heaviest first: all of them when ``count`` is None."""
    ranked = sorted(set(nodes), key=lambda n: (weight(model, n), n), reverse=True)
    return ranked if count is None else ranked[:count]
