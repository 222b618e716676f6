"""The engine's I/O threads: writes, fsync, hashing and commits, off the event loop.

Guarantees:

- The event loop only moves bytes between sockets and threads; every
  blocking file call runs here.
- A call is never abandoned: cancelled while it runs, :meth:`IOThreads.run`
  waits for it to end before the cancellation goes on, so no write, fsync or
  commit is left running under a file about to close.
- :meth:`IOThreads.keep` makes the bytes an interrupted fetch received
  durable and recorded (best effort: the cancellation matters more).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ..store.roles import Ingest

log = logging.getLogger(__name__)


class IOThreads:
    """A bounded pool of threads for the engine's file work."""

    def __init__(self, workers: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mc-io")

    def close(self) -> None:
        """Stop the threads."""
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, fn: Callable, *args: object) -> object:
        """``fn(*args)`` in an I/O thread. Cancelled meanwhile, it waits for the call to end before the
        cancellation goes on: a write, fsync or commit is never left running under a file about to close."""
        call = asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            await asyncio.wait([call])
            if not call.cancelled() and call.exception() is not None:  # retrieved: the cancellation goes on
                log.info("%s, interrupted: %s", getattr(fn, "__name__", fn), call.exception())
            raise

    async def keep(self, ingest: Ingest, index: int, end: int) -> None:
        """Interrupted: make chunk ``index``'s bytes, written from its start up to blob offset ``end``,
        durable and recorded, so the next pull resumes there (best effort: the cancellation matters
        more, and bytes not kept are fetched again)."""
        start, _ = ingest.chunk_range(index)
        if end <= start + ingest.resume_at(index):
            return
        try:
            await self.run(ingest.keep, index, end - start)
        except Exception as err:  # noqa: BLE001 - see above
            log.warning("chunk %d of %s: could not keep the bytes received: %s", index, ingest.blob.digest[:19], err)
