"""A piece's home remembers who holds each piece it served, and decides whom to send the next requester to.

Pure bookkeeping, no I/O: the peer server (:mod:`.server`) keeps one
:class:`Holders` and asks it, for every ``home``-mode request of a piece it
holds, whether to serve the bytes itself (None) or answer 307 with a
holder's URL; the cluster simulator (``tools/sim_p2p.py``) drives the same
object. Keys are ``(blob digest, piece start offset)``.

A home that is not fetching a blob itself (it pulls another model, or its
own pull of this one has not started yet) cannot fetch a piece from the
origin: it has no access of its own to the model. It still keeps the piece
to one origin fetch: the first requester is elected to fetch it
(:meth:`Holders.elect`), and the requesters after it are sent to that one
as their home, until the election lapses (:data:`ELECTION_SECONDS`, after
which a requester that died or left no longer draws others). When the home
then pulls the blob itself (it was asked before its own pull began: a race
under load), its router asks the elected requester first
(:meth:`Holders.elected`), not the origin.
"""

from __future__ import annotations

Key = tuple[str, int]
ELECTION_SECONDS = 30.0
_ELECTIONS = 100_000  # kept at most; past it, lapsed ones are dropped


class Holders:
    """The holders of each piece, a sweep over them that hands out the next requesters, and elections.

    Requests for a piece are handed out in sweeps: each sweep sends one
    requester to each holder known when the sweep began (and the home serves
    one itself), in the order they became holders. A requester sent to a
    holder counts as a holder from then on (it gets the piece from that
    holder, or from the home in ``held`` mode if the holder lacks it), but
    only from the next sweep, so it has a sweep's time to receive it. The
    holders double with every sweep, a broadcast tree: a home serves about
    log2(N) of a piece's N requesters instead of most of them, and each
    holder a few, so no node serves everyone. A requester sent to a holder
    that lacks the piece costs one quick miss, never an origin fetch: the
    home serves it in ``held`` mode.
    """

    def __init__(self) -> None:
        self._held: dict[Key, list[str]] = {}  # piece -> holders, in the order they became holders
        self._known: dict[Key, set[str]] = {}  # the same as sets (a piece can have thousands of holders)
        self._sweep: dict[Key, tuple[int, int]] = {}  # piece -> (next slot, slots in this sweep)
        self._elected: dict[Key, tuple[str, float]] = {}  # piece -> (requester fetching it, when elected)

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

    def elect(self, key: Key, requester: str, now: float) -> str | None:
        """For a piece nobody here fetches: None when ``requester`` is to fetch it from the origin (it asked
        first, or the one elected before lapsed), else the elected requester to send it to."""
        chosen = self._elected.get(key)
        if chosen is not None and chosen[0] != requester and now - chosen[1] < ELECTION_SECONDS:
            return chosen[0]
        if chosen is None and len(self._elected) >= _ELECTIONS:
            self._elected = {k: v for k, v in self._elected.items() if now - v[1] < ELECTION_SECONDS}
        if chosen is None or chosen[0] != requester:
            self._elected[key] = (requester, now)
        return None

    def elected(self, key: Key, now: float) -> str | None:
        """The requester elected to fetch ``key``, while its election lasts."""
        chosen = self._elected.get(key)
        return chosen[0] if chosen is not None and now - chosen[1] < ELECTION_SECONDS else None
