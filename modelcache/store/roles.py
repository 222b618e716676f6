"""The store's roles, as containerd splits its content store: small Protocols, one job each.

- :class:`Provider` reads committed blobs, and the durable chunks of blobs
  still being ingested (what a peer may be sent before the blob is whole);
- :class:`Ingester` opens the writer of one blob (:class:`Ingest`): the
  only role the transfer engine depends on;
- :class:`IngestManager` lists and aborts ingests in progress;
- :class:`ContentManager` lists, sizes and deletes committed blobs.

:class:`~.content.ContentStore` (on disk) and :class:`~.memory.MemoryContentStore`
(for tests and peers) implement all four; ``tests/test_store_roles.py`` is
the one conformance suite, written against these Protocols only.

The guarantee every implementation keeps: until an ingest is committed
(every chunk durable, size and sha256 checked), its blob is not visible:
``has`` is false and ``read`` raises :class:`~modelcache.errors.NotFound`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..model import Blob


@dataclass(frozen=True, slots=True)
class IngestStatus:
    """An ingest in progress: which blob, in what chunks, how much of it is durable."""

    digest: str
    size: int
    chunk_size: int
    bytes_done: int


class Ingest(Protocol):
    """The writer of one blob, in fixed-size chunks; resumable; invisible until committed."""

    blob: Blob
    chunks: int
    committed_as: str  # the stored digest (learnt at commit for unverified blobs)

    @property
    def bytes_done(self) -> int:
        """Bytes already durable (whole chunks, and kept parts of others)."""
        ...

    def chunk_range(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk ``index``."""
        ...

    def missing(self) -> list[int]:
        """Indexes of chunks not yet durable (whole)."""
        ...

    def resume_at(self, index: int) -> int:
        """Leading bytes of chunk ``index`` already durable (all of it once done): where its fetch resumes."""
        ...

    def write(self, offset: int, data: bytes | memoryview | Sequence[bytes | memoryview]) -> None:
        """Write bytes at ``offset`` (not yet durable)."""
        ...

    def mark_done(self, index: int) -> None:
        """Make chunk ``index`` durable and record it."""
        ...

    def keep(self, index: int, length: int) -> None:
        """Make the first ``length`` bytes of chunk ``index`` (written from its start) durable and record
        them, so a later writer resumes after them: what an interrupted transfer keeps."""
        ...

    def rewind(self, index: int) -> None:
        """Forget the bytes written into chunk ``index`` (not durable): they failed a check and are written again."""
        ...

    def complete(self) -> bool:
        """True when every chunk is durable."""
        ...

    def commit(self, leases: Sequence[str] = ()) -> None:
        """Check size and digest and make the blob visible, held by ``leases``; DigestMismatch discards it."""
        ...

    def close(self) -> None:
        """Release the writer, keeping durable chunks for a later resume."""
        ...


class Ingester(Protocol):
    """Opens writers: what the transfer engine needs of a store, and all it needs."""

    def has(self, digest: str) -> bool:
        """True when ``digest`` is committed."""
        ...

    async def open_ingest(self, blob: Blob, chunk_size: int) -> Ingest | None:
        """The one writer of ``blob`` (waiting for another); None once it is committed."""
        ...


class Provider(Protocol):
    """Reads committed blobs and durable chunks of ingests in progress."""

    def has(self, digest: str) -> bool:
        """True when ``digest`` is committed."""
        ...

    def read(self, digest: str, offset: int, length: int) -> bytes:
        """Bytes of a committed blob (fewer at its end); NotFound if it is not committed."""
        ...

    def read_durable(self, digest: str, offset: int, length: int) -> bytes:
        """Bytes of an ingest in progress, only from chunks already durable; NotFound otherwise."""
        ...


class IngestManager(Protocol):
    """Ingests in progress, across writers."""

    def ingests(self) -> list[IngestStatus]:
        """Every ingest with durable state, by digest."""
        ...

    def abort(self, digest: str) -> bool:
        """Drop an ingest no writer holds; False if there was none. Conflict while a writer holds it."""
        ...


class ContentManager(Protocol):
    """Committed blobs as a whole."""

    def digests(self) -> Iterator[str]:
        """Every committed blob's digest."""
        ...

    def size(self, digest: str) -> int | None:
        """The size of a committed blob, or None."""
        ...

    def delete(self, digest: str) -> None:
        """Remove a committed blob (no error if absent)."""
        ...
