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
gigabytes fails at once. :class:`Listing` is where those rules live, one
tar member at a time, for every reader of layers. Runs in a thread (it blocks).

The tar headers are parsed by the standard library's :mod:`tarfile`, but a
file's bytes never go through it: they are handed on as views of the
inflater's blocks (:class:`_Forward`), hashed and written with no copy in
Python (issue 13: tarfile's stream mode copied every byte three times and
cost five times the inflate itself). A compressed layer is inflated in a
thread of its own (:class:`~.handoff.Handoff`, :data:`HANDOFF_DEPTH` blocks
ahead at most), so the inflate of one layer and the hashing and writing of
its files run on two cores (issue 13: a one-layer gzip image used one).
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import IO, cast

from ..errors import InvalidContent, UnsafePath
from ..model import Compression
from ..tree import OPAQUE_WHITEOUT, WHITEOUT_PREFIX, Node, safe_link_target, safe_path
from .content import ContentStore, Staged
from .handoff import Handoff
from .heap import keep_freed_blocks
from .inflate import DECODE_ERRORS, file_chunks, inflated

Row = list
_NOT_A_TAR: tuple[type[BaseException], ...] = (tarfile.TarError, *DECODE_ERRORS)
_SMALL = 1 << 20  # files up to this size are made durable in batches of _BATCH, not one fsync each
_BATCH = 256
# Inflated blocks (inflate.BLOCK bytes at most each) waiting for the tar reader, the files' hashing and
# writes: enough to ride out a file's commit or a slow write, and a bound on what a bomb can make ahead.
HANDOFF_DEPTH = 8


def unpack_layer(content: ContentStore, layer: Path, compression: Compression, *, name: str,
                 leases: Sequence[str] = (), limit: int | None = None) -> list[Row]:
    """Unpack ``layer`` (a committed blob) into ``content``; return its listing.

    Its files are held by ``leases`` from the moment each is stored; together
    they may hold at most ``limit`` bytes.
    """
    with open(layer, "rb") as raw:
        return unpack_stream(content, file_chunks(raw), compression, name=name, leases=leases, limit=limit)


def unpack_stream(content: ContentStore, chunks: Iterable[bytes | memoryview], compression: Compression, *,
                  name: str, leases: Sequence[str] = (), limit: int | None = None) -> list[Row]:
    """Unpack the layer given as ``chunks`` (its bytes as stored, in order) into ``content``; return its listing.

    ``chunks`` are taken once, front to back, and only as far as the tar
    goes: they may come from a layer still arriving (:mod:`.streamunpack`).
    Checks and holds as :func:`unpack_layer`.
    """
    listing = Listing(name, limit)
    batch: list[Staged] = []  # small files written, not yet durable: made so together (see commit_staged)
    committer = _Committer(content, leases)

    def flush() -> None:
        if batch:
            committer.submit(list(batch))
            batch.clear()

    handoff = None
    try:
        blocks = inflated(chunks, compression)
        if compression is not Compression.NONE:  # the inflate in a thread of its own: see .handoff
            keep_freed_blocks()  # its blocks, freed in the reader's thread, are reused: see .heap
            blocks = handoff = Handoff(blocks, depth=HANDOFF_DEPTH, name="mc-inflate")
        stream = _Forward(blocks)
        with tarfile.TarFile(fileobj=cast(IO[bytes], stream), mode="r") as tar:
            while True:
                try:
                    member = tar.next()
                    if member is None:
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
                    # The file's bytes follow its header(s): tarfile left the stream right there.
                    assert stream.tell() == member.offset_data
                    staged = content.stage_blocks(stream.exactly(member.size), expected_size=member.size)
                    batch.append(staged)
                    if member.size > _SMALL or len(batch) >= _BATCH:
                        flush()
                    return staged.digest, staged.size

                listing.add(member, write)
        flush()
        committer.wait()  # before the listing is returned (and recorded), every file it names is a blob
    except _NOT_A_TAR as e:
        raise InvalidContent(f"layer {name}: not a valid {compression.value} tar archive: {e}") from e
    finally:
        if handoff is not None:  # before the caller closes what the inflater reads from
            handoff.close()
        committer.close()
        for staged in batch:  # a layer refused midway: its files never become blobs
            staged.tmp.unlink(missing_ok=True)
    return listing.rows


class _Committer:
    """Makes staged files blobs (:meth:`ContentStore.commit_staged`: fsync, link) in a thread of its own,
    one batch at a time, while the next files are inflated and written.

    Measured on a layer of big files, each file's fsync stopped the
    unpacking for as long as the disk took to write it (issue 13). A second
    batch waits for the first, so a disk slower than the inflate still holds
    the unpacking back, with at most one batch of files not yet durable.
    """

    def __init__(self, content: ContentStore, leases: Sequence[str]) -> None:
        self._content = content
        self._leases = leases
        self._pool: ThreadPoolExecutor | None = None
        self._running: Future[None] | None = None

    def submit(self, staged: list[Staged]) -> None:
        """Commit ``staged`` in the background once the batch before it is committed (its error raised here)."""
        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="mc-commit")
        self._running = self._pool.submit(self._content.commit_staged, staged, leases=self._leases)

    def wait(self) -> None:
        """Until the batch in flight is committed; raise its error."""
        running, self._running = self._running, None
        if running is not None:
            running.result()

    def close(self) -> None:
        """Wait for the batch in flight, then end the thread. Its error is dropped here: this runs after the
        unpacking's own error, which stands. A batch that failed removed its temp files itself."""
        if self._running is not None:
            wait([self._running])
            self._running = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)


