"""The conformance suite of the store's roles (modelcache/store/roles.py), run on every implementation.

Written against the Protocols only (Ingester, Ingest, Provider, IngestManager, ContentManager): no
paths, no files. The store on disk and the in-memory store must both pass it, and the transfer engine,
which depends only on the Ingester role, must fill either.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import os
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from awscrt import checksums

from modelcache.errors import Conflict, DigestMismatch, NotFound
from modelcache.model import Blob, S3Checksum
from modelcache.store.content import ContentStore
from modelcache.store.memory import MemoryContentStore
from modelcache.transfer import Engine, OriginOnly, TransferConfig

CHUNK = 64 << 10
IMPLEMENTATIONS: dict[str, Callable[[Path], Any]] = {
    "local": lambda tmp: ContentStore(tmp / "store"),
    "memory": lambda tmp: MemoryContentStore(),
}
DATA = os.urandom(5 * CHUNK + 123)


def blob_of(data: bytes, *, verified: bool = True) -> Blob:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    # An origin without sha256 names bytes its own way; the stand-in digest is sha256-shaped (as s3.py makes it).
    standin = "sha256:" + hashlib.sha256(b"s3://bucket/key@etag" + data).hexdigest()
    return Blob(digest if verified else standin, len(data), verified=verified)


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def store(request, tmp_path: Path) -> Any:
    return IMPLEMENTATIONS[request.param](tmp_path)


def open_ingest(store: Any, blob: Blob):
    return asyncio.run(store.open_ingest(blob, CHUNK))


def write(ing, data: bytes, chunks, *, done: bool = True) -> None:
    for i in chunks:
        start, length = ing.chunk_range(i)
        ing.write(start, data[start:start + length])
        if done:
            ing.mark_done(i)


def test_round_trip_in_any_order(store: Any) -> None:
    """Chunks written in any order commit to a blob that every reader and manager sees."""
    blob = blob_of(DATA)
    ing = open_ingest(store, blob)
    write(ing, DATA, reversed(range(ing.chunks)))
    ing.commit()
    assert store.has(blob.digest) and store.size(blob.digest) == len(DATA)
    assert store.read(blob.digest, 0, len(DATA)) == DATA
    assert store.read(blob.digest, CHUNK - 5, 10) == DATA[CHUNK - 5:CHUNK + 5]
    assert list(store.digests()) == [blob.digest] and store.ingests() == []
    assert asyncio.run(store.open_ingest(blob, CHUNK)) is None  # committed: no writer needed


def test_invisible_until_committed(store: Any) -> None:
    """Every chunk durable but not committed: not there for readers; listed as an ingest."""
    blob = blob_of(DATA)
    ing = open_ingest(store, blob)
    write(ing, DATA, range(ing.chunks))
    assert not store.has(blob.digest) and store.size(blob.digest) is None and list(store.digests()) == []
    with pytest.raises(NotFound):
        store.read(blob.digest, 0, 1)
    [status] = store.ingests()
    assert (status.digest, status.size, status.chunk_size, status.bytes_done) == (blob.digest, len(DATA), CHUNK,
                                                                                   len(DATA))
    ing.close()


def test_wrong_bytes_are_refused_and_leave_nothing(store: Any) -> None:
    """A digest mismatch, or bytes past the end, is DigestMismatch: no blob, no ingest."""
    for data in (bytes(len(DATA)), DATA + b"extra"):
        blob = blob_of(DATA)
        ing = open_ingest(store, blob)
        write(ing, data, range(ing.chunks))
        if len(data) > len(DATA):
            ing.write(len(DATA), b"extra")
        with pytest.raises(DigestMismatch):
            ing.commit()
        assert not store.has(blob.digest) and store.ingests() == [] and list(store.digests()) == []


def test_resume_keeps_only_durable_chunks_and_peers_read_them(store: Any) -> None:
    """After a writer goes, durable chunks stay (and can be read); the rest is missing."""
    blob = blob_of(DATA)
    ing = open_ingest(store, blob)
    write(ing, DATA, [0, 2])
    write(ing, DATA, [1], done=False)  # written, never made durable
    assert store.read_durable(blob.digest, 0, CHUNK) == DATA[:CHUNK]
    assert store.read_durable(blob.digest, 2 * CHUNK + 7, 100) == DATA[2 * CHUNK + 7:2 * CHUNK + 107]
    for offset, length in ((CHUNK, 1), (CHUNK - 1, 2), (3 * CHUNK, 10)):
        with pytest.raises(NotFound):
            store.read_durable(blob.digest, offset, length)
    ing.close()
    again = open_ingest(store, blob)
    assert again.missing() == [1, 3, 4, 5] and again.bytes_done == 2 * CHUNK
    write(again, DATA, again.missing())
    again.commit()
    assert store.read(blob.digest, 0, len(DATA)) == DATA
    with pytest.raises(NotFound):
        store.read_durable(blob.digest, 0, 1)


def test_one_writer_at_a_time(store: Any) -> None:
    """A second writer waits for the first; once the first commits it is told there is nothing to do."""
    blob = blob_of(DATA)

    async def go() -> object:
        first = await store.open_ingest(blob, CHUNK)
        second = asyncio.create_task(store.open_ingest(blob, CHUNK))
        await asyncio.sleep(0.2)
        assert not second.done()
        with pytest.raises(Conflict):
            store.abort(blob.digest)  # a held ingest is not aborted under its writer
        write(first, DATA, range(first.chunks))
        first.commit()
        return await asyncio.wait_for(second, 10)

    assert asyncio.run(go()) is None


def test_abort_and_delete(store: Any) -> None:
    """abort drops an ingest no one writes; delete drops a committed blob; both are idempotent."""
    blob, small = blob_of(DATA), blob_of(b"small")
    ing = open_ingest(store, blob)
    write(ing, DATA, [0])
    ing.close()
    assert store.abort(blob.digest) and store.ingests() == [] and not store.abort(blob.digest)
    assert open_ingest(store, blob).missing() == list(range(6))  # started over
    other = open_ingest(store, small)
    write(other, b"small", [0])
    other.commit()
    store.delete(small.digest)
    store.delete(small.digest)
    assert not store.has(small.digest)


def test_unverified_blob_learns_its_digest(store: Any) -> None:
    """Bytes named by the origin's own id are stored under the sha256 learnt on the way."""
    blob = blob_of(b"from s3", verified=False)
    ing = open_ingest(store, blob)
    write(ing, b"from s3", [0])
    ing.commit()
    assert ing.committed_as == "sha256:" + hashlib.sha256(b"from s3").hexdigest()
    assert store.read(ing.committed_as, 0, 100) == b"from s3"


