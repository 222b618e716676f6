"""The header chain of a plain (uncompressed) tar, walked by small range reads; no I/O here.

:func:`walk` is a generator in the sans-I/O style: it yields ``(offset,
length)`` ranges of the layer to read, is sent their bytes, and returns a
:class:`TarIndex`: every member (as a :class:`tarfile.TarInfo`) with where
its data starts, and every byte it read. It guarantees:

- the bytes it read (headers, pax and GNU long name/link blocks, padding,
  small files, the end blocks and whatever follows them) and the data of the
  regular files it leaves to be fetched by range (``inline`` false) tile the
  layer exactly, in order: hashing them in that order gives the layer's
  digest, so nothing read here is trusted before that check;
- members are read as :mod:`tarfile` reads them (POSIX ustar, pax
  extended and global headers, GNU long names and links, base-256 sizes, the
  V7 directory convention), so the listing built from them matches the one
  unpacking the whole layer gives (``store/unpack.py``);
- a small member's data, and the next header, come in the same read as its
  header (the window doubles, up to 1 MiB, while members stay small), so a
  run of small members costs a few requests, not one per 512-byte block;
- the walk ends at the first zero block, or at the layer's end (umoci
  sometimes writes no end blocks, nor padding after the last file).

Anything it does not handle exactly (a bad checksum, sparse files, a header
cut short, a negative size) raises :class:`Unwalkable`, and so does a layer
the range path would fetch slowly (see :func:`budget`): the caller then reads
the layer as one stream, which handles everything tarfile does.
"""

from __future__ import annotations

import bisect
import tarfile
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

BLOCK = 512
FIRST_WINDOW = 16 << 10  # a header and the start of whatever follows
MAX_WINDOW = 1 << 20
INLINE_MAX = 256 << 10  # a regular file at most this big is read with the headers around it
HELD_MAX = 64 << 20  # bytes read and held in memory (headers, small files, the tail)
EXTENSION_MAX = 1 << 20  # a pax header or GNU long name/link
_ZERO = bytes(BLOCK)
_EXTENSIONS = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_WITH_DATA = (*tarfile.REGULAR_TYPES,)  # members whose data follows their header (see _carries_data)


class Unwalkable(Exception):
    """The layer is not walked by range (it is read as one stream instead); the message says why."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One member of the tar and where its data starts in the layer."""

    member: tarfile.TarInfo
    offset: int
    inline: bool  # its data was read with the headers (held in the index), else fetched by range


@dataclass(frozen=True, slots=True)
class TarIndex:
    """What :func:`walk` found: the members, and the bytes it read, by offset in the layer."""

    size: int
    entries: tuple[Entry, ...]
    segments: tuple[tuple[int, bytes], ...]
    requests: int

    def ranged(self) -> list[Entry]:
        """The regular files whose data is to be fetched by range."""
        return [e for e in self.entries if not e.inline]

    def data(self, entry: Entry) -> bytes:
        """The data of an inline member, from the bytes read."""
        starts = [s[0] for s in self.segments]
        at, raw = self.segments[bisect.bisect_right(starts, entry.offset) - 1]
        begin = entry.offset - at
        out = raw[begin:begin + entry.member.size]
        assert entry.inline and len(out) == entry.member.size
        return out

    def pieces(self) -> Iterator[bytes | Entry]:
        """The layer in order: bytes read, and ranged members standing for their data."""
        parts: list[tuple[int, bytes | Entry]] = [*self.segments, *((e.offset, e) for e in self.ranged())]
        for _, part in sorted(parts, key=lambda p: p[0]):
            yield part


def budget(size: int) -> tuple[int, int]:
    """(requests, members) a layer of ``size`` bytes may take before it is read as one stream instead.

    The walk is sequential, one round trip per request: at most 16 plus one
    per 16 MiB of layer keeps it a few percent of the transfer (16 MiB take
    about 16 ms at 1 GB/s; a request about 1 ms on a LAN). Every file
    fetched by range also costs a request of its own, a blob and an fsync:
    past 64 members, they must average 1 MiB each (issue 13: a layer of
    thousands of tiny files streams faster than it ranges).
    """
    return 16 + size // (16 << 20), max(64, size // (1 << 20))


