"""The membership as this node sees it: discovered URLs, minus itself, minus peers benched for a while.

A daemon never counts itself: its own URL is known when it matches
``--listen``, or learnt when a peer answers with this daemon's own node id
(``X-Modelcache-Node``; DNS returns our own address too). A peer that failed
(dead, refused) is benched for :data:`FAILED_PAUSE` seconds, one that
served bytes failing their check for :data:`LIED_PAUSE`: a benched peer
drops out of the ranking, so the next candidate becomes the piece's home. A
peer that timed out (``slow``: stalled, or only late on a loaded machine)
is benched at its :data:`SLOW_STRIKES`-th timeout with no answer between.
"""

from __future__ import annotations

import time

from .discovery import Discovery

FAILED_PAUSE = 10.0
LIED_PAUSE = 300.0
SLOW_STRIKES = 3


class Members:
    """Live peers for ranking, and their health."""

    def __init__(self, discovery: Discovery, node_id: str, *, me: str | None = None) -> None:
        self.discovery = discovery
        self.node_id = node_id
        self.me = me  # this daemon's URL as peers name it, once known
        self._selves: set[str] = {me} if me else set()
        self._benched: dict[str, float] = {}
        self._strikes: dict[str, int] = {}  # timeouts since the peer's last answer

    def found_self(self, url: str) -> None:
        """``url`` answered with our own node id: it is us."""
        self._selves.add(url)
        if self.me is None:
            self.me = url

    def is_self(self, url: str) -> bool:
        """True when ``url`` is this daemon."""
        return url in self._selves

    def peers(self) -> list[str]:
        """Discovered peers that are not us and not benched."""
        now = time.monotonic()
        return sorted(u for u in self.discovery.urls()
                      if u not in self._selves and self._benched.get(u, 0.0) <= now)

    def ranking(self) -> list[str]:
        """The members pieces are hashed over: the live peers and, when known, ourselves."""
        return self.peers() + ([self.me] if self.me else [])

    def bench(self, url: str, seconds: float) -> None:
        """Leave ``url`` out for ``seconds``."""
        self._benched[url] = max(self._benched.get(url, 0.0), time.monotonic() + seconds)

    def report(self, url: str, outcome: str) -> None:
        """How a peer did: ``failed`` and ``lied`` bench it, ``slow`` at the :data:`SLOW_STRIKES`-th time in a
        row; ``ok`` and ``miss`` (it answered) clear its strikes."""
        if outcome == "slow":
            self._strikes[url] = strikes = self._strikes.get(url, 0) + 1
            if strikes >= SLOW_STRIKES:
                self._strikes.pop(url, None)
                self.bench(url, FAILED_PAUSE)
        elif outcome == "failed":
            self.bench(url, FAILED_PAUSE)
        elif outcome == "lied":
            self.bench(url, LIED_PAUSE)
        else:
            self._strikes.pop(url, None)
