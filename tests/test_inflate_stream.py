"""The unpacking pipeline of compressed layers, piece by piece (issue 13: gzip and zstd pulls made fast).

- :func:`modelcache.store.inflate.inflated`: bounded blocks whatever the
  input (a gzip or zstd bomb never comes out in one piece), gzip members and
  zero padding read through, a stream cut short is an error;
- :func:`modelcache.store.unpack.unpack_stream`: tar headers and file bytes
  split anywhere across chunks and blocks (a gzip member ending mid-header,
  one-byte chunks) give the same files; a file cut short, or the archive
  ending right after the last file's bytes (as umoci writes it);
- the streamed layer's reader (``_Followed.read_along``): it takes the bytes
  from the writer's buffers while they are in memory, and from the ingest on
  disk for what fell out of the window, byte-exact either way.

These run on buffers and a real store, without a registry: the pulls
themselves are tested in test_layer_stream.py.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import random
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import zstandard
from support import make_tar

from modelcache.errors import InvalidContent
from modelcache.model import Blob, Compression
from modelcache.store import inflate, streamunpack, unpack
from modelcache.store.content import ContentStore
from modelcache.store.unpack import unpack_stream

MiB = 1 << 20


def _files() -> dict[str, bytes]:
    """Files of awkward sizes: empty, one byte, one block, one byte past it, and two bigger ones."""
    rnd = random.Random(7)
    return {"empty": b"", "one": b"x", "block": rnd.randbytes(512), "block1": rnd.randbytes(513),
            "dir/mid.bin": rnd.randbytes(70_001), "dir/big.bin": bytes(300_000) + rnd.randbytes(123_457)}


def _tar(files: dict[str, bytes]) -> bytes:
    return make_tar([(p, d, {}) for p, d in files.items()])


def _gzip_members(raw: bytes, cuts: list[int]) -> bytes:
    """``raw`` as several gzip members cut at ``cuts``, with zero padding between two of them and at the end."""
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    members = [gzip.compress(p, mtime=0) for p in pieces]
    members[0] += bytes(7)  # padding between members, as some writers leave it (gzip(1) skips it)
    return b"".join(members) + bytes(512)


def _chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` in chunks of the given sizes, round and round."""
    out, at, i = [], 0, 0
    while at < len(data):
        out.append(data[at:at + sizes[i % len(sizes)]])
        at += sizes[i % len(sizes)]
        i += 1
    return out


def _stored(root: Path, rows: list) -> dict[str, bytes]:
    content = ContentStore(root)
    return {r[1]: content.path(r[2]).read_bytes() for r in rows if r[0] == "f"}


@pytest.mark.parametrize("isal", [True, False])
def test_gzip_members_split_mid_header_and_odd_chunks_unpack_byte_exact(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      isal: bool) -> None:
    """A member boundary inside a tar header (and inside a file), chunks of 1, 7 and 4099 bytes, and blocks of
    4 KiB: every header and file spans pieces, and the files come out as they went in."""
    monkeypatch.setattr(inflate, "ISAL", isal)
    monkeypatch.setattr(inflate, "BLOCK", 4096)
    monkeypatch.setattr(inflate, "READ_SIZE", 1000)
    files = _files()
    raw = _tar(files)
    header_of_second = 512 + 0  # "empty" is header only: the second header starts at byte 512
    cuts = [header_of_second + 100, 512 * 5 + 3, len(raw) // 2 + 11]  # mid-header, mid-file, mid-big-file
    layer = _gzip_members(raw, cuts)
    content = ContentStore(tmp_path)
    rows = unpack_stream(content, _chunked(layer, [1, 7, 4099]), Compression.GZIP, name="layer")
    assert _stored(tmp_path, rows) == files
    assert [r[1] for r in rows if r[0] == "f"] == list(files)


def test_zstd_frames_in_odd_chunks_unpack_byte_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inflate, "BLOCK", 4096)
    files = _files()
    raw = _tar(files)
    layer = zstandard.ZstdCompressor().compress(raw[:3000]) + zstandard.ZstdCompressor().compress(raw[3000:])
    rows = unpack_stream(ContentStore(tmp_path), _chunked(layer, [5, 777]), Compression.ZSTD, name="layer")
    assert _stored(tmp_path, rows) == files


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_a_bomb_comes_out_in_bounded_blocks(kind: str) -> None:
    """64 MiB of zeros compress to a few KiB: one chunk of input must not become one 64 MiB block."""
    size = 64 * MiB
    if kind == "gzip":
        layer, compression = gzip.compress(bytes(size), compresslevel=9, mtime=0), Compression.GZIP
    else:
        layer, compression = zstandard.ZstdCompressor().compress(bytes(size)), Compression.ZSTD
    assert len(layer) < MiB // 8
    total = biggest = 0
    for block in inflate.inflated([layer], compression):
        total += len(block)
        biggest = max(biggest, len(block))
        assert not any(block[:: 4096])
    assert total == size
    assert biggest <= inflate.BLOCK


