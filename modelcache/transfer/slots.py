"""Connection slots shared by every blob in flight, handed out fairly.

Guarantees:

- At most ``n`` slots are held at once, whoever holds them.
- A freed slot goes to the waiter whose blob has the fewest chunks in
  flight (ties: the one that has waited longest). With as many blobs as
  slots, each blob is fetched by one stream, chunk after chunk, so its bytes
  arrive in order and are hashed from memory as they are written; a blob
  alone gets every slot.
- A waiter cancelled before or just after being granted a slot never leaks
  it.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager


class FairSlots:
    """A counting semaphore whose slots go to the least-served key first.

    Waiters are queued per key, keys in the order their queues formed. A
    release scans keys in that order and stops at the first holding no slot;
    keys holding one or more number at most ``n``, so a release costs O(n)
    however many blobs wait (a model of 100,000 small files queues 100,000).
    """

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError("at least one slot")
        self._free = n
        self._held: Counter[Hashable] = Counter()
        self._queues: dict[Hashable, deque[asyncio.Future[None]]] = {}

    def held(self, key: Hashable) -> int:
        """Slots ``key`` holds now."""
        return self._held[key]

    @asynccontextmanager
    async def slot(self, key: Hashable) -> AsyncIterator[None]:
        """Hold one slot on behalf of ``key`` for the body of the ``async with``."""
        await self._acquire(key)
        try:
            yield
        finally:
            self._release(key)

    async def _acquire(self, key: Hashable) -> None:
        if self._free and not self._queues:
            self._grant(key)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, deque()).append(waiter)
        try:
            await waiter
        except BaseException:
            queue = self._queues.get(key)
            if queue is not None and waiter in queue:
                queue.remove(waiter)
                if not queue:
                    del self._queues[key]
            elif waiter.done() and not waiter.cancelled():
                self._release(key)  # granted, but cancelled before it could run: give it back
            raise

    def _grant(self, key: Hashable) -> None:
        self._free -= 1
        self._held[key] += 1

    def _release(self, key: Hashable) -> None:
        self._held[key] -= 1
        if self._held[key] <= 0:
            del self._held[key]
        self._free += 1
        while self._free and self._queues:
            chosen = self._least_served()
            queue = self._queues[chosen]
            waiter = queue.popleft()
            if not queue:
                del self._queues[chosen]
            if waiter.done():
                continue
            self._grant(chosen)
            waiter.set_result(None)

    def _least_served(self) -> Hashable:
        """The first waiting key holding no slot, else the first of those holding fewest."""
        best, fewest = None, None
        for key in self._queues:
            held = self._held[key]
            if held == 0:
                return key
            if fewest is None or held < fewest:
                best, fewest = key, held
        return best
