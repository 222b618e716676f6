"""A content store in memory: the four roles of :mod:`.roles`, for tests and peers.

It keeps the same guarantees as the store on disk (a blob is invisible until
committed, only durable chunks survive a writer, one writer per blob) with
dicts instead of files; "durable" is what :meth:`MemoryIngest.mark_done`
(or, for the start of a chunk, :meth:`MemoryIngest.keep`) recorded. Not thread-safe beyond what one event loop and its I/O threads do
with it (each ingest has one writer; dict updates are atomic in CPython).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ..errors import Conflict, DigestMismatch, InvalidContent, NotFound
from ..model import Blob
from .etag import MultipartEtag, S3Crc
from .roles import IngestStatus


@dataclass
class _State:
    size: int
    chunk_size: int
    data: bytearray = field(default_factory=bytearray)
    done: bytearray = field(default_factory=bytearray)
    kept: dict[int, int] = field(default_factory=dict)  # chunk -> leading bytes durable (chunks not done)
    end: int = 0  # one past the last byte written


class MemoryContentStore:
    """Committed blobs and ingests, in dicts."""

    def __init__(self) -> None:
        self._blobs: dict[str, bytes] = {}
        self._ingests: dict[str, _State] = {}
        self._writers: set[str] = set()

    # Ingester
    def has(self, digest: str) -> bool:
        """True when ``digest`` is committed."""
        return digest in self._blobs

    async def open_ingest(self, blob: Blob, chunk_size: int) -> MemoryIngest | None:
        """The one writer of ``blob`` (waiting for another); None once it is committed."""
        # Polled, as the disk store polls its flock: a writer may be released from an I/O
        # thread (commit runs there), where an asyncio.Event must not be set.
        while blob.digest in self._writers:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if self.has(blob.digest):
            return None
        chunks = max(1, -(-blob.size // chunk_size))
        state = self._ingests.get(blob.digest)
        if state is None or (state.size, state.chunk_size) != (blob.size, chunk_size):
            state = self._ingests[blob.digest] = _State(blob.size, chunk_size, done=bytearray(chunks))
        self._writers.add(blob.digest)
        return MemoryIngest(self, blob, state)

    # Provider
    def read(self, digest: str, offset: int, length: int) -> bytes:
        """Bytes of a committed blob (fewer at its end); NotFound if it is not committed."""
        if digest not in self._blobs:
            raise NotFound(f"blob {digest} is not in the store")
        return self._blobs[digest][offset:offset + length]

    def read_durable(self, digest: str, offset: int, length: int) -> bytes:
        """Bytes of an ingest in progress, only from chunks already durable; NotFound otherwise."""
        state = self._ingests.get(digest)
        if state is None:
            raise NotFound(f"no ingest of {digest} in progress")
        end = min(offset + length, state.size)
        first, last = offset // state.chunk_size, -(-end // state.chunk_size)
        if offset < 0 or any(state.done[i] != 1 for i in range(first, last)):
            raise NotFound(f"bytes {offset}-{end} of {digest} are not durable yet")
        return bytes(state.data[offset:end])

    # IngestManager
    def ingests(self) -> list[IngestStatus]:
        """Every ingest with durable state, by digest."""
        return [IngestStatus(d, s.size, s.chunk_size,
                             sum(min(s.chunk_size, s.size - i * s.chunk_size) for i, f in enumerate(s.done) if f)
                             + sum(s.kept.values()))
                for d, s in sorted(self._ingests.items())]

    def abort(self, digest: str) -> bool:
        """Drop an ingest no writer holds; False if there was none; Conflict while a writer holds it."""
        if digest in self._writers:
            raise Conflict(f"the ingest of {digest} is being written")
        return self._ingests.pop(digest, None) is not None

    # ContentManager
    def digests(self) -> Iterator[str]:
        """Every committed blob's digest."""
        yield from list(self._blobs)

    def size(self, digest: str) -> int | None:
        """The size of a committed blob, or None."""
        data = self._blobs.get(digest)
        return None if data is None else len(data)

    def delete(self, digest: str) -> None:
        """Remove a committed blob (no error if absent)."""
        self._blobs.pop(digest, None)