def walk(size: int, *, limits: tuple[int, int] | None = None) -> Generator[tuple[int, int], bytes, TarIndex]:
    """Walk the headers of a ``size``-byte tar: yields ranges to read, is sent their bytes (exactly)."""
    max_requests, max_members = limits or budget(size)
    segments: list[tuple[int, bytes]] = []
    entries: list[Entry] = []
    covered = 0  # bytes [0, covered) are in segments or in ranged files' data
    pending = bytearray()  # bytes [covered, covered + len(pending)) read, not yet in segments
    held = 0
    requests = 0
    window = FIRST_WINDOW
    pax_global: dict[str, str] = {}
    pax: dict[str, str] = {}
    long_name: str | None = None
    long_link: str | None = None

    def fill(end: int) -> Generator[tuple[int, int], bytes, None]:
        """Read on until bytes up to ``end`` are held (a window at a time)."""
        nonlocal pending, held, requests, window
        if end > size:
            raise Unwalkable(f"a member runs past the layer's end ({end} > {size} bytes)")
        while covered + len(pending) < end:
            start = covered + len(pending)
            length = min(max(end - start, window), size - start)
            requests += 1
            if requests > max_requests:
                raise Unwalkable(f"more than {max_requests} header reads for a {size}-byte layer")
            held += length
            if held > HELD_MAX:
                raise Unwalkable(f"more than {HELD_MAX >> 20} MiB of headers and small files")
            data = yield start, length
            if len(data) != length:
                raise Unwalkable(f"asked for {length} bytes at {start}, got {len(data)}")
            pending += data
            window = min(MAX_WINDOW, window * 2)  # still reading small members: take more at once

    def at(offset: int, length: int) -> bytes:
        return bytes(pending[offset - covered:offset - covered + length])

    pos = 0
    while pos < size:
        yield from fill(pos + BLOCK)
        block = at(pos, BLOCK)
        if block == _ZERO:
            if not pos:
                raise Unwalkable("an empty archive")  # tarfile refuses it: so does reading it whole
            break  # end of archive (tarfile stops at the first zero block too)
        header = _header(block, pos)
        data_at = pos + BLOCK
        if header.type in _EXTENSIONS:
            if header.size > EXTENSION_MAX:
                raise Unwalkable(f"a {header.size}-byte extended header at {pos}")
            yield from fill(data_at + header.size)
            raw = at(data_at, header.size)
            if header.type == tarfile.XHDTYPE:
                pax.update(_pax_records(raw, pos))
            elif header.type == tarfile.XGLTYPE:
                pax_global.update(_pax_records(raw, pos))
            elif header.type == tarfile.GNUTYPE_LONGNAME:
                long_name = _text(raw)
            else:
                long_link = _text(raw)
            pos = data_at + _round(header.size)
            continue
        fields = {**pax_global, **pax}
        if header.type == tarfile.GNUTYPE_SPARSE or any(k.startswith("GNU.sparse.") for k in fields):
            raise Unwalkable(f"a sparse file at {pos}")
        member = header
        if long_name is not None:
            member.name = long_name
        if long_link is not None:
            member.linkname = long_link
        if fields.get("path"):
            member.name = fields["path"]
        if fields.get("linkpath"):
            member.linkname = fields["linkpath"]
        if fields.get("size"):
            member.size = _decimal(fields["size"], pos)
        pax, long_name, long_link = {}, None, None
        if member.isdir():
            member.name = member.name.rstrip("/")
        if len(entries) >= max_members:
            raise Unwalkable(f"more than {max_members} members in a {size}-byte layer")
        carries = _carries_data(member)
        n = member.size if carries else 0
        if carries and n > INLINE_MAX:
            if not member.isreg():
                raise Unwalkable(f"a {n}-byte member of type {member.type!r} at {pos}")
            if data_at + n > size:
                raise Unwalkable(f"{member.name!r} runs past the layer's end")
            segments.append((covered, at(covered, data_at - covered)))
            covered, pending = data_at + n, bytearray()
            window = FIRST_WINDOW
            entries.append(Entry(member, data_at, inline=False))
        else:
            if data_at + n > size:
                raise Unwalkable(f"{member.name!r} runs past the layer's end")
            # Its data and, in the same read, the next header (unless the layer ends first).
            yield from fill(min(size, _round(data_at + n) + BLOCK))
            entries.append(Entry(member, data_at, inline=True))
        pos = _round(data_at + n)
    yield from fill(size)  # the rest (end blocks, record padding) counts in the layer's digest
    if pending:
        segments.append((covered, bytes(pending)))
    return TarIndex(size=size, entries=tuple(entries), segments=tuple(segments), requests=requests)


