"""The ETag S3 gives an object uploaded in parts: MD5 of the parts' MD5s, then ``-<parts>``.

Computed in one pass over the bytes, cut into parts of a known size (the
first part's; every part but the last has it when the uploader used one part
size, as the AWS CLI, boto3, rclone and MinIO clients do). It checks the
whole object as the origin gave it, without the object's sha256.
"""

from __future__ import annotations

import hashlib


class MultipartEtag:
    """``update`` the object's bytes in order; ``hexdigest`` is its multipart ETag (``<hex>-<parts>``)."""

    def __init__(self, part_size: int) -> None:
        self.part_size = part_size
        self._digests: list[bytes] = []
        self._part = hashlib.md5(usedforsecurity=False)
        self._in_part = 0

    def update(self, data: bytes | memoryview) -> None:
        """Feed the next bytes."""
        view = memoryview(data)
        while len(view):
            take = view[:self.part_size - self._in_part]
            self._part.update(take)
            self._in_part += len(take)
            view = view[len(take):]
            if self._in_part == self.part_size:
                self._digests.append(self._part.digest())
                self._part = hashlib.md5(usedforsecurity=False)
                self._in_part = 0

    def hexdigest(self) -> str:
        """The ETag of the bytes fed so far."""
        digests = self._digests + ([self._part.digest()] if self._in_part else [])
        return hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest() + f"-{len(digests)}"