class MemoryIngest:
    """The writer of one blob in a :class:`MemoryContentStore`."""

    def __init__(self, store: MemoryContentStore, blob: Blob, state: _State) -> None:
        self.store, self.blob, self._state = store, blob, state
        self.chunks = len(state.done)
        self.committed_as = blob.digest
        self._closed = False

    @property
    def bytes_done(self) -> int:
        """Bytes already durable (whole chunks, and kept parts of others)."""
        return sum(self.chunk_range(i)[1] for i, d in enumerate(self._state.done) if d) + sum(self._state.kept.values())

    def chunk_range(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk ``index``."""
        start = index * self._state.chunk_size
        return start, min(self._state.chunk_size, self.blob.size - start)

    def missing(self) -> list[int]:
        """Indexes of chunks not yet durable (whole)."""
        return [i for i, d in enumerate(self._state.done) if not d]

    def resume_at(self, index: int) -> int:
        """Leading bytes of chunk ``index`` already durable (all of it once done)."""
        return self.chunk_range(index)[1] if self._state.done[index] else self._state.kept.get(index, 0)

    def write(self, offset: int, data: bytes | memoryview | Sequence[bytes | memoryview]) -> None:
        """Write bytes at ``offset`` (not yet durable); space is taken as bytes arrive."""
        pieces = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
        buf = self._state.data
        for piece in pieces:
            end = offset + len(piece)
            if end > len(buf):
                buf.extend(bytes(end - len(buf)))
            buf[offset:end] = piece
            self._state.end = max(self._state.end, end)
            offset = end

    def rewind(self, index: int) -> None:
        """Forget chunk ``index``'s bytes: nothing to undo here (the digest is computed at commit)."""
        self._state.done[index] = 0

    def mark_done(self, index: int) -> None:
        """Make chunk ``index`` durable and record it."""
        self._state.done[index] = 1
        self._state.kept.pop(index, None)

    def keep(self, index: int, length: int) -> None:
        """Make the first ``length`` bytes of chunk ``index`` durable and record them."""
        if length >= self.chunk_range(index)[1]:
            self.mark_done(index)
        elif not self._state.done[index] and length > self._state.kept.get(index, 0):
            self._state.kept[index] = length

    def complete(self) -> bool:
        """True when every chunk is durable."""
        return all(self._state.done)

    def commit(self, leases: Sequence[str] = ()) -> None:
        """Check size and digest and make the blob visible; DigestMismatch discards it."""
        if not self.complete():
            raise InvalidContent(f"{self.blob.digest}: commit before every chunk is done")
        data = bytes(self._state.data[:self.blob.size])
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        # The origin's other checks of the whole blob, as the local store applies them (S3 MD5/CRC, git blob id).
        wrong_md5 = self.blob.md5 and hashlib.md5(data, usedforsecurity=False).hexdigest() != self.blob.md5
        wrong_git = self.blob.git_sha1 and \
            hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest() != self.blob.git_sha1
        if self.blob.md5_parts:
            etag = MultipartEtag(self.blob.md5_parts[0])
            etag.update(data)
            wrong_md5 = wrong_md5 or etag.hexdigest() != self.blob.md5_parts[1]
        if self.blob.crc:
            crc = S3Crc(self.blob.crc)
            crc.update(data)
            wrong_md5 = wrong_md5 or crc.value() != self.blob.crc.value
        if self._state.end != self.blob.size or (self.blob.verified and actual != self.blob.digest) \
                or wrong_md5 or wrong_git:
            self._discard()
            raise DigestMismatch(f"blob {self.blob.digest} arrived as {actual} ({self._state.end} bytes): "
                                 "refusing it")
        self.store._blobs[actual] = data
        self.committed_as = actual
        self._discard()

    def _discard(self) -> None:
        self.store._ingests.pop(self.blob.digest, None)
        self.close()

    def close(self) -> None:
        """Release the writer, keeping durable chunks for a later resume."""
        if not self._closed:
            self._closed = True
            self.store._writers.discard(self.blob.digest)
