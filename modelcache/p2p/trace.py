"""Per-piece timelines of the peer exchange, for diagnosis (off unless ``MODELCACHE_PEER_TRACE`` is set).

With the variable set (to anything but ``0`` or empty), each daemon logs one
line per event at INFO on the ``modelcache.p2p.trace`` logger::

    peertrace t=<monotonic s> ev=<event> d=<blob digest, 12 hex> at=<offset> n=<bytes> who=<peer URL or ->

Events: ``origin-start``/``origin-end`` (a range read from the origin;
``origin-gap`` before its end: ``n`` the longest wait in ms between two
hand-offs of its bytes, ``who`` the bytes received before it),
``get-start``/``get-end`` (a range asked of a peer; ``n`` what came),
``serve-start``/``serve-end`` (a range sent to the peer ``who``; ``n`` what
went out), ``home-wait`` (a home waited ``n`` ms for a piece it fetches),
``report-miss``/``report-failed``/``report-lied`` (a peer's outcome for piece ``at``, an index).
``t`` is ``time.monotonic()``, one clock for every process on the host
(network namespaces do not change it), so the lines of several daemons merge
into one timeline (``tests/netns_support.py``'s ``timeline``; ``tools/bench_peers.py --trace``).
Off, a call costs one attribute lookup.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator

from ..model import Blob
from ..sources.base import ByteSource

log = logging.getLogger("modelcache.p2p.trace")
ON = os.environ.get("MODELCACHE_PEER_TRACE", "0") not in ("", "0")


def event(ev: str, digest: str, at: int, n: int = 0, who: str = "-") -> None:
    """Log one event (only when tracing is on)."""
    if ON:
        log.info("peertrace t=%.4f ev=%s d=%s at=%d n=%d who=%s", time.monotonic(), ev,
                 digest.rpartition(":")[2][:12], at, n, who)


class TracedOrigin:
    """The origin as a byte source that logs when each range starts and ends."""

    def __init__(self, origin: ByteSource) -> None:
        self.name = origin.name
        self._origin = origin
        for attr in ("trusted", "attempts"):
            if hasattr(origin, attr):
                setattr(self, attr, getattr(origin, attr))

    async def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes | memoryview]:
        """The range from the origin, timed."""
        event("origin-start", blob.digest, offset, length)
        got = 0
        last = time.monotonic()
        gap, gap_at = 0.0, 0
        try:
            async for block in self._origin.read(blob, offset, length):
                now = time.monotonic()
                if now - last > gap:
                    gap, gap_at = now - last, got
                last = now
                got += len(block)
                if got >= length:
                    event("origin-gap", blob.digest, offset, int(gap * 1000), str(gap_at))
                if got >= length:
                    event("origin-end", blob.digest, offset, got)  # a reader that stops here never resumes us
                yield block
        finally:
            if got < length:
                event("origin-end", blob.digest, offset, got)
