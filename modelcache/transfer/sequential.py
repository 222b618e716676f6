"""The sequential path: a blob's missing chunks in order, from one body read once.

For a source that ignores Range (answers with the whole blob), and for
readers of a blob's bytes in order while it arrives (issue 13).

Guarantees:

- One request for the rest of the blob (:class:`~.onestream.OneStream`),
  reopened only after a failure, at the byte reached; retried per chunk as
  every chunk is (:mod:`.failover`), and kept on interrupt.
- Each chunk is made durable and recorded before the next is fetched; a
  crash loses at most the chunk in flight, and resume counts only durable
  bytes.
- It holds one of the engine's fair slots for the blob while it reads.
"""

from __future__ import annotations

from ..sources.base import ByteSource
from ..sources.http import STREAMING
from ..store.roles import Ingest
from .config import TransferConfig
from .failover import fetch_range
from .iothreads import IOThreads
from .onestream import OneStream
from .routing import OriginOnly
from .slots import FairSlots
from .stats import Progress, TransferStats


async def read_in_order(threads: IOThreads, config: TransferConfig, slots: FairSlots, ingest: Ingest,
                        source: ByteSource, stats: TransferStats, progress: Progress | None) -> None:
    """The chunks still missing, in order, from one body read once (reopened only after a failure)."""
    body = OneStream(source)
    streaming = STREAMING.set(True)
    try:
        async with slots.slot(ingest.blob.digest):
            for index in ingest.missing():
                offset, length = ingest.chunk_range(index)
                await fetch_range(threads, config, ingest, index, offset, length, OriginOnly(body), [body], [],
                                  None, stats, progress, got=ingest.resume_at(index))
                await threads.run(ingest.mark_done, index)
    finally:
        STREAMING.reset(streaming)
        await body.close()
