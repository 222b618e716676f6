"""Decompressing a layer's bytes as they are read: gzip (ISA-L when present, else zlib) or zstd.

Guarantees: :func:`inflated` turns a layer's bytes, given as chunks in
order (:func:`file_chunks` of a file, or views of buffers still in memory),
into its decompressed bytes, as an iterator of blocks in order, taking
chunks only as far as its caller iterates (so a layer can be inflated while
it is still arriving). gzip streams of several members (RFC 1952 section
2.2, zero padding between or after them skipped as gzip(1) does) and zstd
streams of several frames are read through to their end; a stream cut short
raises :class:`EOFError`. gzip uses ``isal`` (ISA-L's inflate, measured
1.5-1.8x zlib's speed on bf16 weights, issue 13) when it imports, and the
standard library's zlib otherwise; both release the GIL while inflating.
Any decoding failure is one of :data:`DECODE_ERRORS`.

Memory is bounded whatever the input: each block is at most
:data:`BLOCK` bytes (a few KiB of gzip or zstd can claim gigabytes), and
input is fed :data:`READ_SIZE` bytes at a time.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterable, Iterator
from typing import IO, Any, cast

import zstandard

from ..model import Compression

try:  # an optional speed-up: the fallback is the standard library's zlib
    from isal import isal_zlib as _isal_zlib
except ImportError:  # pragma: no cover - isal is a dependency; this is for platforms without its wheels
    _isal_zlib = None  # type: ignore[assignment]

ISAL = _isal_zlib is not None  # tests turn it off to prove the zlib fallback
# Compressed bytes asked of the source at a time, and the most decompressed bytes one call
# returns. Large enough that inflating, hashing and writing a block each cost one call (which
# releases the GIL for long), small enough that the block is still in the CPU's cache when it
# is hashed and written: measured on bf16 weights, 2 MiB blocks cost 30% more CPU than 1 MiB.
# Input half the block: weights (and most layers) inflate to less than twice their size.
READ_SIZE = 512 << 10
BLOCK = 1 << 20
_GZIP_WBITS = 16 + 15  # a gzip member (header and trailer checked), 32 KiB window
_ERRORS: list[type[BaseException]] = [EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError]
if _isal_zlib is not None:
    _ERRORS.append(cast(type[BaseException], _isal_zlib.error))  # its stub calls the class an instance
DECODE_ERRORS = tuple(_ERRORS)


def inflated(chunks: Iterable[bytes | memoryview], compression: Compression) -> Iterator[bytes | memoryview]:
    """The bytes of ``chunks`` (a layer as stored, in order) decompressed as ``compression`` says, block
    by block (the chunks themselves for NONE). A chunk may be a view: it is not kept once the next is asked."""
    if compression is Compression.GZIP:
        return _gunzip(chunks)
    if compression is Compression.ZSTD:
        return _unzstd(chunks)
    return iter(chunks)


def file_chunks(raw: IO[bytes]) -> Iterator[bytes]:
    """``raw`` read front to back in chunks of READ_SIZE: the input :func:`inflated` takes."""
    return iter(lambda: raw.read(READ_SIZE), b"")


def _decompressobj() -> Any:
    if ISAL and _isal_zlib is not None:
        return _isal_zlib.decompressobj(_GZIP_WBITS)
    return zlib.decompressobj(_GZIP_WBITS)


def _gunzip(chunks: Iterable[bytes | memoryview]) -> Iterator[bytes]:
    """Inflate gzip members one after the other (RFC 1952 2.2), in blocks of at most BLOCK."""
    d = None  # the member being inflated; None between members
    for chunk in chunks:
        view = memoryview(chunk)
        for start in range(0, len(view), READ_SIZE):  # a big chunk in READ_SIZE steps: see BLOCK
            data: bytes | memoryview = view[start:start + READ_SIZE]
            while data:
                if d is None:
                    data = bytes(data).lstrip(b"\0") if data[0] == 0 else data  # padding after a member
                    if not data:
                        break
                    d = _decompressobj()
                out = d.decompress(data, BLOCK)
                # Beyond BLOCK, the rest of the input waits in unconsumed_tail (a copy, but a rare one:
                # weights inflate to about 1.25x, far from the 2x that fills a block).
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


def _unzstd(chunks: Iterable[bytes | memoryview]) -> Iterator[bytes]:
    """zstd frames one after the other, in blocks of at most BLOCK (the reader bounds its output)."""
    source = _ChunkReader(iter(chunks))
    reader = zstandard.ZstdDecompressor().stream_reader(cast(IO[bytes], source), read_size=READ_SIZE, read_across_frames=True)
    with reader:
        while block := reader.read(BLOCK):
            yield block


class _ChunkReader:
    """The ``read`` of a file over chunks (what zstandard's stream reader asks of its source)."""

    def __init__(self, chunks: Iterator[bytes | memoryview]) -> None:
        self._chunks = chunks
        self._rest = memoryview(b"")

    def read(self, size: int = -1) -> bytes | memoryview:
        if not self._rest:
            self._rest = memoryview(next(self._chunks, b""))
        n = len(self._rest) if size < 0 else size
        piece, self._rest = self._rest[:n], self._rest[n:]
        return piece


def inflater() -> str:
    """Which gzip inflate is in use: ``isal`` or ``zlib`` (for logs and the benchmark)."""
    return "isal" if ISAL and _isal_zlib is not None else "zlib"
