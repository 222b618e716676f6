"""Unpacking tar layers (plain, gzip, zstd) into blobs, safely.

Each regular file of a layer becomes a blob named by its sha256, so a file
shared by two images (or by an image and a raw artifact) is stored once. The
layer's listing is returned as compact JSON-able rows, recorded in the index:

    ["f", path, digest, size]   a regular file (hardlinks become files too)
    ["l", path, target]         a symlink whose target stays inside the tree
    ["d", path]                 a directory
    ["w", path]                 an OCI whiteout: hide ``path`` from lower layers
    ["o", dir]                  an opaque whiteout: hide all of ``dir`` below

Refused, with :class:`UnsafePath`: paths that climb out of the root,
symlinks pointing outside it, hardlinks to files not in the layer, device
files and FIFOs. Refused with :class:`InvalidContent`: a layer whose files
add up to more than ``limit`` bytes, checked against each tar header before
that file's bytes are written, so a small layer that would inflate to
gigabytes fails at once. Runs in a thread (it blocks).
"""

from __future__ import annotations

import gzip
import posixpath
import tarfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, cast

import zstandard

from ..errors import InvalidContent, UnsafePath
from ..model import Compression
from ..tree import OPAQUE_WHITEOUT, WHITEOUT_PREFIX, Node, safe_link_target, safe_path
from .content import ContentStore

Row = list


def unpack_layer(content: ContentStore, layer: Path, compression: Compression, *, name: str,
                 leases: Sequence[str] = (), limit: int | None = None) -> list[Row]:
    """Unpack ``layer`` (a committed blob) into ``content``; return its listing.

    Its files are held by ``leases`` from the moment each is stored; together
    they may hold at most ``limit`` bytes.
    """
    with open(layer, "rb") as raw:
        stream: IO[bytes]
        if compression is Compression.GZIP:
            stream = cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
        elif compression is Compression.ZSTD:
            stream = cast(IO[bytes], zstandard.ZstdDecompressor().stream_reader(raw, read_size=1 << 20))
        else:
            stream = raw
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                return _rows(content, tar, name, leases, limit)
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError) as e:
            raise InvalidContent(f"layer {name}: not a valid {compression.value} tar archive: {e}") from e


def _rows(content: ContentStore, tar: tarfile.TarFile, name: str, leases: Sequence[str],
          limit: int | None) -> list[Row]:
    listing = Listing(name, limit)
    members = iter(tar)
    while True:
        try:
            member = next(members)
        except StopIteration:
            break
        except tarfile.ReadError as e:
            # Some writers (umoci insert, seen with 0.4.7) end the archive right
            # after the last file's bytes, without padding or end blocks. The
            # layer's digest was verified, and every file's size was checked as
            # it was copied, so a missing tail loses nothing: accept it.
            if listing.rows and str(e) == "unexpected end of data":
                break
            raise

        def write(member: tarfile.TarInfo = member) -> tuple[str, int]:
            src = tar.extractfile(member)
            assert src is not None
            return content.write_stream(src, expected_size=member.size, leases=leases)

        listing.add(member, write)
    return listing.rows


class Listing:
    """A layer's rows, member by member, with the refusals: the one place that decides them.

    Shared by every way a layer's members are read (unpacking the whole
    layer here, fetching its files by range in :mod:`modelcache.tarplace`).
    """

    def __init__(self, name: str, limit: int | None) -> None:
        self.name = name
        self.limit = limit
        self.rows: list[Row] = []
        self._total = 0
        self._files: dict[str, tuple[str, int]] = {}

    def add(self, member: tarfile.TarInfo, write: Callable[[], tuple[str, int]]) -> None:
        """Add ``member``'s row; ``write()`` stores a regular file's bytes and returns (digest, size)."""
        name, rows = self.name, self.rows
        if member.isdir() and posixpath.normpath("/" + member.name) == "/":
            return  # the layer's own root ("./"), as umoci and docker write it
        path = safe_path(member.name, context=f"layer {name}")
        base = posixpath.basename(path)
        if base.startswith(WHITEOUT_PREFIX):
            parent = posixpath.dirname(path)
            if base == OPAQUE_WHITEOUT:
                rows.append(["o", parent])
            else:
                rows.append(["w", posixpath.join(parent, base[len(WHITEOUT_PREFIX):])])
            return
        if member.isreg():
            self._total += member.size
            if self.limit is not None and self._total > self.limit:
                raise InvalidContent(f"layer {name}: its files add up to more than {self.limit} bytes (at {path!r}), "
                                     "far more than a layer of its size unpacks to: refusing it")
            digest, size = write()
            self._files[path] = (digest, size)
            rows.append(["f", path, digest, size])
        elif member.isdir():
            rows.append(["d", path])
        elif member.issym():
            rows.append(["l", path, safe_link_target(path, member.linkname, context=f"layer {name}")])
        elif member.islnk():
            target = safe_path(member.linkname, context=f"layer {name}")
            if target not in self._files:
                raise UnsafePath(f"layer {name}: hardlink {path!r} -> {member.linkname!r} names no earlier file")
            rows.append(["f", path, *self._files[target]])
        else:
            raise UnsafePath(f"layer {name}: {path!r} is a device file or FIFO; refusing the layer")


def rows_to_layer(rows: list[Row], prefix: str = "") -> list[Node | tuple[str, str]]:
    """Turn recorded rows into :func:`modelcache.tree.overlay` input under ``prefix``.

    ORAS writes a directory's entries under the directory's own name (title
    ``extras``: ``extras``, ``extras/a.txt``) and strips it when it unpacks;
    a layer whose every entry already lies under ``prefix`` is placed as it
    is, not under the prefix twice.
    """
    if prefix and all(r[1] == prefix or r[1].startswith(prefix + "/") for r in rows):
        prefix = ""

    def at(path: str) -> str:
        return posixpath.join(prefix, path) if prefix else path

    out: list[Node | tuple[str, str]] = []
    for row in rows:
        kind = row[0]
        if kind == "f":
            out.append(Node(at(row[1]), "file", digest=row[2], size=row[3]))
        elif kind == "l":
            out.append(Node(at(row[1]), "symlink", target=row[2]))
        elif kind == "d":
            out.append(Node(at(row[1]), "dir"))
        elif kind == "w":
            out.append(("whiteout", at(row[1])))
        elif kind == "o":
            out.append(("opaque", at(row[1]) if row[1] else prefix))
    return out
