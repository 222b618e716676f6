"""A call in a thread that a cancellation waits for.

``asyncio.to_thread`` cannot stop its thread: cancelled, the caller goes on
while the call still runs, and whatever the call takes (a lease, a mount)
appears after the caller's cleanup has looked for it. :func:`settled` runs
the call so that its caller's ``CancelledError`` is raised only once the
thread has ended, however many times the caller is cancelled meanwhile; the
cleanup then sees what the call did.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")


async def settled(fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` in a thread; cancelled, wait for the thread to end, then raise ``CancelledError``."""
    done = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        while not done.done():
            try:
                await asyncio.wait({done})
            except asyncio.CancelledError:  # cancelled again (a deadline, then the RPC's): still the thread first
                pass
        raise
