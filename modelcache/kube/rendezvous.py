"""Choosing ``count`` of the matching nodes for a model: rendezvous hashing of model and node.

The ``count`` nodes that rank highest for the model (:mod:`modelcache.rendezvous`)
are chosen. Every daemon computes the same answer from the same node list
without talking to the others, and when nodes come or go only the choices
that must change do: a node joining takes a place only if it outranks a
chosen one, a node leaving hands its place to the next.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..rendezvous import rank


def choose(model: str, nodes: Iterable[str], count: int | None) -> list[str]:
    """The chosen nodes, best first: all of them when ``count`` is None."""
    ranked = rank(model, nodes)
    return ranked if count is None else ranked[:count]
