"""One chunk fetched whole, and checked per piece when untrusted bytes went in.

Guarantees:

- A chunk is written whole into the ingest (the caller makes it durable),
  from the router's sources in turn (:mod:`.failover`), resuming after the
  bytes an interrupted pull kept.
- Bytes from a source that is not trusted (a peer) are checked against the
  router's per-piece digest list when there is one: a bad piece is rewound,
  its sources reported ``lied``, and fetched again with them excluded, at
  most :data:`PIECE_ROUNDS` times. A piece resumed midway is checked at
  commit instead (its check hash would not cover it whole).
- The blobs that took untrusted bytes, and from whom, are recorded here so
  that a commit failing its digest refetches from trusted sources only and
  reports the contributors.
- A piece whose home is not ready is put back once (:class:`~.outcomes.Deferred`),
  never twice, so the walk always ends.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

from ..errors import Unavailable
from ..sources.base import ByteSource
from ..store.roles import Ingest
from .config import TransferConfig
from .failover import fetch_range
from .iothreads import IOThreads
from .outcomes import Deferred
from .routing import ChunkRouter, PieceRouter
from .stats import Progress, TransferStats

log = logging.getLogger(__name__)

PIECE_ROUNDS = 3  # a piece failing its check is fetched again, with the liars excluded, this many times at most


class PieceChecks:
    """Fetches chunks whole, checking untrusted pieces; remembers which blobs took untrusted bytes."""

    def __init__(self, threads: IOThreads, config: TransferConfig, router_of: Callable[[str], ChunkRouter]) -> None:
        self._threads = threads
        self._config = config
        self._router_of = router_of  # the router of a pull still waiting on the blob (raises when none is)
        self.digests: dict[str, list[str]] = {}  # blob -> sha256 per piece, when a holder knows them
        self.contributors: dict[str, set[ByteSource]] = {}  # blob -> untrusted sources that gave it bytes
        self.untrusted: dict[str, bool] = {}  # blob -> untrusted bytes went in (a commit mismatch refetches)
        self.deferred: set[tuple[str, int]] = set()  # pieces put back once because their home was not ready

    async def fetch_chunk(self, ingest: Ingest, index: int, stats: TransferStats, progress: Progress | None,
                          trusted_only: bool, *, defer: bool = False) -> None:
        """Write chunk ``index`` whole into the ingest (the caller makes it durable).

        Sources are tried in the router's order, each with its own attempt
        budget; a piece that contains untrusted bytes and fails its digest is
        rewound and fetched again, the sources that gave it reported.
        """
        blob = ingest.blob
        offset, length = ingest.chunk_range(index)
        if length == 0:  # an empty blob: nothing to ask anyone for
            return
        for _ in range(PIECE_ROUNDS):
            router = self._router_of(blob.digest)
            sources = list(router.trusted(blob) if trusted_only and isinstance(router, PieceRouter)
                           else router.sources(blob, index))
            kept = ingest.resume_at(index)  # bytes an interrupted pull kept: the rest is asked for
            # A piece's check hash covers it whole; one resumed midway is checked at commit instead.
            expected = self.digests.get(blob.digest) if not kept else None
            check = hashlib.sha256() if expected is not None else None
            used: list[ByteSource] = []
            key = (blob.digest, index)
            defer = defer and key not in self.deferred
            try:
                await fetch_range(self._threads, self._config, ingest, index, offset, length, router, sources, used,
                                  check, stats, progress, defer=defer, got=kept)
            except Deferred:
                self.deferred.add(key)
                raise
            self.deferred.discard(key)
            untrusted = [s for s in used if not getattr(s, "trusted", True)]
            if untrusted:
                self.contributors.setdefault(blob.digest, set()).update(untrusted)
                self.untrusted[blob.digest] = True
            if check is None or expected is None or not untrusted or check.hexdigest() == expected[index]:
                if isinstance(router, PieceRouter):
                    for source in used:
                        router.report(source, blob, index, "ok")
                return
            log.warning("piece %d of %s from %s failed its check: fetching it again elsewhere",
                        index, blob.digest[:19], ", ".join(s.name for s in untrusted))
            for source in untrusted:
                if isinstance(router, PieceRouter):
                    router.report(source, blob, index, "lied")
            await self._threads.run(ingest.rewind, index)
            stats.bytes_done -= length
            stats.bytes_fetched -= length
        raise Unavailable(f"piece {index} of {blob.digest[:19]} failed its check {PIECE_ROUNDS} times")
