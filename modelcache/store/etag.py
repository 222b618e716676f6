"""The checks S3 gives of a whole object, computed in one pass over its bytes as they arrive.

- :class:`MultipartEtag`: the ETag of an object uploaded in parts, MD5 of the
  parts' MD5s, then ``-<parts>``.
- :class:`S3Crc32`: S3's CRC32 checksum (``x-amz-checksum-crc32``, base64 of
  the big-endian CRC): of the whole object, or, for one uploaded in parts
  (``COMPOSITE``), CRC32 of the parts' CRCs, then ``-<parts>``. zlib's CRC32
  costs about a quarter of an MD5 per byte, so where the origin has one it
  is the check taken instead of the ETag's MD5 for bytes from the origin
  alone (issue 13: S3 against rclone); never for a peer's, since anyone can
  make bytes to a given CRC (:func:`checks_for`).

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

from ..model import Blob


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


class S3Crc32(_Parts):
    """``update`` the object's bytes in order; ``value`` is S3's CRC32 checksum of them, as S3 writes it:
    of the whole object when ``part_size`` is 0, else composite (``<base64>-<parts>``)."""

    def __init__(self, part_size: int = 0) -> None:
        super().__init__(part_size)
        self._crc = 0

    def _take(self, view: memoryview) -> None:
        self._crc = zlib.crc32(view, self._crc)

    def _end_part(self) -> bytes:
        crc = self._crc.to_bytes(4, "big")
        self._crc = 0
        return crc

    def value(self) -> str:
        """The checksum of the bytes fed so far."""
        if not self.part_size:
            return base64.b64encode(self._crc.to_bytes(4, "big")).decode()
        parts = self._done + ([self._crc.to_bytes(4, "big")] if self._in_part else [])
        whole = zlib.crc32(b"".join(parts)).to_bytes(4, "big")
        return base64.b64encode(whole).decode() + f"-{len(parts)}"


def checks_for(blob: Blob, *, peers: bool) -> Blob:
    """``blob`` with the origin's checks the store is to apply to it: with peers' bytes possible, those a
    forger cannot meet (MD5, ETag; the CRC32 dropped when one of those is there); from the origin alone,
    the cheapest (the CRC32, the MD5s dropped): an accident, not a forger, is what it guards against there."""
    if not blob.crc32:
        return blob
    if not peers:
        return dataclasses.replace(blob, md5=None, md5_parts=None)
    if blob.md5 or blob.md5_parts:
        return dataclasses.replace(blob, crc32=None)
    return blob  # not origin_checked: no peer is asked for it, and the CRC still checks the origin's bytes
