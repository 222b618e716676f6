"""The sequential path: a blob's missing chunks in order, from one body read once.

For a source that ignores Range (answers with the whole blob), and for
readers of a blob's bytes in order while it arrives (issue 13).

Guarantees:

- One request for the rest of the blob (:class:`~.onestream.OneStream`),
  reopened only after a failure, at the byte reached; retried per chunk as
  every chunk is (:mod:`.failover`), and kept on interrupt.
- A chunk's fdatasync runs beside the next chunk's download, not before it
  (:mod:`.durable`), bounded: before a chunk is handed over, the one handed
  before it is durable. So at most two chunks are in flight and not durable
  (one syncing, one arriving); a crash loses at most those, and resume
  counts only chunks recorded durable (``Ingest.mark_done`` returned).
- When it returns, every chunk it fetched is durable; when it fails or is
  cancelled, it first waits for the chunk being made durable (never
  abandoned: that chunk is kept for the next pull).
- It holds one of the engine's fair slots for the blob while it reads.
"""

from __future__ import annotations

import asyncio

from ..sources.base import ByteSource
from ..sources.http import STREAMING
from ..store.roles import Ingest
from .config import TransferConfig
from .durable import Durability
from .failover import fetch_range
from .iothreads import IOThreads
from .onestream import OneStream
from .routing import OriginOnly
from .slots import FairSlots
from .stats import Progress, TransferStats


async def read_in_order(threads: IOThreads, config: TransferConfig, slots: FairSlots, durability: Durability,
                        ingest: Ingest, source: ByteSource, stats: TransferStats, progress: Progress | None) -> None:
    """The chunks still missing, in order, from one body read once (reopened only after a failure)."""
    body = OneStream(source)
    streaming = STREAMING.set(True)
    syncing: asyncio.Task[None] | None = None  # the last chunk handed over, being made durable
    try:
        async with slots.slot(ingest.blob.digest):
            for index in ingest.missing():
                offset, length = ingest.chunk_range(index)
                await fetch_range(threads, config, ingest, index, offset, length, OriginOnly(body), [body], [],
                                  None, stats, progress, got=ingest.resume_at(index))
                if syncing is not None:
                    # The bound: one chunk syncing while the next arrives, never a queue of them
                    # (a slow disk then paces the stream instead of piling up bytes not durable).
                    # shield: a cancelled stream still lets the sync end (see finally).
                    await asyncio.shield(syncing)
                syncing = await durability.hand(ingest, index)
        if syncing is not None:
            await asyncio.shield(syncing)
    finally:
        if syncing is not None and not syncing.done():
            # Failed or cancelled: the chunk being made durable is waited for, not abandoned.
            await asyncio.wait([syncing])
            if not syncing.cancelled():
                syncing.exception()  # retrieved: the first error goes on
        STREAMING.reset(streaming)
        await body.close()
