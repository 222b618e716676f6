"""Bytes hashed from memory go to the disk past the page cache; bytes ahead of the hash are held for it.

Residency in the page cache is read with mincore(2), so these tests see what
the kernel holds, not what the code says it did.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support import blob_of, fetch_interrupted, fetch_once, resident

from modelcache.model import Blob
from modelcache.store import content as content_module
from modelcache.store.ahead import Ahead
from modelcache.store.content import ContentStore
from modelcache.store.direct import ALIGN, DirectWriter, GatheredWriter, pread_into
from modelcache.transfer import OriginOnly, TransferConfig

CHUNK = 256 << 10
PIECE = 64 << 10


def _o_direct_works(directory: Path) -> bool:
    try:
        fd = os.open(directory / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    (directory / "probe").unlink()
    return True


@pytest.fixture
def content(tmp_path: Path) -> ContentStore:
    if not _o_direct_works(tmp_path):
        pytest.skip("the test directory's filesystem refuses O_DIRECT")
    return ContentStore(tmp_path / "store")


def aligned(data: bytes) -> memoryview:
    """``data`` in page-aligned memory, as the lean HTTP reader hands it over."""
    buf = mmap.mmap(-1, max(len(data), 1))
    buf[: len(data)] = data
    return memoryview(buf)[: len(data)]


async def _open(content: ContentStore, blob: Blob):
    return await content.open_ingest(blob, CHUNK)


def ingest_of(content: ContentStore, blob: Blob):
    return asyncio.run(_open(content, blob))


class PreadCounter:
    """Counts the bytes the ingest reads back for its hash."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bytes = 0
        real = os.pread

        def pread(fd: int, n: int, offset: int) -> bytes:
            data = real(fd, n, offset)
            self.bytes += len(data)
            return data

        monkeypatch.setattr(content_module.os, "pread", pread)


# -- the pieces --------------------------------------------------------------------------------------


def test_ahead_takes_in_order_splits_at_a_limit_and_drops_a_range() -> None:
    ahead = Ahead(limit=10)
    assert ahead.reserve(6) and not ahead.reserve(5) and ahead.reserve(4)
    ahead.put(100, [memoryview(b"abc"), memoryview(b"def")])
    ahead.put(200, [memoryview(b"wxyz")])
    assert ahead.next_after(50) == 100 and ahead.next_after(100) == 200 and ahead.next_after(200) is None
    assert ahead.take(99, 10) is None
    first = ahead.take(100, 4)  # the rest stays held, at its own offset
    assert first is not None and b"".join(first) == b"abcd" and ahead.held == 6
    rest = ahead.take(104, 10)
    assert rest is not None and b"".join(rest) == b"ef" and ahead.held == 4
    ahead.drop(150, 250)
    assert ahead.held == 0 and ahead.next_after(0) is None


def test_direct_writer_writes_only_the_aligned_head(tmp_path: Path) -> None:
    if not _o_direct_works(tmp_path):
        pytest.skip("no O_DIRECT here")
    path = tmp_path / "f"
    path.write_bytes(b"")
    writer = DirectWriter(path)
    try:
        data = os.urandom(3 * ALIGN + 100)
        assert writer.write(1, [aligned(data)]) == 0  # an unaligned offset: nothing
        assert writer.write(0, [memoryview(b"x" * 100)]) == 0  # less than a block: nothing
        assert writer.write(0, [aligned(data)]) == 3 * ALIGN
        assert path.read_bytes() == data[: 3 * ALIGN]
    finally:
        writer.close()


