"""Chunks made durable beside the next fetch, never counted done before they are.

Guarantees:

- :meth:`Durability.hand` starts a chunk's fdatasync-and-record
  (``Ingest.mark_done``) in a task of its own and returns once it has
  started, so the caller fetches the next range meanwhile: on a busy disk an
  fdatasync takes seconds, and the network would sit idle (issue 13).
- At most ``limit`` chunks are being made durable at once (per engine), so
  writes always find an I/O thread; ``hand`` waits for a free place.
- A chunk counts as done only once its ``mark_done`` returned (whoever waits
  on the piece is told then); :meth:`Durability.synced` waits for every
  chunk of a blob and raises the first failure, so a blob is committed only
  when every chunk is durable. A crash loses at most the chunks not yet
  durable: resume counts only what ``mark_done`` recorded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..store.roles import Ingest
from .iothreads import IOThreads

Settle = Callable[[str, int, BaseException | None], None]


class Durability:
    """Chunks of each blob being made durable now."""

    def __init__(self, threads: IOThreads, limit: int, settle: Settle) -> None:
        self._threads = threads
        self._settle = settle  # tells whoever waits on the piece (digest, index, error or None)
        self._syncing: dict[str, set[asyncio.Task[None]]] = {}
        self._slots = asyncio.Semaphore(limit)

    async def hand(self, ingest: Ingest, index: int) -> asyncio.Task[None]:
        """Start making chunk ``index`` durable; return its task once started (waits for a free place first)."""
        await self._slots.acquire()
        digest = ingest.blob.digest
        syncing = self._syncing.setdefault(digest, set())
        task = asyncio.create_task(self._durable(ingest, index))
        syncing.add(task)

        def done(_: asyncio.Task[None]) -> None:
            self._slots.release()  # even if cancelled before it ran
            syncing.discard(task)
            if not syncing and self._syncing.get(digest) is syncing:
                del self._syncing[digest]  # a stream (Engine.stream) has no fetch to forget it after

        task.add_done_callback(done)
        return task

    async def _durable(self, ingest: Ingest, index: int) -> None:
        """Make chunk ``index`` durable and recorded (it is done only then); tell whoever waits on it."""
        try:
            await self._threads.run(ingest.mark_done, index)
        except BaseException as e:
            self._settle(ingest.blob.digest, index, e)
            raise
        self._settle(ingest.blob.digest, index, None)

    async def synced(self, digest: str) -> None:
        """Wait until every chunk of ``digest`` handed over is durable; raise its first failure."""
        pending = list(self._syncing.get(digest, ()))
        results = await asyncio.gather(*pending, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def pending(self, digest: str) -> list[asyncio.Task[None]]:
        """The tasks making chunks of ``digest`` durable now (to stop them with the blob's workers)."""
        return list(self._syncing.get(digest, ()))

    def forget(self, digest: str) -> None:
        """The blob's fetch ended: drop its bookkeeping."""
        self._syncing.pop(digest, None)
