"""A plain local directory as a source.

Every regular file below the directory is a file of the model. Symlinks are
followed when they resolve inside the directory and refused otherwise; other
special files are refused. Every open (to hash, to read) checks again what
it really opened (:func:`~.files.open_within`), so a link swapped in after
the walk cannot lead out either. Files are hashed (in threads, in parallel)
while resolving, since a directory carries no digests of its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

from ..errors import NotFound, UnsafePath
from ..model import Blob, FileEntry, Model
from ..refs import DirRef
from ..tree import utf8_name
from .files import open_within, read_file_range


class DirectorySource:
    """Resolves and reads one local directory."""

    def __init__(self, ref: DirRef) -> None:
        self.ref = ref
        self.name = str(ref)
        self._paths: dict[str, Path] = {}
        self._root = Path(os.path.realpath(ref.path))

    def _walk(self) -> list[tuple[str, Path]]:
        root = self._root
        found: list[tuple[str, Path]] = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                path = Path(dirpath) / name
                rel = utf8_name(path.relative_to(root).as_posix(), context=self.name)
                real = path.resolve()
                if not real.is_relative_to(root):
                    raise UnsafePath(f"{self.name}: {rel} links outside the directory")
                if real.is_dir():
                    raise UnsafePath(f"{self.name}: {rel} is a symlink to a directory; not supported")
                if not real.is_file():
                    raise UnsafePath(f"{self.name}: {rel} is not a regular file")
                found.append((rel, real))
        if not found:
            raise NotFound(f"{self.name}: the directory holds no files")
        return found

    async def resolve(self) -> Model:
        """List and hash the directory's files."""
        found = await asyncio.to_thread(self._walk)
        limit = asyncio.Semaphore(os.cpu_count() or 2)

        async def entry(rel: str, path: Path) -> FileEntry:
            async with limit:
                digest, size = await asyncio.to_thread(_hash_and_size, path, self._root, self.name)
            self._paths[digest] = path
            return FileEntry(path=rel, blob=Blob(digest=digest, size=size))

        parts = await asyncio.gather(*(entry(rel, p) for rel, p in found))
        listing = "".join(f"{p.path}\0{p.blob.digest}\n" for p in parts).encode()
        return Model(ref=self.name, digest="sha256:" + hashlib.sha256(listing).hexdigest(), parts=tuple(parts))

    def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes]:
        """Yield a range of the file that had this digest when resolved."""
        return read_file_range(self._paths[blob.digest], offset, length, what=self.name, within=self._root)

    async def close(self) -> None:
        """Nothing to release."""


def _hash_and_size(path: Path, root: Path, what: str) -> tuple[str, int]:
    with open(open_within(path, root, what=what), "rb") as f:
        h = hashlib.sha256()
        while block := f.read(1 << 20):
            h.update(block)
        return "sha256:" + h.hexdigest(), f.tell()