def test_pread_into_reads_past_the_cache_where_aligned_and_ordinarily_elsewhere(tmp_path: Path) -> None:
    if not _o_direct_works(tmp_path):
        pytest.skip("no O_DIRECT here")
    path = tmp_path / "f"
    data = os.urandom(2 * ALIGN + 300)
    path.write_bytes(data)
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # out of the page cache, so a read would bring it back
    os.close(fd)
    buffer = mmap.mmap(-1, 4 * ALIGN)
    assert pread_into(path, ALIGN, buffer, 4 * ALIGN) == ALIGN + 300  # cut at the end of the file
    assert buffer[:ALIGN + 300] == data[ALIGN:]
    assert resident(path) == 0  # read past the cache
    assert pread_into(path, 7, buffer, 100) == 100  # unaligned: an ordinary read
    assert buffer[:100] == data[7:107]
    assert pread_into(path, 0, buffer, 2 * ALIGN, direct=False) == 2 * ALIGN  # asked through the cache
    assert buffer[:2 * ALIGN] == data[:2 * ALIGN] and resident(path) > 0


# -- the ingest -------------------------------------------------------------------------------------


def test_chunks_written_ahead_are_hashed_from_memory_and_bypass_the_page_cache(
        content: ContentStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunk 1 before chunk 0: with bypass_cache, nothing is read back for the hash and the blob's pages
    never enter the page cache; without it (the control), chunk 1 is read back."""
    data = os.urandom(2 * CHUNK + 3 * ALIGN + 17)  # an unaligned tail goes the buffered way
    blob = blob_of(data)
    reads = PreadCounter(monkeypatch)

    def write_out_of_order(bypass: bool) -> Path:
        ingest = ingest_of(content, blob)
        if bypass:
            ingest.bypass_cache()
        for index in (1, 2, 0):
            start, length = ingest.chunk_range(index)
            ingest.write(start, [aligned(data[start:start + length])])
        for index in range(ingest.chunks):
            ingest.mark_done(index)
        ingest.commit()
        return content.path(blob.digest)

    path = write_out_of_order(bypass=True)
    assert reads.bytes == 0
    assert resident(path) < 0.1  # the tail's page at most
    assert path.read_bytes() == data

    content.delete(blob.digest)
    write_out_of_order(bypass=False)
    assert reads.bytes >= CHUNK  # chunks 1 and 2 came back from the page cache


def test_a_rewound_chunk_is_not_hashed_from_what_was_held(content: ContentStore,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk held ahead of the hash, then rewound (its bytes failed a check) and written again where
    nothing more can be held (so it is read back): the hash takes the new bytes, and the blob commits."""
    monkeypatch.setattr(Ahead.__init__, "__defaults__", (CHUNK,))
    data = os.urandom(3 * CHUNK)
    blob = blob_of(data)
    ingest = ingest_of(content, blob)
    ingest.bypass_cache()
    ingest.write(CHUNK, [aligned(os.urandom(CHUNK))])  # wrong bytes, held for the hash
    ingest.rewind(1)
    for index in (2, 1, 0):  # chunk 2 is held, filling the limit: chunk 1 goes by the page cache
        start, length = ingest.chunk_range(index)
        ingest.write(start, [aligned(data[start:start + length])])
    for index in range(ingest.chunks):
        ingest.mark_done(index)
    ingest.commit()
    assert content.path(blob.digest).read_bytes() == data


def test_over_the_limit_bytes_ahead_are_read_back(content: ContentStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """More bytes ahead of the hash than may be held: the rest goes through the page cache and is read
    back, and the digest still comes out right."""
    monkeypatch.setattr(Ahead.__init__, "__defaults__", (CHUNK,))
    reads = PreadCounter(monkeypatch)
    data = os.urandom(4 * CHUNK)
    blob = blob_of(data)
    ingest = ingest_of(content, blob)
    ingest.bypass_cache()
    for index in (1, 2, 3, 0):
        start, length = ingest.chunk_range(index)
        for at in range(start, start + length, PIECE):
            ingest.write(at, [aligned(data[at:at + PIECE])])
    for index in range(ingest.chunks):
        ingest.mark_done(index)
    ingest.commit()
    assert content.path(blob.digest).read_bytes() == data
    assert reads.bytes == 2 * CHUNK  # chunk 1 was held; chunks 2 and 3 were read back


# -- the engine ---------------------------------------------------------------------------------------


class AlignedSource:
    """A ByteSource over bytes in memory, handing out page-aligned pieces as the lean HTTP reader does."""

    name = "aligned"

    def __init__(self, data: bytes, *, stop_after: int | None = None) -> None:
        self.data = data
        self.served = 0
        self.stop_after = stop_after
        self.started = asyncio.Event() if stop_after is not None else None

    async def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[memoryview]:
        for start in range(offset, offset + length, PIECE):
            if self.stop_after is not None and self.served >= self.stop_after:
                await asyncio.sleep(3600)  # hangs until cancelled
            piece = aligned(self.data[start:min(start + PIECE, offset + length)])
            self.served += len(piece)
            await asyncio.sleep(0)
            yield piece


class NotOriginOnly:
    """The same source through a router that is not OriginOnly (as a peer router is)."""

    def __init__(self, source: AlignedSource) -> None:
        self._sources = (source,)

    def sources(self, blob: Blob, chunk: int):
        return self._sources


def _fetch(content: ContentStore, blob: Blob, router) -> None:
    fetch_once(content, [blob], router, TransferConfig(chunk_size=CHUNK, concurrency=4))


def test_a_blob_from_its_origin_alone_lands_past_the_page_cache(content: ContentStore) -> None:
    """Four streams on one blob: fetched through OriginOnly, its pages are not cached (written directly,
    chunks ahead of the hash held for it); through another router (peers read chunks back) they are."""
    data = os.urandom(8 * CHUNK + 5)
    blob = blob_of(data)
    _fetch(content, blob, OriginOnly(AlignedSource(data)))
    path = content.path(blob.digest)
    assert resident(path) < 0.1
    assert path.read_bytes() == data

    content.delete(blob.digest)
    _fetch(content, blob, NotOriginOnly(AlignedSource(data)))
    assert resident(path) > 0.9
    assert path.read_bytes() == data


def test_an_interrupted_direct_fetch_resumes_to_the_right_digest(content: ContentStore) -> None:
    """Cancelled midway (chunks held ahead of the hash, partly written past the cache), the next fetch
    resumes from what was kept and the blob commits with its digest."""
    data = os.urandom(8 * CHUNK)
    blob = blob_of(data)
    slow = AlignedSource(data, stop_after=3 * CHUNK)
    fetch_interrupted(content, [blob], OriginOnly(slow), TransferConfig(chunk_size=CHUNK, concurrency=4),
                      until=lambda: slow.served >= 3 * CHUNK, grace=0.05)
    kept = content.ingests()[0].bytes_done
    assert 0 < kept < len(data)
    again = AlignedSource(data)
    _fetch(content, blob, OriginOnly(again))
    assert again.served == len(data) - kept
    assert content.path(blob.digest).read_bytes() == data


def test_a_big_file_unpacked_from_a_layer_lands_past_the_page_cache(content: ContentStore) -> None:
    """Blocks of odd sizes and alignments (the inflater's) are gathered and written past the page cache: the
    staged file is byte-exact and named by its sha256, with only its tail (one partial buffer) cached.
    A small file is written through the cache, as before (issue 13: writing unpacked files through it cost
    0.5 CPU s per GiB)."""
    big = os.urandom(3 * (4 << 20) + 12345)
    blocks = [big[a:a + 999_983] for a in range(0, len(big), 999_983)]
    staged = content.stage_blocks(iter(blocks), expected_size=len(big))
    assert resident(staged.tmp) < 0.3  # three direct buffers of four, at most the tail cached
    assert staged.tmp.read_bytes() == big
    assert staged.digest == blob_of(big).digest
    content.commit_staged([staged])
    assert content.path(staged.digest).read_bytes() == big

    small = os.urandom(100_000)
    staged = content.stage_blocks(iter([small]), expected_size=len(small))
    assert resident(staged.tmp) > 0.9
    content.commit_staged([staged])
    assert content.path(staged.digest).read_bytes() == small


def test_gathered_writes_fall_back_to_the_page_cache_where_o_direct_is_refused(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """On a filesystem that refuses O_DIRECT (tmpfs), every gathered buffer is written the ordinary way."""
    real_open = os.open

    def refusing(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "O_DIRECT refused")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing)
    data = os.urandom(2 * (1 << 16) + 77)
    path = tmp_path / "f"
    fd = real_open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        writer = GatheredWriter(fd, path, size=1 << 16)
        for a in range(0, len(data), 1000):
            writer.write(data[a:a + 1000])
        writer.close()
    finally:
        os.close(fd)
    assert path.read_bytes() == data


def test_a_file_given_up_midway_keeps_its_own_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A big file whose blocks fail midway (an unsafe tar, a stream cut short) is not written further when it
    is given up: its error stands, not a full disk met by a last write of the gathered bytes."""
    content = ContentStore(tmp_path / "store")

    def full(*args):
        raise OSError(errno.ENOSPC, "no space")

    monkeypatch.setattr(DirectWriter, "write", lambda self, offset, buffers: 0)  # everything the ordinary way
    monkeypatch.setattr(os, "pwrite", full)

    def blocks():
        yield os.urandom(1 << 20)
        raise ValueError("the tar said no")

    with pytest.raises(ValueError, match="the tar said no"):
        content.stage_blocks(blocks(), expected_size=8 << 20)
    assert not [p for p in content.ingest_dir.iterdir() if p.name.startswith("tmp-")]


def test_gathered_writers_reuse_a_few_buffers(tmp_path: Path) -> None:
    """A layer of many mid-sized files maps and zeroes one buffer, not one per file; two writers open at
    once never share one, and each file is byte-exact."""
    files = {name: os.urandom(size) for name, size in (("a", 70_000), ("b", 65_536), ("c", 1234))}
    buffers = []
    for name, data in files.items():
        fd = os.open(tmp_path / name, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            writer = GatheredWriter(fd, tmp_path / name, size=1 << 16)
            buffers.append(writer._buffer)
            writer.write(data)
            writer.close()
        finally:
            os.close(fd)
        assert (tmp_path / name).read_bytes() == data
    assert buffers[0] is buffers[1] is buffers[2]
    fds = [os.open(tmp_path / n, os.O_WRONLY | os.O_CREAT, 0o644) for n in ("x", "y")]
    try:
        first, second = (GatheredWriter(fd, tmp_path / n, size=1 << 16) for fd, n in zip(fds, "xy", strict=True))
        assert first._buffer is not second._buffer
        first.close()
        second.close()
    finally:
        for fd in fds:
            os.close(fd)


def test_receive_buffers_are_private_and_ask_for_huge_pages() -> None:
    """The lean reader's buffers, handed to O_DIRECT as they are: private (not shmem) and advised huge
    pages, so pinning them per write costs a few huge pages instead of a thousand small ones."""
    import ctypes

    from modelcache.sources.rawget import RawPool

    pool = RawPool(connect_timeout=1, read_timeout=1, threads=1)
    try:
        buf = pool.buffer()
        start = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        flags = None
        mapping = None
        for line in Path("/proc/self/smaps").read_text().splitlines():
            if "-" in line.split(" ")[0] and not line.startswith("VmFlags"):
                low, high = (int(x, 16) for x in line.split(" ")[0].split("-"))
                mapping = low <= start < high
            elif line.startswith("VmFlags") and mapping:
                flags = line.split()[1:]
                break
        assert flags is not None
        assert "sh" not in flags  # not shared
        if Path("/sys/kernel/mm/transparent_hugepage/enabled").exists():
            assert "hg" in flags  # MADV_HUGEPAGE
    finally:
        pool.close()
