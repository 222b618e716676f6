"""Planning layers as byte segments: no layer is ever written to disk before upload.

A layer is a list of segments, each either literal bytes (tar headers,
padding, the end-of-archive blocks) or a range of a source file. The same
segments are read once to hash the layer and once more to upload or copy it,
so a 100 GB model is never copied into a temporary tar.

Tar layers are reproducible: entries sorted by path, mtime 0, uid/gid 0, no
user or group names, mode 0444 for files (0555 if executable by the owner),
PAX headers only where a name needs them; the archive ends with two zero
blocks, as POSIX requires. A layer that carries one file records where that
file's bytes sit in it (``file_offset``), which the puller uses to fetch the
file straight out of the layer.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidContent, NotFound, UnsafePath
from ..p2p.pieces import PieceHasher, piece_minimum, piece_size
from ..tree import utf8_name

BLOCK = 512
READ = 4 << 20


@dataclass(frozen=True, slots=True)
class SourceFile:
    """A file to package, with what it looked like when listed."""

    rel: str
    path: Path
    size: int
    mtime_ns: int
    executable: bool


@dataclass(frozen=True, slots=True)
class FileRange:
    """``length`` bytes of ``source`` from ``offset``."""

    source: SourceFile
    offset: int
    length: int


Segment = bytes | FileRange


@dataclass(slots=True)
class Layer:
    """One planned blob: its segments, and what is learnt by hashing them."""

    segments: list[Segment]
    media_type: str
    files: list[SourceFile]
    file_offset: int | None = None   # where the single file's bytes start (single-file tar layers)
    annotations: dict[str, str] = field(default_factory=dict)
    digest: str = ""
    size: int = 0
    file_digest: str = ""            # sha256 of the single file (single-file layers)
    piece_length: int = 0            # the pieces peers exchange of the blob a puller stores ...
    pieces: list[str] = field(default_factory=list)  # ... and their sha256 (hex), see hash_layer


def scan(root: Path, *, follow_symlinks: bool = False) -> list[SourceFile]:
    """Every regular file below ``root``, sorted; refuse what cannot be packaged faithfully.

    Symlinks are refused unless ``follow_symlinks``, and even then only when
    they resolve inside ``root`` (their target's bytes are packaged).
    """
    root = root.resolve()
    if not root.is_dir():
        raise NotFound(f"{root} is not a directory")
    found: list[SourceFile] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames) + sorted(d for d in dirnames if os.path.islink(os.path.join(dirpath, d))):
            path = Path(dirpath) / name
            rel = utf8_name(path.relative_to(root).as_posix(), context=str(root))
            if path.is_symlink():
                real = path.resolve()
                if not follow_symlinks:
                    raise UnsafePath(f"{rel} is a symlink; refusing it (--follow-symlinks packages its target)")
                if not real.is_relative_to(root) or not real.is_file():
                    raise UnsafePath(f"{rel} links to {real}, outside {root} or not a file")
                path = real
            try:
                st = os.stat(path)
            except OSError as e:
                raise NotFound(f"{rel}: {e.strerror}") from e
            if not stat.S_ISREG(st.st_mode):
                raise UnsafePath(f"{rel} is not a regular file")
            if not os.access(path, os.R_OK):
                raise InvalidContent(f"{rel} is not readable")
            found.append(SourceFile(rel, path, st.st_size, st.st_mtime_ns, bool(st.st_mode & stat.S_IXUSR)))
    if not found:
        raise NotFound(f"{root} holds no files to package")
    return sorted(found, key=lambda f: f.rel)


def _header(name: str, source: SourceFile) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = source.size
    info.mtime = 0
    info.mode = 0o555 if source.executable else 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _padding(size: int) -> bytes:
    return bytes(-size % BLOCK)


def tar_layer(files: Sequence[SourceFile], *, prefix: str, media_type: str) -> Layer:
    """An uncompressed tar layer of ``files`` under ``prefix``."""
    segments: list[Segment] = []
    offset = None
    for source in files:
        name = f"{prefix}/{source.rel}" if prefix else source.rel
        header = _header(name, source)
        segments.append(header)
        if offset is None:
            offset = len(header)
        segments.append(FileRange(source, 0, source.size))
        if source.size % BLOCK:
            segments.append(_padding(source.size))
    segments.append(bytes(2 * BLOCK))
    return Layer(segments, media_type, list(files), file_offset=offset if len(files) == 1 else None)


def raw_layer(source: SourceFile, *, media_type: str) -> Layer:
    """A layer whose bytes are the file itself (ModelPack ``.raw``)."""
    return Layer([FileRange(source, 0, source.size)], media_type, [source])


def read_segments(segments: Sequence[Segment], *, start: int = 0) -> Iterator[bytes]:
    """The layer's bytes from ``start``, in pieces of at most 4 MiB (blocks; run in a thread)."""
    position = 0
    for seg in segments:
        length = len(seg) if isinstance(seg, bytes) else seg.length
        if position + length <= start:
            position += length
            continue
        skip = max(0, start - position)
        position += length
        if isinstance(seg, bytes):
            yield seg[skip:]
            continue
        yield from _read_range(seg, skip)


def _read_range(seg: FileRange, skip: int) -> Iterator[bytes]:
    with open(seg.source.path, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_size != seg.source.size or st.st_mtime_ns != seg.source.mtime_ns:
            raise InvalidContent(f"{seg.source.rel} changed while being packaged; run again when it is stable")
        f.seek(seg.offset + skip)
        left = seg.length - skip
        while left:
            block = f.read(min(READ, left))
            if not block:
                raise InvalidContent(f"{seg.source.rel} shrank while being packaged")
            left -= len(block)
            yield block
        after = os.fstat(f.fileno())
        if after.st_size != seg.source.size or after.st_mtime_ns != seg.source.mtime_ns:
            raise InvalidContent(f"{seg.source.rel} changed while being packaged; run again when it is stable")


def hash_layer(layer: Layer, *, piece_min: int | None = None) -> None:
    """Fill in the layer's digest and size, its single file's digest and the piece digest list, in one
    read: blocks, run in a thread.

    The pieces cover the blob a puller fetches and peers exchange: the file
    for a single-file tar layer (pulled by range out of the layer and stored
    as the file), the layer itself otherwise. They are cut by
    :func:`~modelcache.p2p.pieces.piece_size` with ``piece_min`` (default the
    cluster's, :func:`~modelcache.p2p.pieces.piece_minimum`), as daemons cut them.
    """
    h = hashlib.sha256()
    fh = hashlib.sha256() if len(layer.files) == 1 else None
    # p2p.pieces' own functions: a recorded list must cut exactly as every daemon does.
    minimum = piece_min or piece_minimum()
    whole = sum(len(s) if isinstance(s, bytes) else s.length for s in layer.segments)
    of_file = layer.file_offset is not None
    stored = layer.files[0].size if of_file else whole
    pieces = PieceHasher(stored, piece_size(stored, minimum))
    size = 0
    for seg in layer.segments:
        if isinstance(seg, bytes):
            h.update(seg)
            if not of_file:
                pieces.update(seg)
            size += len(seg)
            continue
        for block in _read_range(seg, 0):
            h.update(block)
            pieces.update(block)
            if fh is not None:
                fh.update(block)
            size += len(block)
    layer.digest, layer.size = "sha256:" + h.hexdigest(), size
    if fh is not None:
        layer.file_digest = "sha256:" + fh.hexdigest()
    layer.piece_length, layer.pieces = pieces.piece, pieces.result()
