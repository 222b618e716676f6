"""The checks S3 gives of a whole object, computed in one pass over its bytes as they arrive.

- :class:`MultipartEtag`: the ETag of an object uploaded in parts, MD5 of the
  parts' MD5s, then ``-<parts>``.
- :class:`S3Crc`: a CRC checksum S3 keeps (``x-amz-checksum-crc32``,
  ``-crc32c`` or ``-crc64nvme``, base64 of the big-endian CRC): of the whole
  object, or, for one uploaded in parts (``COMPOSITE``; CRC32 and CRC32C
  only), the CRC of the parts' CRCs, then ``-<parts>``. zlib's CRC32 costs
  about a quarter of an MD5 per byte, and awscrt's CRC32C and CRC64NVME
  (the checksum S3 itself now keeps of objects uploaded without one) about
  a sixteenth; so where the origin has one it is the check taken instead
  of the ETag's MD5 for bytes from the origin alone (issue 13: S3 against
  rclone); never for a peer's, since anyone can make bytes to a given CRC
  (:func:`checks_for`). Without awscrt, only CRC32 is taken
  (:func:`crc_available`).

Parts are cut at a known size (the first part's; every part but the last
has it when the uploader used one part size, as the AWS CLI, boto3, rclone
and MinIO clients do). Either checks the whole object as the origin gave
it, without the object's sha256.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import zlib
from collections.abc import Callable

from ..model import Blob, S3Checksum

Crc = Callable[[bytes | memoryview, int], int]  # (bytes, the CRC so far) -> the CRC with them


class _Parts:
    """Bytes fed in order, cut into parts of ``part_size`` (0: one part, the whole object)."""

    def __init__(self, part_size: int) -> None:
        self.part_size = part_size
        self._done: list[bytes] = []
        self._in_part = 0

    def update(self, data: bytes | memoryview) -> None:
        """Feed the next bytes."""
        view = memoryview(data)
        if not self.part_size:
            self._take(view)
            self._in_part += len(view)
            return
        while len(view):
            take = view[:self.part_size - self._in_part]
            self._take(take)
            self._in_part += len(take)
            view = view[len(take):]
            if self._in_part == self.part_size:
                self._done.append(self._end_part())
                self._in_part = 0

    def _take(self, view: memoryview) -> None:
        raise NotImplementedError

    def _end_part(self) -> bytes:
        raise NotImplementedError


class MultipartEtag(_Parts):
    """``update`` the object's bytes in order; ``hexdigest`` is its multipart ETag (``<hex>-<parts>``)."""

    def __init__(self, part_size: int) -> None:
        super().__init__(part_size)
        self._part = hashlib.md5(usedforsecurity=False)

    def _take(self, view: memoryview) -> None:
        self._part.update(view)

    def _end_part(self) -> bytes:
        digest = self._part.digest()
        self._part = hashlib.md5(usedforsecurity=False)
        return digest

    def hexdigest(self) -> str:
        """The ETag of the bytes fed so far."""
        digests = self._done + ([self._part.digest()] if self._in_part else [])
        return hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest() + f"-{len(digests)}"


def _crc_of(algorithm: str) -> tuple[Crc, int] | None:
    """The function computing S3's CRC ``algorithm`` and its width in bytes; None if none is installed."""
    if algorithm == "crc32":
        return zlib.crc32, 4
    try:  # SIMD CRC32C and CRC64NVME: botocore's own choice for them, in its crt extra
        from awscrt import checksums
    except ImportError:
        return None
    fn = getattr(checksums, algorithm, None) if algorithm in ("crc32c", "crc64nvme") else None  # by version
    return (fn, 8 if algorithm == "crc64nvme" else 4) if fn is not None else None


def crc_available(algorithm: str) -> int | None:
    """The width in bytes of S3's CRC ``algorithm`` where it can be computed here; None where it cannot."""
    found = _crc_of(algorithm)
    return found[1] if found else None


class S3Crc(_Parts):
    """``update`` the object's bytes in order; ``value`` is S3's checksum ``expected`` names, computed over
    them as S3 writes it: of the whole object when its part size is 0, else composite (``<base64>-<parts>``)."""

    def __init__(self, expected: S3Checksum) -> None:
        super().__init__(expected.part_size)
        found = _crc_of(expected.algorithm)
        if found is None:
            raise ValueError(f"no {expected.algorithm} here (the S3 source takes only what crc_available says)")
        self._fn, self._width = found
        self._crc = 0

    def _take(self, view: memoryview) -> None:
        self._crc = self._fn(view, self._crc)

    def _end_part(self) -> bytes:
        crc = self._crc.to_bytes(self._width, "big")
        self._crc = 0
        return crc

    def value(self) -> str:
        """The checksum of the bytes fed so far."""
        if not self.part_size:
            return base64.b64encode(self._crc.to_bytes(self._width, "big")).decode()
        parts = self._done + ([self._crc.to_bytes(self._width, "big")] if self._in_part else [])
        whole = self._fn(b"".join(parts), 0).to_bytes(self._width, "big")
        return base64.b64encode(whole).decode() + f"-{len(parts)}"


def checks_for(blob: Blob, *, peers: bool) -> Blob:
    """``blob`` with the origin's checks the store is to apply to it: with peers' bytes possible, those a
    forger cannot meet (MD5, ETag; the CRC dropped when one of those is there); from the origin alone,
    the cheapest (the CRC, the MD5s dropped): an accident, not a forger, is what it guards against there."""
    if not blob.crc:
        return blob
    if not peers:
        return dataclasses.replace(blob, md5=None, md5_parts=None)
    if blob.md5 or blob.md5_parts:
        return dataclasses.replace(blob, crc=None)
    return blob  # not origin_checked: no peer is asked for it, and the CRC still checks the origin's bytes
