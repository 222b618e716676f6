"""One byte range copied from a source into an ingest, straight from the socket.

Guarantees:

- Bytes go from the reader to positional writes in the I/O threads in
  batches of :data:`WRITE_BLOCK` (a few MiB buffered per stream, never a
  whole chunk or file); one write at a time per range, in order, so a
  piece's check hash is fed in order.
- Never a byte past the range, whatever the source sends.
- A retryable failure mid-body still writes what arrived, and
  :class:`~.outcomes.Partial` says how many bytes, so the caller resumes
  after them. Cancelled, it writes what arrived (the reader's buffer
  included, through :mod:`.hangup`) and keeps it durable before the
  cancellation goes on.
- The range is not made durable here (the caller does that per chunk).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from ..errors import RangeIgnored, Unavailable
from ..sources.base import ByteSource
from ..store.roles import Ingest
from .hangup import HANGUP, Hangup
from .iothreads import IOThreads
from .meter import RECEIVING
from .outcomes import Partial
from .stats import Progress, TransferStats

WRITE_BLOCK = 4 << 20


async def copy_range(threads: IOThreads, ingest: Ingest, source: ByteSource, offset: int, length: int,
                     stats: TransferStats, progress: Progress | None, check: Any = None) -> int:
    """Copy one byte range from ``source`` into the ingest; return bytes written.

    On a retryable failure the bytes already received are still written,
    and :class:`Partial` tells the caller how many, so it resumes after them.
    Cancelled, it writes what arrived (the reader's buffer included) and keeps it.
    """
    pieces: list[bytes | memoryview] = []
    buffered = 0
    written = 0
    position = offset
    pending: asyncio.Future | None = None
    loop = asyncio.get_running_loop()
    fetched = stats.fetched_by_source

    async def settle() -> None:
        # shield: a write cancelled mid-await still runs in its thread; wait for it to end.
        nonlocal pending
        if pending is not None:
            await asyncio.shield(pending)
            pending = None

    async def flush() -> None:
        nonlocal pieces, buffered, written, position, pending
        await settle()
        if buffered:
            pending = loop.run_in_executor(threads.pool, _write, ingest, position, pieces, check)
            position += buffered
            written += buffered
            pieces, buffered = [], 0

    remaining = length

    def take(piece: bytes | memoryview) -> None:
        nonlocal remaining, buffered
        if len(piece) >= remaining:  # never write past the range, whatever the source sends
            piece = piece[:remaining]
        remaining -= len(piece)
        pieces.append(piece)
        buffered += len(piece)
        n = len(piece)
        stats.bytes_done += n
        stats.bytes_fetched += n
        fetched[source.name] = fetched.get(source.name, 0) + n

    metering = RECEIVING.set(stats.receiving)  # readers count bytes as they arrive, for progress
    hangup = HANGUP.get()  # one per reading task: a body can outlive one range (OneStream)
    hanging = None
    if hangup is None:
        hangup = Hangup()
        hanging = HANGUP.set(hangup)
    body = aiter(source.read(ingest.blob, offset, length))
    try:
        async for piece in body:
            take(piece)
            if buffered >= WRITE_BLOCK:
                await flush()
                if progress:
                    progress(stats)
            if not remaining:
                break
        await flush()
        await settle()
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Cancelled inside the reader, which handed over what it held instead of raising
            # (and the range happened to be complete): the cancellation still goes on.
            raise asyncio.CancelledError
    except RangeIgnored:
        raise
    except Unavailable as e:
        await flush()
        await settle()
        raise Partial(written, e) from e
    except asyncio.CancelledError:
        # Interrupted: what arrived is written all the same, and kept. Cancelled
        # while we waited on a write, the reader is still filling a buffer: hang up, take what it has.
        if hangup.armed():
            hangup.now()
            with contextlib.suppress(Exception):  # the reader ends with an error, by design
                while remaining:
                    take(await anext(body))
        await flush()
        await settle()
        # The range lies in one chunk, written from its start up to here (earlier tries included).
        await threads.keep(ingest, offset // max(1, ingest.chunk_range(0)[1]), offset + written)
        raise
    finally:
        RECEIVING.reset(metering)
        if hanging is not None:
            HANGUP.reset(hanging)
    if progress:
        progress(stats)
    return written


def _write(ingest: Ingest, position: int, pieces: list[bytes | memoryview], check: Any) -> None:
    """Write a batch into the ingest, feeding the piece's own check hash (in order) if there is one."""
    ingest.write(position, pieces)
    if check is not None:
        for piece in pieces:
            check.update(piece)