def walk_bytes(data: bytes, *, limits: tuple[int, int] | None = None) -> TarIndex:
    """:func:`walk` over bytes in memory (tests, and layers already here)."""
    return drive(walk(len(data), limits=limits), lambda offset, length: data[offset:offset + length])


def drive(walker: Generator[tuple[int, int], bytes, TarIndex], read: Callable[[int, int], bytes]) -> TarIndex:
    """Run a walk with a blocking ``read(offset, length)``."""
    try:
        want = next(walker)
        while True:
            want = walker.send(read(*want))
    except StopIteration as done:
        return done.value


def _carries_data(member: tarfile.TarInfo) -> bool:
    """Whether data blocks follow the header: regular files and types tarfile does not know (which are
    refused later, as unpacking refuses them); links, directories and devices have none whatever their size."""
    return member.type in _WITH_DATA or member.type not in tarfile.SUPPORTED_TYPES


def _round(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _text(raw: bytes) -> str:
    """A NUL-terminated field, as tarfile decodes names (UTF-8, undecodable bytes kept as surrogates)."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(field: bytes, pos: int) -> int:
    """A numeric header field: octal text, or base-256 (GNU, for sizes of 8 GiB and more)."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    if field[:1] == b"\xff":
        raise Unwalkable(f"a negative number in the header at {pos}")
    text = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise Unwalkable(f"a malformed number {field!r} in the header at {pos}") from None


def _decimal(text: str, pos: int) -> int:
    if not text.isdigit():
        raise Unwalkable(f"a malformed pax size {text!r} before {pos}")
    return int(text)


def _header(block: bytes, pos: int) -> tarfile.TarInfo:
    """One 512-byte ustar/GNU/V7 header (POSIX.1-2017 pax, "ustar Interchange Format")."""
    stored = _number(block[148:156], pos)
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    signed = unsigned - sum(256 for b in (*block[:148], *block[156:]) if b & 0x80)
    if stored not in (unsigned, signed):
        raise Unwalkable(f"a header with a bad checksum at {pos}")
    member = tarfile.TarInfo(_text(block[0:100]))
    member.type = block[156:157] or tarfile.REGTYPE
    member.size = _number(block[124:136], pos)
    member.linkname = _text(block[157:257])
    magic = block[257:265]
    prefix = block[345:500]
    if magic[:6] == tarfile.POSIX_MAGIC[:6] and prefix.strip(b"\0"):
        member.name = _text(prefix) + "/" + member.name
    elif magic == tarfile.GNU_MAGIC and prefix.strip(b"\0"):
        # GNU keeps times (and old sparse maps) there; tarfile would read them as a path prefix.
        raise Unwalkable(f"a GNU header with extra fields at {pos}")
    if member.type == tarfile.AREGTYPE and member.name.endswith("/"):
        member.type = tarfile.DIRTYPE  # the V7 convention
    return member


def _pax_records(raw: bytes, pos: int) -> dict[str, str]:
    """The records of a pax extended header: ``"%d %s=%s\\n" % (length, keyword, value)``."""
    out: dict[str, str] = {}
    at = 0
    while at < len(raw):
        if raw[at:].strip(b"\0") == b"":
            break  # padding some writers leave after the last record
        space = raw.find(b" ", at)
        length_text = raw[at:space]
        if space < 0 or not length_text.isdigit():
            raise Unwalkable(f"a malformed pax record in the header at {pos}")
        length = int(length_text)
        record = raw[at:at + length]
        if length <= space - at or len(record) != length or not record.endswith(b"\n") or b"=" not in record:
            raise Unwalkable(f"a malformed pax record in the header at {pos}")
        key, _, value = record[space - at + 1:-1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        at += length
    return out
