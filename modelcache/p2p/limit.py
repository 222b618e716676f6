"""A token bucket for bytes served to peers (``--peer-upload-limit``), so uploads never starve pulls."""

from __future__ import annotations

import asyncio
import time


class RateLimit:
    """At most ``rate`` bytes per second on average, bursts up to one second's worth; 0 = no limit."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._tokens = float(rate)
        self._at = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        """Wait until ``n`` bytes may be sent."""
        if self.rate <= 0:
            return
        async with self._lock:  # one waiter at a time: fair in arrival order
            while True:
                now = time.monotonic()
                self._tokens = min(float(self.rate), self._tokens + (now - self._at) * self.rate)
                self._at = now
                if self._tokens >= min(n, self.rate):
                    self._tokens -= n
                    return
                await asyncio.sleep((min(n, self.rate) - self._tokens) / self.rate)