@pytest.mark.parametrize("check", ["md5", "git_sha1", "md5_parts", "crc32", "crc32_parts", "crc64nvme"])
def test_the_origins_whole_blob_check_refuses_other_bytes(store: Any, check: str) -> None:
    """An unverified blob with the origin's MD5 (plain S3 ETag), multipart ETag (MD5 of the parts' MD5s,
    5-byte parts here), S3 CRC32 checksum (whole, or composite: CRC32 of the parts' big-endian CRCs), S3
    CRC64NVME checksum or
    git blob id (a Hub file kept in git): bytes that do not match it are refused at commit, as a sha256
    mismatch is; matching bytes commit."""
    good = b"the origin's bytes"
    parts = hashlib.md5(b"".join(hashlib.md5(good[i:i + 5]).digest() for i in range(0, len(good), 5)))
    crcs = b"".join(zlib.crc32(good[i:i + 5]).to_bytes(4, "big") for i in range(0, len(good), 5))
    right: object = {"md5": hashlib.md5(good).hexdigest(),
                     "git_sha1": hashlib.sha1(b"blob %d\0" % len(good) + good).hexdigest(),
                     "md5_parts": (5, parts.hexdigest() + "-4"),
                     "crc32": S3Checksum("crc32", 0, base64.b64encode(zlib.crc32(good).to_bytes(4, "big")).decode()),
                     "crc32_parts": S3Checksum("crc32", 5, base64.b64encode(zlib.crc32(crcs).to_bytes(4, "big"))
                                               .decode() + "-4"),
                     "crc64nvme": S3Checksum("crc64nvme", 0, base64.b64encode(
                         checksums.crc64nvme(good).to_bytes(8, "big")).decode()),
                     }[check]
    field = "crc" if check.startswith("crc") else check
    blob = dataclasses.replace(blob_of(good, verified=False), **{field: right})
    bad = b"the origin's bytez"
    ing = open_ingest(store, blob)
    write(ing, bad, [0])
    with pytest.raises(DigestMismatch):
        ing.commit()
    assert not store.has("sha256:" + hashlib.sha256(bad).hexdigest())
    ing = open_ingest(store, blob)
    write(ing, good, [0])
    ing.commit()
    assert store.read(ing.committed_as, 0, 100) == good


class _Origin:
    name = "memory://origin"

    def __init__(self, *blobs: bytes) -> None:
        self.data = {blob_of(b).digest: b for b in blobs}

    async def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes]:
        data = self.data[blob.digest][offset:offset + length]
        for i in range(0, len(data), 10_000):
            yield data[i:i + 10_000]


def test_the_engine_fills_any_ingester(store: Any) -> None:
    """The transfer engine needs only the Ingester role: it fills either store, blobs verified."""
    blobs = [os.urandom(3 * CHUNK + 1), os.urandom(CHUNK), b""]

    async def go() -> None:
        engine = Engine(store, TransferConfig(chunk_size=CHUNK, concurrency=3))
        try:
            await engine.fetch([blob_of(b) for b in blobs], OriginOnly(_Origin(*blobs)))
        finally:
            engine.close()

    asyncio.run(go())
    for data in blobs:
        assert store.read(blob_of(data).digest, 0, len(data) + 1) == data


def test_kept_prefix_of_a_chunk_survives_the_writer_and_hashes_right(store: Any) -> None:
    """keep() makes a chunk's leading bytes durable: a new writer resumes after them, and the blob it
    completes commits under the right sha256 (the hash picks the kept bytes up from the store)."""
    blob = blob_of(DATA)
    ing = open_ingest(store, blob)
    write(ing, DATA, [0])
    start, _ = ing.chunk_range(1)
    ing.write(start, DATA[start:start + 1000])
    ing.keep(1, 1000)
    start2, _ = ing.chunk_range(2)
    ing.write(start2, DATA[start2:start2 + 500])  # written, never kept
    assert (ing.resume_at(0), ing.resume_at(1), ing.resume_at(2)) == (CHUNK, 1000, 0)
    ing.close()
    again = open_ingest(store, blob)
    assert again.missing() == [1, 2, 3, 4, 5]
    assert (again.resume_at(1), again.resume_at(2)) == (1000, 0)
    assert again.bytes_done == CHUNK + 1000 == store.ingests()[0].bytes_done
    again.write(start + 1000, DATA[start + 1000:start + CHUNK])
    again.keep(1, CHUNK)  # the whole chunk: the same as mark_done
    assert again.missing() == [2, 3, 4, 5] and again.resume_at(1) == CHUNK
    write(again, DATA, again.missing())
    again.commit()
    assert store.read(blob.digest, 0, len(DATA)) == DATA
