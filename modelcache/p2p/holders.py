"""A piece's home remembers who holds each piece it served, and decides whom to send the next requester to.

Pure bookkeeping, no I/O: the peer server (:mod:`.server`) keeps one
:class:`Holders` and asks it, for every ``home``-mode request of a piece it
holds, whether to serve the bytes itself (None) or answer 307 with a
holder's URL; the cluster simulator (``tools/sim_p2p.py``) drives the same
object. Keys are ``(blob digest, piece start offset)``.
"""

from __future__ import annotations

Key = tuple[str, int]


class Holders:
    """The holders of each piece, and a sweep over them that hands out the next requesters.

    Requests for a piece are handed out in sweeps: each sweep sends one
    requester to each holder known when the sweep began (and the home serves
    one itself), in the order they became holders. A requester sent to a
    holder counts as a holder from then on (it gets the piece from that
    holder, or from the home in ``held`` mode if the holder lacks it), but
    only from the next sweep, so it has a sweep's time to receive it. The
    holders double with every sweep, a broadcast tree: a home serves about
    log2(N) of a piece's N requesters instead of most of them, and each
    holder a few, so no node serves everyone.
    """

    def __init__(self) -> None:
        self._held: dict[Key, list[str]] = {}  # piece -> holders, in the order they became holders
        self._known: dict[Key, set[str]] = {}  # the same as sets (a piece can have thousands of holders)
        self._sweep: dict[Key, tuple[int, int]] = {}  # piece -> (next slot, slots in this sweep)

    def served(self, key: Key, requester: str) -> None:
        """``requester`` got the piece ``key`` whole from us: it holds it now."""
        self._add(key, requester)

    def _add(self, key: Key, holder: str) -> None:
        known = self._known.setdefault(key, set())
        if holder not in known:
            known.add(holder)
            self._held.setdefault(key, []).append(holder)

    def held(self, key: Key) -> list[str]:
        """The holders we know of for ``key``, in the order they became holders."""
        return list(self._held.get(key, ()))

    def next_holder(self, key: Key, requester: str | None) -> str | None:
        """The holder to send ``requester`` to (it then counts as one), or None: we serve it ourselves."""
        holders = self._held.get(key, [])
        at, end = self._sweep.get(key, (0, 0))
        while True:
            if at > end:  # a new sweep over every holder known now, the home first
                at, end = 0, len(holders)
            slot, at = at, at + 1
            if slot == 0 or holders[slot - 1] != requester:
                break
        self._sweep[key] = (at, end)
        if slot == 0:
            return None
        holder = holders[slot - 1]
        if requester:
            self._add(key, requester)
        return holder
