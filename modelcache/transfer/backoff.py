"""The retry policy: how long to wait before trying again, and how many tries each source gets.

Guarantees:

- Exponential backoff with full jitter (a delay drawn in ``[0, min(max,
  base * 2**attempt)]``), or the server's ``Retry-After`` when it gave one,
  capped at five minutes.
- A source's attempt budget is its own (``ByteSource.attempts``); without
  one, the last source of a chunk (the origin) gets ``retries + 1`` tries
  and any source before it one, so a peer's miss never waits out a backoff
  meant for the origin.
- :func:`retry` applies the same policy to the requests around the chunks.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..errors import Unavailable
from ..sources.base import ByteSource
from .config import TransferConfig

log = logging.getLogger(__name__)

T = TypeVar("T")


def delay(config: TransferConfig, attempt: int, retry_after: float | None) -> float:
    """Seconds to wait before try ``attempt + 1``."""
    if retry_after is not None:
        return min(retry_after, 300.0)
    cap = min(config.backoff_max, config.backoff_base * (2 ** attempt))
    return random.uniform(0, cap)


def attempts(config: TransferConfig, source: ByteSource, last: bool) -> int:
    """Tries ``source`` gets for one range: its own budget, else the retries if it is the last source, else one."""
    return getattr(source, "attempts", None) or (config.retries + 1 if last else 1)


async def retry(config: TransferConfig, what: str, call: Callable[[], Awaitable[T]]) -> T:
    """``call()``, tried again on :class:`Unavailable` as a chunk is: same backoff, same retry count."""
    attempt = 0
    while True:
        try:
            return await call()
        except Unavailable as e:
            attempt += 1
            if attempt > config.retries:
                raise Unavailable(f"{e} (gave up after {attempt} attempts)", retry_after=e.retry_after) from e
            wait = delay(config, attempt, e.retry_after)
            log.info("%s: %s; retry %d in %.1fs", what, e, attempt, wait)
            await asyncio.sleep(wait)
