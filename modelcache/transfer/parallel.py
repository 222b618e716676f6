"""The parallel path: workers taking a blob's chunks from its queue, one range each, in order.

Guarantees:

- A worker takes a chunk only once it holds one of the engine's fair slots
  (:mod:`.slots`), so each blob's chunks start in order and several blobs
  share the slots fairly.
- The slot is given back before the chunk's fdatasync, which runs beside
  the next range's fetch (:mod:`.durable`); the chunk counts as done only
  once durable.
- A piece whose home is not ready (:class:`~.outcomes.Deferred`) comes
  back one round of slots later (``concurrency`` chunks on), once; any
  other failure is told to whoever waits on the piece and ends the worker.
"""

from __future__ import annotations

import asyncio
from collections import deque

from ..store.roles import Ingest
from .durable import Durability
from .homes import Homes
from .outcomes import Deferred
from .pieces import PieceChecks
from .slots import FairSlots
from .stats import Progress, TransferStats


async def work(slots: FairSlots, checks: PieceChecks, homes: Homes, durability: Durability, ingest: Ingest,
               todo: deque[int], stats: TransferStats, progress: Progress | None, trusted_only: bool,
               concurrency: int) -> None:
    """Fetch chunks from ``todo`` until it is empty."""
    digest = ingest.blob.digest
    while todo:
        # The chunk is taken only once a slot is held, so each blob's chunks start in order;
        # the slot is given back before the fdatasync, so the next range is already coming.
        async with slots.slot(digest):
            if not todo:
                return
            index = todo.popleft()
            future = asyncio.get_running_loop().create_future()
            homes.pieces[(digest, index)] = future
            try:
                await checks.fetch_chunk(ingest, index, stats, progress, trusted_only, defer=bool(todo))
            except Deferred as e:
                homes.settle(digest, index, e)
                # A few pieces later (one per slot), then on: at the queue's end, a late home's first pieces
                # all came back at the end of every peer's pull, from that home alone (issue 11).
                todo.insert(min(len(todo), concurrency), index)
                continue
            except BaseException as e:
                homes.settle(digest, index, e)
                raise
        # Made durable beside the next fetch, not before it: on a busy disk an fdatasync takes
        # seconds, and the network would sit idle meanwhile (issue 13: S3 against rclone).
        await durability.hand(ingest, index)


async def stop(workers: list[asyncio.Task[None]]) -> None:
    """Cancel the workers not already being cancelled (a second cancel would cut their cleanup short); wait."""
    for w in workers:
        if not w.done() and not w.cancelling():
            w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
