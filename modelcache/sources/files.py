"""Reading local files without blocking the event loop, and without leaving a directory.

:func:`open_within` is how local sources open a file of a model: it opens
the path (following symlinks, as a reader would), then checks what was
really opened, through ``/proc/self/fd``, so a symlink swapped in between a
check and the open cannot lead out of the directory. Only regular files
inside the directory are served.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

from ..errors import InvalidContent, NotFound, UnsafePath

PIECE = 4 << 20


def open_within(path: Path, root: Path, *, what: str) -> int:
    """A read-only fd of ``path`` if it is a regular file whose real path lies in ``root`` (a real path).

    Raises :class:`UnsafePath` otherwise and :class:`NotFound` if it is missing (blocks).
    """
    try:
        # O_NONBLOCK: opening a FIFO planted in the directory must not hang; no effect on regular files.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError as e:
        raise NotFound(f"{what}: {_rel(path, root)} is missing") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePath(f"{what}: {_rel(path, root)} is not a regular file")
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")  # the file actually opened, symlinks and all
        except OSError:  # no /proc: the best we can do is the path as it resolves now
            real = os.path.realpath(path)
        if not Path(real).is_relative_to(root):
            raise UnsafePath(f"{what}: {_rel(path, root)} leads outside the directory (a symlink?)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _rel(path: Path, root: Path) -> str:
    try:
        return Path(os.path.abspath(path)).relative_to(root).as_posix()
    except ValueError:
        return path.name


async def read_file_range(path: Path, offset: int, length: int, *, what: str,
                          within: Path | None = None) -> AsyncIterator[bytes]:
    """Yield ``length`` bytes of ``path`` from ``offset``, read in a thread.

    With ``within`` (a real path), the file is opened with :func:`open_within`.
    """
    if within is not None:
        fd = await asyncio.to_thread(open_within, path, within, what=what)
    else:
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
