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
which a requester that died or left no longer draws others).
"""

from __future__ import annotations

Key = tuple[str, int]
ELECTION_SECONDS = 30.0
_ELECTIONS = 100_000  # kept at most; past it, lapsed ones are dropped


class Holders:
    """Requesters served each piece whole, and the turn of the next redirect."""

    def __init__(self) -> None:
        self._held: dict[Key, list[str]] = {}  # piece -> requesters served whole, in order
        self._known: dict[Key, set[str]] = {}  # the same as sets (a piece can have thousands of holders)
        self._turn: dict[Key, int] = {}
        self._elected: dict[Key, tuple[str, float]] = {}  # piece -> (requester fetching it, when elected)

    def served(self, key: Key, requester: str) -> None:
        """``requester`` got the piece ``key`` whole from us: it holds it now."""
        known = self._known.setdefault(key, set())
        if requester not in known:
            known.add(requester)
            self._held.setdefault(key, []).append(requester)

    def held(self, key: Key) -> list[str]:
        """The holders we know of for ``key``, in the order they became holders."""
        return list(self._held.get(key, ()))

    def next_holder(self, key: Key, requester: str | None) -> str | None:
        """Every other request for a piece goes to a holder we served before, in turn; the rest we serve."""
        holders = [h for h in self._held.get(key, []) if h != requester]
        if not holders:
            return None
        turn = self._turn[key] = self._turn.get(key, 0) + 1
        slot = turn % (len(holders) + 1)
        return None if slot == 0 else holders[slot - 1]

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
