"""Decompressing a layer's bytes as they are read: gzip (ISA-L when present, else zlib) or zstd.

Guarantees: :func:`inflated` turns a readable binary file into the
layer's decompressed bytes, as an iterator of blocks in order, reading the
source only as far as its caller iterates (so a layer can be inflated while
it is still arriving). gzip streams of several members (RFC 1952 section
2.2, zero padding between or after them skipped as gzip(1) does) and zstd
streams of several frames are read through to their end; a stream cut short
raises :class:`EOFError`. gzip uses ``isal`` (ISA-L's inflate, measured
1.5-1.8x zlib's speed on bf16 weights, issue 13) when it imports, and the
standard library's zlib otherwise; both release the GIL while inflating.
Any decoding failure is one of :data:`DECODE_ERRORS`.

Memory is bounded whatever the input: each block is at most
:data:`BLOCK` bytes (a few KiB of gzip or zstd can claim gigabytes), and the
source is read :data:`READ_SIZE` bytes at a time into one reused buffer.
The blocks are fresh ``bytes``: a caller may keep slices of them.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from typing import IO, Any, cast

import zstandard

from ..model import Compression

try:  # an optional speed-up: the fallback is the standard library's zlib
    from isal import isal_zlib as _isal_zlib
except ImportError:  # pragma: no cover - isal is a dependency; this is for platforms without its wheels
    _isal_zlib = None  # type: ignore[assignment]

ISAL = _isal_zlib is not None  # tests turn it off to prove the zlib fallback
READ_SIZE = 1 << 20  # compressed bytes asked of the source at a time
# Most decompressed bytes one call may return. Large enough that hashing and writing a
# block cost one call each (and release the GIL for long), small enough to stay in cache.
BLOCK = 2 << 20
_GZIP_WBITS = 16 + 15  # a gzip member (header and trailer checked), 32 KiB window
_ERRORS: list[type[BaseException]] = [EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError]
if _isal_zlib is not None:
    _ERRORS.append(cast(type[BaseException], _isal_zlib.error))  # its stub calls the class an instance
DECODE_ERRORS = tuple(_ERRORS)


def inflated(raw: IO[bytes], compression: Compression) -> Iterator[bytes]:
    """``raw``'s bytes decompressed as ``compression`` says, block by block (``raw``'s own blocks for NONE)."""
    if compression is Compression.GZIP:
        return _gunzip(raw)
    if compression is Compression.ZSTD:
        return _unzstd(raw)
    return iter(lambda: raw.read(BLOCK), b"")


def _decompressobj() -> Any:
    if ISAL and _isal_zlib is not None:
        return _isal_zlib.decompressobj(_GZIP_WBITS)
    return zlib.decompressobj(_GZIP_WBITS)


def _gunzip(raw: IO[bytes]) -> Iterator[bytes]:
    """Inflate gzip members one after the other from ``raw`` (RFC 1952 2.2), in blocks of at most BLOCK."""
    buffer = bytearray(READ_SIZE)
    view = memoryview(buffer)
    d = None  # the member being inflated; None between members
    while True:
        n = raw.readinto(view)  # type: ignore[attr-defined]
        if not n:
            break
        data: bytes | memoryview = view[:n]
        while data:
            if d is None:
                data = bytes(data).lstrip(b"\0") if data[0] == 0 else data  # padding after a member
                if not data:
                    break
                d = _decompressobj()
            out = d.decompress(data, BLOCK)
            # Beyond BLOCK, the rest of the input waits in unconsumed_tail (a copy, but a rare one:
            # weights inflate to about 1.25x, so 1 MiB in rarely gives more than 2 MiB out).
            data = d.unconsumed_tail
            if out:
                yield out
            if d.eof:
                data, d = d.unused_data, None
            elif not data and len(out) == BLOCK:
                # All input taken but the output was cut at BLOCK: the inflater holds more. Drain it.
                while out := d.decompress(b"", BLOCK):
                    yield out
                    if d.eof:
                        data, d = d.unused_data, None
                        break
    if d is not None:
        raise EOFError("Compressed file ended before the end-of-stream marker was reached")


def _unzstd(raw: IO[bytes]) -> Iterator[bytes]:
    """zstd frames one after the other, in blocks of at most BLOCK (the reader bounds its output)."""
    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_size=READ_SIZE, read_across_frames=True)
    with reader:
        while block := reader.read(BLOCK):
            yield block


def inflater() -> str:
    """Which gzip inflate is in use: ``isal`` or ``zlib`` (for logs and the benchmark)."""
    return "isal" if ISAL and _isal_zlib is not None else "zlib"