def test_a_gzip_stream_cut_short_is_an_error(tmp_path: Path) -> None:
    layer = gzip.compress(_tar(_files()), mtime=0)
    with pytest.raises(EOFError):
        for _ in inflate.inflated([layer[: len(layer) - 20]], Compression.GZIP):
            pass
    with pytest.raises(InvalidContent, match="not a valid gzip tar archive"):
        unpack_stream(ContentStore(tmp_path), [layer[: len(layer) // 2]], Compression.GZIP, name="layer")


def test_a_file_cut_short_refuses_the_layer_and_stores_nothing(tmp_path: Path) -> None:
    files = {"a.bin": b"a" * 5000, "b.bin": b"b" * 5000}
    raw = _tar(files)
    cut = raw[: raw.index(b"b" * 512) + 100]  # inside b.bin's bytes
    content = ContentStore(tmp_path)
    with pytest.raises(InvalidContent, match="ends 4900 bytes before the end of a file"):
        unpack_stream(content, [cut], Compression.NONE, name="layer")
    assert not list(content.digests())
    assert not [p for p in content.ingest_dir.iterdir() if p.name.startswith("tmp-")]


def test_an_archive_ending_right_after_the_last_files_bytes_is_accepted(tmp_path: Path) -> None:
    """umoci insert (0.4.7) writes no padding and no end blocks after the last file: nothing is lost."""
    files = {"a.bin": b"a" * 1000, "b.bin": b"b" * 777}
    raw = _tar(files)
    end = raw.index(b"b" * 777) + 777
    rows = unpack_stream(ContentStore(tmp_path), [raw[:end]], Compression.NONE, name="layer")
    assert _stored(tmp_path, rows) == files


def test_file_bytes_reach_the_store_as_views_of_the_inflated_blocks(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """No copy between the inflater and the hash and write: a big file is staged from the inflater's own
    blocks, block by block (tarfile's stream mode copied each byte three times, issue 13)."""
    big = bytes(range(256)) * (3 * MiB // 256)
    layer = gzip.compress(_tar({"big": big}), mtime=0)
    blocks: list[bytes] = []
    real = inflate._gunzip

    def spy(chunks):
        for block in real(chunks):
            blocks.append(block)
            yield block

    monkeypatch.setattr(inflate, "_gunzip", spy)
    seen: list[memoryview] = []
    content = ContentStore(tmp_path)
    stage = content.stage_blocks

    def staged(pieces, **kwargs):
        def watch():
            for piece in pieces:
                seen.append(piece)
                yield piece
        return stage(watch(), **kwargs)

    monkeypatch.setattr(content, "stage_blocks", staged)
    rows = unpack_stream(content, [layer], Compression.GZIP, name="layer")
    assert rows == [["f", "big", "sha256:" + hashlib.sha256(big).hexdigest(), len(big)]]
    assert all(isinstance(p, memoryview) and any(p.obj is b for b in blocks) for p in seen)
    assert max(len(p) for p in seen) == inflate.BLOCK  # whole blocks, not tarfile's small reads
    assert len(seen) <= len(blocks) + 1


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_a_layer_is_inflated_in_a_thread_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   kind: str) -> None:
    """The inflate runs beside the hashing and writing of the files, not in turn with them: two cores for one
    layer (issue 13: a one-layer gzip image used one)."""
    made_in: set[str] = set()
    real = inflate.inflated

    def spy(chunks, compression):
        for block in real(chunks, compression):
            made_in.add(threading.current_thread().name)
            yield block

    monkeypatch.setattr(unpack, "inflated", spy)
    files = _files()
    layer = gzip.compress(_tar(files), mtime=0) if kind == "gzip" else zstandard.ZstdCompressor().compress(_tar(files))
    content = ContentStore(tmp_path)
    written_in: set[str] = set()
    stage = content.stage_blocks

    def staged(pieces, **kwargs):
        written_in.add(threading.current_thread().name)
        return stage(pieces, **kwargs)

    monkeypatch.setattr(content, "stage_blocks", staged)
    rows = unpack_stream(content, [layer], Compression(kind), name="layer")
    assert _stored(tmp_path, rows) == files
    assert made_in == {"mc-inflate"}
    assert written_in == {threading.current_thread().name}


def test_a_bomb_refused_by_its_size_stops_the_inflater_a_bounded_way_ahead(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The inflater runs ahead of the tar reader by at most HANDOFF_DEPTH blocks: a few KiB of gzip claiming
    256 MiB are refused at the file's header, after a handful of blocks, not after inflating it all."""
    bomb = make_tar([("zeros.bin", bytes(256 * MiB), {})])
    layer = gzip.compress(bomb, compresslevel=1, mtime=0)
    del bomb
    made = [0]
    real = inflate.inflated

    def counted(chunks, compression):
        for block in real(chunks, compression):
            made[0] += 1
            yield block

    monkeypatch.setattr(unpack, "inflated", counted)
    with pytest.raises(InvalidContent, match="add up to more than"):
        unpack_stream(ContentStore(tmp_path), [layer], Compression.GZIP, name="layer", limit=MiB)
    # The reader took one block (the header), the queue held HANDOFF_DEPTH, the inflater one more.
    assert 1 <= made[0] <= 1 + unpack.HANDOFF_DEPTH + 1


# -- the streamed layer's reader -----------------------------------------------------------------------


def _ingest(tmp_path: Path, data: bytes, chunk: int):
    content = ContentStore(tmp_path / "store")
    blob = Blob("sha256:" + hashlib.sha256(data).hexdigest(), len(data))
    ingest = asyncio.run(content.open_ingest(blob, chunk))
    assert ingest is not None
    return ingest


def _read_along(followed, path: Path, out: list, after_each=None) -> threading.Thread:
    """A thread reading ``followed`` into ``out``, calling ``after_each()`` after each piece (a slow reader)."""
    def run() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            for piece in followed.read_along(fd):
                out.append(piece)
                if after_each is not None:
                    after_each()
        finally:
            os.close(fd)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_the_reader_takes_the_writers_buffers_while_they_are_in_memory(tmp_path: Path) -> None:
    """Written in pieces of odd sizes while the reader keeps up: every byte comes from the pieces themselves
    (no read from disk), in order."""
    data = bytes(range(251)) * 4001
    ingest = _ingest(tmp_path, data, 1 << 16)
    followed = streamunpack._Followed(ingest)
    got: list = []
    thread = _read_along(followed, ingest.data_path, got)
    pieces = [data[a:a + 9999] for a in range(0, len(data), 9999)]
    at = 0
    for piece in pieces:
        followed.write(at, [piece])
        at += len(piece)
        deadline = time.monotonic() + 30
        while sum(len(g) for g in got) < at and time.monotonic() < deadline:
            time.sleep(0.001)  # the reader keeps up: the window never overflows
    followed.stop()
    thread.join(30)
    assert b"".join(bytes(g) for g in got) == data
    assert all(isinstance(g, memoryview) and any(g.obj is p for p in pieces) for g in got)
    ingest.close()


def test_a_reader_behind_the_window_reads_back_from_the_ingest(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader that does not come (the writer waits :data:`STALL` for it once, then goes on): what fell out
    of the window is read from disk, byte-exact."""
    monkeypatch.setattr(streamunpack, "WINDOW", 20_000)
    monkeypatch.setattr(streamunpack, "STALL", 0.05)
    data = bytes(range(253)) * 1000
    ingest = _ingest(tmp_path, data, 1 << 16)
    followed = streamunpack._Followed(ingest)
    at = 0
    for piece in [data[a:a + 7001] for a in range(0, len(data), 7001)]:
        followed.write(at, piece)
        at += len(piece)
    followed.stop()
    got: list = []
    _read_along(followed, ingest.data_path, got).join(30)  # starts only now: far behind
    assert b"".join(bytes(g) for g in got) == data
    from_disk = sum(len(g) for g in got if isinstance(g, bytes))
    assert from_disk >= len(data) - 20_000 - 7001  # all but the window
    assert any(isinstance(g, memoryview) for g in got)  # and the window's own from memory
    ingest.close()


def test_bytes_the_reader_takes_from_memory_go_past_the_page_cache(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """While the reader keeps up, the layer's bytes are written past the page cache (nobody reads them back:
    a buffered write cost 1 CPU s per GiB, issue 13); once it lags behind the window, through the cache,
    where it reads them back; past it again once it has caught up. Byte-exact either way."""
    monkeypatch.setattr(streamunpack, "WINDOW", 20_000)
    monkeypatch.setattr(streamunpack, "STALL", 0.05)  # the reader comes late: the writer goes on without it
    data = bytes(range(249)) * 200
    ingest = _ingest(tmp_path, data, 1 << 16)
    choices = _recording_bypass(ingest, monkeypatch)
    followed = streamunpack._Followed(ingest)
    pieces = [data[a:a + 7001] for a in range(0, len(data), 7001)]
    at = 0
    for piece in pieces[:3]:  # no reader yet: the third no longer fits the window
        followed.write(at, piece)
        at += len(piece)
    assert choices == [True, True, False]
    got: list = []
    thread = _read_along(followed, ingest.data_path, got)
    deadline = time.monotonic() + 30
    while sum(len(g) for g in got) < at and time.monotonic() < deadline:
        time.sleep(0.001)
    followed.write(at, pieces[3])  # caught up: the window is empty again
    at += len(pieces[3])
    assert choices == [True, True, False, True]
    for piece in pieces[4:]:
        followed.write(at, piece)
        at += len(piece)
    followed.stop()
    thread.join(30)
    assert b"".join(bytes(g) for g in got) == data
    ingest.close()


def _recording_bypass(ingest, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    choices: list[bool] = []
    real = ingest.bypass_cache

    def bypass(on: bool = True) -> None:
        choices.append(on)
        real(on)

    monkeypatch.setattr(ingest, "bypass_cache", bypass)
    return choices


def test_a_writer_waits_for_a_slower_reader_instead_of_outrunning_the_window(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader slower than the network (the CPU is the limit: issue 13) holds the writer to its pace: every
    byte is taken from memory, none read back from disk, and every write goes past the page cache. Before,
    the writer ran ahead, the window overflowed, and the rest went through the cache and back."""
    monkeypatch.setattr(streamunpack, "WINDOW", 20_000)
    data = bytes(range(247)) * 1200
    ingest = _ingest(tmp_path, data, 1 << 16)
    choices = _recording_bypass(ingest, monkeypatch)
    followed = streamunpack._Followed(ingest)
    got: list = []
    thread = _read_along(followed, ingest.data_path, got, after_each=lambda: time.sleep(0.002))
    at = 0
    for piece in [data[a:a + 7001] for a in range(0, len(data), 7001)]:
        followed.write(at, piece)
        at += len(piece)
    followed.stop()
    thread.join(30)
    assert b"".join(bytes(g) for g in got) == data
    assert all(isinstance(g, memoryview) for g in got)  # nothing read back
    assert choices and all(choices)
    ingest.close()


def test_a_stalled_reader_holds_the_writer_back_at_most_stall_seconds(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader that stops (its files' commit on a slow disk) holds each write for :data:`STALL` at most; the
    writer then goes on through the page cache, and the reader, once it moves, reads those bytes back."""
    monkeypatch.setattr(streamunpack, "WINDOW", 20_000)
    monkeypatch.setattr(streamunpack, "STALL", 0.2)
    data = bytes(range(241)) * 300
    ingest = _ingest(tmp_path, data, 1 << 16)
    choices = _recording_bypass(ingest, monkeypatch)
    followed = streamunpack._Followed(ingest)
    got: list = []
    go = threading.Event()
    thread = _read_along(followed, ingest.data_path, got, after_each=lambda: go.wait(30))  # stalls after one
    pieces = [data[a:a + 7001] for a in range(0, len(data), 7001)]
    waits = []
    at = 0
    for piece in pieces:
        started = time.monotonic()
        followed.write(at, piece)
        waits.append(time.monotonic() - started)
        at += len(piece)
    go.set()
    followed.stop()
    thread.join(30)
    assert b"".join(bytes(g) for g in got) == data
    assert max(waits) < 5  # bounded (0.2 s each, with room for a loaded machine)
    assert sum(1 for w in waits if w >= 0.15) >= 1  # it did wait for the reader before going on
    assert not all(choices)  # the bytes it could not wait for went through the cache
    ingest.close()


def test_forget_wakes_a_writer_waiting_for_room(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader gives up (an error in the tar): a writer waiting for room in the window goes on at once."""
    monkeypatch.setattr(streamunpack, "WINDOW", 10_000)
    monkeypatch.setattr(streamunpack, "STALL", 60.0)
    data = bytes(range(239)) * 100
    ingest = _ingest(tmp_path, data, 1 << 16)
    followed = streamunpack._Followed(ingest)
    followed.write(0, data[:8000])  # the reader, at byte 0, has not come yet: the window is now nearly full
    done = threading.Event()
    writer = threading.Thread(target=lambda: (followed.write(8000, data[8000:16000]), done.set()))
    writer.start()
    assert not done.wait(0.3)  # waiting for room
    followed.forget()
    assert done.wait(10)
    writer.join(10)
    ingest.close()


def test_forget_lets_go_of_the_writers_buffers(tmp_path: Path) -> None:
    data = bytes(5000)
    ingest = _ingest(tmp_path, data, 1 << 16)
    followed = streamunpack._Followed(ingest)
    buffer = bytes(data)  # a buffer of the writer's
    followed.write(0, memoryview(buffer))
    held = sys.getrefcount(buffer)
    followed.forget()
    assert sys.getrefcount(buffer) < held  # a pool that recycles unreferenced buffers may take it back
    assert followed._window_bytes == 0
    ingest.close()


def test_tar_headers_parse_through_the_forward_stream_as_through_a_file() -> None:
    """Long names (GNU and pax headers) read through the forward-only stream: tarfile asks for them by
    sized reads and skips ahead, nothing more."""
    long = "d/" + "n" * 300
    raw = make_tar([(long, b"data", {})], fmt=tarfile.GNU_FORMAT)
    from modelcache.store.unpack import _Forward

    stream = _Forward(iter(_chunked(raw, [3, 500])))
    tar = tarfile.TarFile(fileobj=stream, mode="r")  # type: ignore[arg-type]
    member = tar.next()
    assert member is not None and member.name == long and member.size == 4
    assert b"".join(stream.exactly(4)) == b"data"
    assert tar.next() is None
    with pytest.raises(io.UnsupportedOperation):
        stream.seek(0)


def test_a_big_files_commit_runs_beside_the_next_files_unpacking(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The fsync and link of one big file happen in another thread while the next file is written; every
    file is a blob before the listing is returned."""
    files = {"a.bin": bytes(range(256)) * 8193, "b.bin": bytes(range(255, -1, -1)) * 8191 + b"\x01", "c": b"small"}
    content = ContentStore(tmp_path)
    commits: list[tuple[str, list[str]]] = []
    staging: list[str] = []
    real_commit, real_stage = content.commit_staged, content.stage_blocks

    def commit(staged, **kwargs):
        time.sleep(0.2)  # a slow disk: the next file is being written meanwhile
        commits.append((threading.current_thread().name, [s.digest for s in staged]))
        real_commit(staged, **kwargs)

    def stage(blocks, **kwargs):
        staging.append(f"{len(commits)} committed when file {len(staging) + 1} was staged")
        return real_stage(blocks, **kwargs)

    monkeypatch.setattr(content, "commit_staged", commit)
    monkeypatch.setattr(content, "stage_blocks", stage)
    rows = unpack_stream(content, [gzip.compress(_tar(files), mtime=0)], Compression.GZIP, name="layer")
    assert _stored(tmp_path, rows) == files
    assert all(name.startswith("mc-commit") for name, _ in commits)
    assert staging[1] == "0 committed when file 2 was staged"  # a.bin's commit had not ended yet
    assert sorted(d for _, ds in commits for d in ds) == sorted(r[2] for r in rows)


def test_a_failed_commit_refuses_the_layer_and_leaves_no_temp_file(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    files = {"a.bin": bytes(2 * MiB), "b.bin": bytes(2 * MiB + 1)}
    content = ContentStore(tmp_path)
    real_commit = content.commit_staged

    def commit(staged, **kwargs):
        if staged[0].size == 2 * MiB:
            for one in staged:
                one.tmp.unlink()
            raise OSError(5, "I/O error")
        real_commit(staged, **kwargs)

    monkeypatch.setattr(content, "commit_staged", commit)
    with pytest.raises(OSError, match="I/O error"):
        unpack_stream(content, [_tar(files)], Compression.NONE, name="layer")
    assert not [p for p in content.ingest_dir.iterdir() if p.name.startswith("tmp-")]


def test_a_stream_cancelled_while_its_reader_stalls_ends_with_the_stall(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while the layer's unpacking is stalled (the writer waiting for it in an I/O thread): the pull
    stops once the stall ends, not after STALL per write, and keeps what arrived for the next one."""
    from modelcache.model import Archive
    from modelcache.store import Store
    from modelcache.transfer import Engine, TransferConfig

    monkeypatch.setattr(streamunpack, "WINDOW", 2 << 20)  # two writes of a 1 MiB chunk each
    monkeypatch.setattr(streamunpack, "STALL", 60.0)
    stall = threading.Event()
    real = streamunpack.unpack_stream

    def stalled(content, chunks, compression, **kwargs):
        def first_then_stall():
            it = iter(chunks)
            yield next(it)
            stall.wait(3)  # a disk that stalls the reader for 3 s
            yield from it
        return real(content, first_then_stall(), compression, **kwargs)

    monkeypatch.setattr(streamunpack, "unpack_stream", stalled)
    layer = gzip.compress(_tar({"big.bin": os.urandom(8 * MiB)}), compresslevel=1, mtime=0)
    blob = Blob("sha256:" + hashlib.sha256(layer).hexdigest(), len(layer))

    class Source:
        name = "memory"

        async def read(self, b, offset: int, length: int):
            for at in range(offset, offset + length, 64 << 10):
                await asyncio.sleep(0)
                yield layer[at:min(at + (64 << 10), offset + length)]

    store = Store(tmp_path / "store")
    engine = Engine(store.content, TransferConfig(chunk_size=1 << 20))

    async def go() -> float:
        from modelcache.transfer import TransferStats

        task = asyncio.create_task(streamunpack.stream_layer(store, engine, Archive(blob, Compression.GZIP),
                                                             Source(), TransferStats()))
        await asyncio.sleep(1.0)  # the reader took its first piece and stalls; the writer fills the window
        assert not task.done()
        started = time.monotonic()
        task.cancel()
        await asyncio.wait({task})
        return time.monotonic() - started

    try:
        took = asyncio.run(go())
    finally:
        stall.set()
        engine.close()
    assert took < 30, took  # the reader's 3 s stall at most (it was two STALLs: 120 s here)
    [kept] = store.content.ingests()
    assert 0 < kept.bytes_done < len(layer)
    store.close()
