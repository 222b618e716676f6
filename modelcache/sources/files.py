"""Reading byte ranges of local files without blocking the event loop."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

from ..errors import InvalidContent, NotFound

PIECE = 4 << 20


async def read_file_range(path: Path, offset: int, length: int, *, what: str) -> AsyncIterator[bytes]:
    """Yield ``length`` bytes of ``path`` from ``offset``, read in a thread."""
    try:
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise NotFound(f"{what}: {path} is missing") from e
    try:
        end = offset + length
        while offset < end:
            piece = await asyncio.to_thread(os.pread, fd, min(PIECE, end - offset), offset)
            if not piece:
                raise InvalidContent(f"{what}: {path} is shorter than its descriptor says")
            offset += len(piece)
            yield piece
    finally:
        os.close(fd)
