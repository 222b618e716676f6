"""Decompressing a layer's bytes as a file is read: gzip (ISA-L when present, else zlib) or zstd.

Guarantees: :func:`decompressed` wraps any readable binary file in a reader
of its decompressed bytes, reading the source only as far as its caller
reads (so a layer can be inflated while it is still arriving). gzip streams
of several members (RFC 1952 section 2.2) and zstd streams of several frames
are read through to their end. gzip uses ``isal`` (ISA-L's inflate, measured
1.5-1.8x zlib's speed on bf16 weights, issue 13) when it imports, and the
standard library's zlib otherwise; both release the GIL while inflating.
Any decoding failure is one of :data:`DECODE_ERRORS`.
"""

from __future__ import annotations

import gzip
import zlib
from typing import IO, cast

import zstandard

from ..model import Compression

try:  # an optional speed-up: the fallback is the standard library's zlib
    from isal import igzip as _igzip
    from isal import isal_zlib as _isal_zlib
except ImportError:  # pragma: no cover - isal is a dependency; this is for platforms without its wheels
    _igzip = None  # type: ignore[assignment]
    _isal_zlib = None  # type: ignore[assignment]

ISAL = _igzip is not None  # tests turn it off to prove the zlib fallback
READ_SIZE = 1 << 20  # compressed bytes asked of the source at a time
_ERRORS: list[type[BaseException]] = [EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError]
if _isal_zlib is not None:
    _ERRORS.append(cast(type[BaseException], _isal_zlib.error))  # its stub calls the class an instance
DECODE_ERRORS = tuple(_ERRORS)


def decompressed(raw: IO[bytes], compression: Compression) -> IO[bytes]:
    """A reader of ``raw``'s bytes decompressed as ``compression`` says (``raw`` itself for NONE)."""
    if compression is Compression.GZIP:
        if ISAL and _igzip is not None:
            return cast(IO[bytes], _igzip.GzipFile(fileobj=raw, mode="rb"))
        return cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
    if compression is Compression.ZSTD:
        return cast(IO[bytes], zstandard.ZstdDecompressor().stream_reader(
            raw, read_size=READ_SIZE, read_across_frames=True))
    return raw


def inflater() -> str:
    """Which gzip inflate is in use: ``isal`` or ``zlib`` (for logs and the benchmark)."""
    return "isal" if ISAL and _igzip is not None else "zlib"
