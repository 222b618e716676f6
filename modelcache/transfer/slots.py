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
from collections import Counter
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager


class FairSlots:
    """A counting semaphore whose slots go to the least-served key first."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError("at least one slot")
        self._free = n
        self._held: Counter[Hashable] = Counter()
        self._waiters: list[tuple[asyncio.Future[None], Hashable]] = []

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
        if self._free and not self._waiters:
            self._grant(key)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (waiter, key)
        self._waiters.append(entry)
        try:
            await waiter
        except BaseException:
            if entry in self._waiters:
                self._waiters.remove(entry)
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
        while self._free and self._waiters:
            # min() keeps the first of equals: the longest waiter among the least served.
            best = min(range(len(self._waiters)), key=lambda i: self._held[self._waiters[i][1]])
            waiter, key = self._waiters.pop(best)
            if waiter.done():
                continue
            self._grant(key)
            waiter.set_result(None)