class _Forward:
    """A tar stream read front to back from blocks of bytes, as :class:`tarfile.TarFile` reads a file.

    ``read``, ``tell`` and ``seek`` (ahead only: skipping is reading) are
    what tarfile needs for headers; :meth:`pieces` hands out a file's bytes
    as views of the blocks themselves. At the end of the blocks, ``read``
    returns fewer bytes and ``seek`` stops there, as a short file would: the
    caller's checks (a truncated header, a file's size) see it.
    """

    def __init__(self, blocks: Iterator[bytes | memoryview]) -> None:
        self._blocks = blocks
        self._view = memoryview(b"")  # the rest of the current block
        self._at = 0  # stream offset of the view's first byte

    def pieces(self, n: int) -> Iterator[memoryview]:
        """The next ``n`` bytes (fewer if the stream ends), as views valid until the next block is read."""
        while n > 0:
            if not self._view:
                block = next(self._blocks, None)
                if block is None:
                    return
                self._view = memoryview(block)
            piece = self._view[:n]
            self._view = self._view[len(piece):]
            self._at += len(piece)
            n -= len(piece)
            yield piece

    def exactly(self, n: int) -> Iterator[memoryview]:
        """:meth:`pieces`, raising :class:`tarfile.ReadError` if the stream ends first (a file cut short)."""
        for piece in self.pieces(n):
            n -= len(piece)
            yield piece
        if n:
            raise tarfile.ReadError(f"the archive ends {n} bytes before the end of a file")

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            raise io.UnsupportedOperation("a tar stream is read in sized pieces")
        if len(self._view) >= size:  # a header inside one block: the common case
            piece = self._view[:size]
            self._view = self._view[size:]
            self._at += size
            return piece.tobytes()
        return b"".join(self.pieces(size))

    def tell(self) -> int:
        return self._at

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence != io.SEEK_SET or offset < self._at:
            raise io.UnsupportedOperation("a tar stream only skips ahead")
        for _ in self.pieces(offset - self._at):
            pass
        return self._at


class Listing:
    """The rows of one layer, member by member: the one place a tar member becomes a row.

    :meth:`add` applies the safety rules of the module docstring to one
    member, in the order the tar holds them, and asks ``write`` to store a
    regular file's bytes only after its size passed the layer's ``limit``.
    Any reader of tar headers (a stream, or range reads of a plain layer)
    feeds its members here.
    """

    def __init__(self, name: str, limit: int | None = None) -> None:
        self.name = name
        self.limit = limit
        self.rows: list[Row] = []
        self.total = 0  # bytes of regular files so far, checked against ``limit``
        self._files: dict[str, tuple[str, int]] = {}  # path -> (digest, size), for hardlinks

    def add(self, member: tarfile.TarInfo, write: Callable[[], tuple[str, int]]) -> None:
        """Record ``member``; for a regular file, ``write()`` stores its bytes and returns (digest, size)."""
        name = self.name
        if member.isdir() and posixpath.normpath("/" + member.name) == "/":
            return  # the layer's own root ("./"), as umoci and docker write it
        path = safe_path(member.name, context=f"layer {name}")
        base = posixpath.basename(path)
        if base.startswith(WHITEOUT_PREFIX):
            parent = posixpath.dirname(path)
            if base == OPAQUE_WHITEOUT:
                self.rows.append(["o", parent])
            else:
                self.rows.append(["w", posixpath.join(parent, base[len(WHITEOUT_PREFIX):])])
            return
        if member.isreg():
            self.total += member.size
            if self.limit is not None and self.total > self.limit:
                raise InvalidContent(f"layer {name}: its files add up to more than {self.limit} bytes "
                                     f"(at {path!r}), far more than a layer of its size unpacks to: refusing it")
            digest, size = write()
            self._files[path] = (digest, size)
            self.rows.append(["f", path, digest, size])
        elif member.isdir():
            self.rows.append(["d", path])
        elif member.issym():
            self.rows.append(["l", path, safe_link_target(path, member.linkname, context=f"layer {name}")])
        elif member.islnk():
            target = safe_path(member.linkname, context=f"layer {name}")
            if target not in self._files:
                raise UnsafePath(f"layer {name}: hardlink {path!r} -> {member.linkname!r} names no earlier file")
            self.rows.append(["f", path, *self._files[target]])
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
