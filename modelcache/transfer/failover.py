"""One chunk's range from its sources in turn: per-source attempt budgets, backoff, hand-over at the byte reached.

Guarantees:

- Sources are tried in the router's order, each with its own attempt budget
  (:func:`.backoff.attempts`); a source that misses or fails for good hands
  over to the next at once, at the byte reached (no backoff between sources).
- Failures worth retrying (5xx, 429, resets, stalls, bodies cut short) are
  retried with the backoff of :mod:`.backoff`, resuming at the byte where
  the previous attempt stopped.
- A source ignoring Range raises :class:`~.outcomes.WholeBody`; a piece whose
  home is not ready yet may raise :class:`~.outcomes.Deferred` (only before
  any byte of it was written).
- Cancelled while it waits to retry, it keeps what it wrote of the chunk;
  cancelled mid-body, :func:`.rangecopy.copy_range` does.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..errors import ModelCacheError, RangeIgnored, Unavailable
from ..sources.base import ByteSource
from ..store.roles import Ingest
from . import backoff
from .config import TransferConfig
from .iothreads import IOThreads
from .outcomes import Deferred, Miss, Partial, WholeBody
from .rangecopy import copy_range
from .routing import ChunkRouter, NotYet, PieceRouter
from .stats import Progress, TransferStats

log = logging.getLogger(__name__)


async def fetch_range(threads: IOThreads, config: TransferConfig, ingest: Ingest, index: int, offset: int,
                      length: int, router: ChunkRouter, sources: list[ByteSource], used: list[ByteSource],
                      check: Any, stats: TransferStats, progress: Progress | None, *, defer: bool = False,
                      got: int = 0) -> None:
    """Write ``[offset + got, offset + length)`` of chunk ``index`` from ``sources`` in turn; the sources
    that gave bytes are appended to ``used``."""
    blob = ingest.blob
    for n, source in enumerate(sources):
        last = n == len(sources) - 1
        attempts = backoff.attempts(config, source, last)
        attempt = 0
        while True:
            try:
                got += await copy_range(threads, ingest, source, offset + got, length - got, stats, progress, check)
                if got != length:  # a source that ends early without saying so: retry the rest now
                    raise Unavailable(f"{source.name}: range of {blob.digest[:19]} ended after {got} "
                                      f"of {length} bytes")
                used.append(source)
                return
            except RangeIgnored as e:
                raise WholeBody(source) from e
            except ModelCacheError as e:
                if defer and n == 0 and got == 0 and isinstance(e, NotYet):
                    raise Deferred(str(e)) from e
                if isinstance(e, Partial):
                    got += e.written
                    if e.written:
                        used.append(source)
                if not last and not isinstance(e, Unavailable | Miss):
                    e = Miss(str(e))  # a final answer from a peer is a miss: the next source may have it
                if not isinstance(e, Unavailable | Miss):
                    raise
                attempt += 1
                if isinstance(router, PieceRouter):
                    router.report(source, blob, index, "miss" if isinstance(e, Miss) else "failed")
                if attempt >= attempts or isinstance(e, Miss):
                    if last:
                        raise Unavailable(f"{e} (gave up after {attempt} attempts)") from e
                    log.debug("chunk %d of %s: %s; next source", index, blob.digest[:19], e)
                    break  # the next source, at once, from the byte reached
                stats.chunks_retried += 1
                wait = backoff.delay(config, attempt, getattr(e, "retry_after", None))
                log.info("chunk %d of %s: %s; retry %d in %.1fs", index, blob.digest[:19], e, attempt, wait)
                try:
                    await asyncio.sleep(wait)
                except asyncio.CancelledError:
                    await threads.keep(ingest, index, offset + got)
                    raise
