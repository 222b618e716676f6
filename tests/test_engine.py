"""The transfer engine against an in-memory byte source with scripted faults."""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path

import pytest
from support import blob_of, fetch_interrupted, fetch_once

from modelcache.errors import DigestMismatch, NotFound, Unavailable
from modelcache.model import Blob
from modelcache.store.content import ContentStore
from modelcache.transfer import ChunkRouter, Engine, OriginOnly, TransferConfig, TransferStats

CHUNK = 64 << 10
PIECE = 10_000

Fault = tuple[int, Exception]  # (bytes to serve first, then raise this)


class MemorySource:
    """A ByteSource over bytes in memory, in small pieces, recording every request.

    ``faults`` is consulted once per request, in order: each item is None (serve
    the range) or (n, exc): serve ``n`` bytes of the range, then raise ``exc``.
    """

    def __init__(self, data: dict[str, bytes], *, name: str = "memory",
                 faults: Iterable[Fault | None] = ()) -> None:
        self.name = name
        self.data = data
        self.requests: list[tuple[str, int, int]] = []
        self._faults = iter(faults)

    @classmethod
    def of(cls, *blobs: bytes, **kwargs) -> MemorySource:
        """Serve each of ``blobs`` under its own digest."""
        return cls({blob_of(b).digest: b for b in blobs}, **kwargs)

    def requested(self, digest: str | None = None) -> int:
        """Bytes asked for (of one blob, or of all)."""
        return sum(n for d, _, n in self.requests if digest in (None, d))

    async def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes]:
        """Yield the range piece by piece, letting other tasks run in between."""
        self.requests.append((blob.digest, offset, length))
        data = self.data.get(blob.digest)
        if data is None:
            raise NotFound(f"{self.name}: no blob {blob.digest}")
        fault = next(self._faults, None)
        served = 0
        for start in range(offset, offset + length, PIECE):
            if fault is not None and served >= fault[0]:
                raise fault[1]
            piece = data[start:min(start + PIECE, offset + length)]
            served += len(piece)
            await asyncio.sleep(0)
            yield piece
        if fault is not None:
            raise fault[1]


class Router:
    """Routes every chunk to the given sources, in order."""

    def __init__(self, *sources: MemorySource) -> None:
        self._sources = sources

    def sources(self, blob: Blob, chunk: int) -> Sequence[MemorySource]:
        """The same sources for every chunk."""
        return self._sources


def config(**overrides: float) -> TransferConfig:
    """Small chunks, short backoff: the engine's logic without its waiting."""
    settings: dict = {"chunk_size": CHUNK, "concurrency": 4, "retries": 3,
                      "backoff_base": 0.001, "backoff_max": 0.005}
    return TransferConfig(**(settings | overrides))


def run(content: ContentStore, blobs: Sequence[Blob], source: MemorySource, *,
        cfg: TransferConfig | None = None, router: ChunkRouter | None = None, **kwargs) -> TransferStats:
    """One engine, one fetch (``kwargs`` go to it) in a fresh event loop, engine closed after."""
    return fetch_once(content, blobs, router or OriginOnly(source), cfg or config(), **kwargs)


def assert_committed(content: ContentStore, data: bytes) -> None:
    """The blob is in the store, whole, read-only, with no ingest left behind."""
    blob = blob_of(data)
    path = content.path(blob.digest)
    assert path.read_bytes() == data
    assert os.stat(path).st_mode & 0o777 == 0o444
    assert not (content.ingest_dir / blob.hex).exists()


def assert_absent(content: ContentStore, blob: Blob) -> None:
    """Nothing of the blob is visible under blobs/."""
    assert not content.has(blob.digest)
    assert list(content.blobs_dir.iterdir()) == []


@pytest.fixture
def content(tmp_path: Path) -> ContentStore:
    """An empty content store."""
    return ContentStore(tmp_path / "store")


def test_multi_chunk_blobs_land_verified(content: ContentStore) -> None:
    """Blobs of every shape arrive whole, each chunk asked for exactly once."""
    datas = [os.urandom(n) for n in (1, CHUNK - 1, CHUNK, 3 * CHUNK + 5, 7 * CHUNK)] + [b""]
    source = MemorySource.of(*datas)
    stats = run(content, [blob_of(d) for d in datas], source)
    for data in datas:
        assert_committed(content, data)
        blob = blob_of(data)
        ranges = sorted((o, n) for d, o, n in source.requests if d == blob.digest)
        assert ranges == [(o, min(CHUNK, len(data) - o)) for o in range(0, len(data), CHUNK)]
    total = sum(map(len, datas))
    assert stats.bytes_total == stats.bytes_done == stats.bytes_fetched == total
    assert stats.fetched_by_source == {"memory": total}
    assert stats.bytes_reused == stats.chunks_retried == 0


def test_duplicates_in_one_request_are_fetched_once(content: ContentStore) -> None:
    """The same blob named twice is one download."""
    data = os.urandom(2 * CHUNK)
    source = MemorySource.of(data)
    stats = run(content, [blob_of(data), blob_of(data)], source)
    assert source.requested() == len(data) == stats.bytes_total


def test_retry_resumes_at_the_byte_where_it_stopped(content: ContentStore) -> None:
    """Two resets mid-range: two retries, each asking only for the bytes not yet received."""
    data = os.urandom(CHUNK)
    reset = Unavailable("connection reset")
    source = MemorySource.of(data, faults=[(2 * PIECE, reset), (3 * PIECE, reset)])
    stats = run(content, [blob_of(data)], source)
    assert stats.chunks_retried == 2
    assert [(o, n) for _, o, n in source.requests] == [
        (0, CHUNK), (2 * PIECE, CHUNK - 2 * PIECE), (5 * PIECE, CHUNK - 5 * PIECE)]
    assert stats.bytes_fetched == CHUNK
    assert_committed(content, data)


def test_failing_forever_gives_up_after_retries(content: ContentStore) -> None:
    """A source that never works ends in Unavailable after 1 + retries attempts."""
    data = os.urandom(CHUNK)
    source = MemorySource.of(data, faults=itertools.repeat((0, Unavailable("HTTP 503"))))
    with pytest.raises(Unavailable, match=r"HTTP 503 \(gave up after 3 attempts\)"):
        run(content, [blob_of(data)], source, cfg=config(retries=2))
    assert len(source.requests) == 3
    assert_absent(content, blob_of(data))


def test_final_errors_are_not_retried(content: ContentStore) -> None:
    """NotFound is not worth retrying: one request, and the error as it was."""
    data = os.urandom(100)
    source = MemorySource({})
    with pytest.raises(NotFound):
        run(content, [blob_of(data)], source)
    assert len(source.requests) == 1


def test_retry_after_is_honoured(content: ContentStore) -> None:
    """A 429's Retry-After replaces the (here tiny) backoff."""
    data = os.urandom(1000)
    source = MemorySource.of(data, faults=[(0, Unavailable("HTTP 429", retry_after=0.3))])
    started = time.monotonic()
    stats = run(content, [blob_of(data)], source)
    assert 0.3 <= time.monotonic() - started < 5
    assert stats.chunks_retried == 1 and len(source.requests) == 2
    assert_committed(content, data)


def test_failed_fetch_resumes_with_only_missing_chunks(content: ContentStore) -> None:
    """Chunks made durable before a failure are not fetched again by the next pull."""
    data = os.urandom(4 * CHUNK)
    down = itertools.repeat((PIECE, Unavailable("down")))
    broken = MemorySource.of(data, faults=itertools.chain([None, None], down))
    with pytest.raises(Unavailable):
        run(content, [blob_of(data)], broken, cfg=config(concurrency=1, retries=1))
    healthy = MemorySource.of(data)
    stats = run(content, [blob_of(data)], healthy)
    assert sorted(o for _, o, _ in healthy.requests) == [2 * CHUNK, 3 * CHUNK]
    assert stats.bytes_reused == 2 * CHUNK and stats.bytes_fetched == 2 * CHUNK
    assert_committed(content, data)


def test_blob_already_in_store_costs_no_reads(content: ContentStore) -> None:
    """A committed blob (from any model) is reused, not fetched."""
    data = os.urandom(3 * CHUNK)
    content.write_stream(io.BytesIO(data))
    source = MemorySource.of(data)
    stats = run(content, [blob_of(data)], source)
    assert source.requests == []
    assert stats.bytes_reused == stats.bytes_done == len(data) and stats.bytes_fetched == 0


@pytest.mark.parametrize("engines", [1, 2], ids=["one-engine", "two-engines"])
def test_concurrent_fetches_read_each_byte_once(content: ContentStore, engines: int) -> None:
    """Two pulls of one blob at once (one engine, or two as two processes would) download it once."""
    data = os.urandom(5 * CHUNK + 7)
    sources = [MemorySource.of(data, name=f"s{i}") for i in range(2)]

    async def go() -> None:
        pool = [Engine(content, config()) for _ in range(engines)]
        try:
            await asyncio.gather(*(pool[i % engines].fetch([blob_of(data)], OriginOnly(s))
                                   for i, s in enumerate(sources)))
        finally:
            for engine in pool:
                engine.close()

    asyncio.run(go())
    assert sum(s.requested() for s in sources) == len(data)
    assert_committed(content, data)


def test_wrong_bytes_end_in_digest_mismatch(content: ContentStore) -> None:
    """Bytes that hash to something else are refused, nothing is committed, the next try starts clean."""
    data = os.urandom(3 * CHUNK)
    blob = blob_of(data)
    liar = MemorySource({blob.digest: os.urandom(len(data))})
    with pytest.raises(DigestMismatch, match=blob.digest):
        run(content, [blob], liar)
    assert_absent(content, blob)
    assert not (content.ingest_dir / blob.hex).exists()
    honest = MemorySource.of(data)
    stats = run(content, [blob], honest)
    assert honest.requested() == len(data) and stats.bytes_reused == 0
    assert_committed(content, data)


@pytest.mark.parametrize("extra", [1, PIECE])
def test_a_source_sending_too_much_commits_nothing_wrong(content: ContentStore, extra: int) -> None:
    """A source that overruns the range it was asked for cannot write past it: the blob is exact."""
    data = os.urandom(2 * CHUNK + 10)
    blob = blob_of(data)
    source = OverrunSource({blob.digest: data + os.urandom(extra)}, extra=extra)
    run(content, [blob], source)
    assert_committed(content, data)
    assert content.path(blob.digest).stat().st_size == len(data)


def test_a_source_ending_early_is_retried_for_the_rest(content: ContentStore) -> None:
    """A range that ends short without an error is retried from where it stopped, not marked done."""
    data = os.urandom(2 * CHUNK)
    source = ShortSource({blob_of(data).digest: data}, short=1000)
    stats = run(content, [blob_of(data)], source)
    assert_committed(content, data)
    assert stats.chunks_retried == 2
    assert (blob_of(data).digest, CHUNK - 1000, 1000) in source.requests


def test_empty_pieces_are_harmless(content: ContentStore) -> None:
    """A source may yield empty pieces between real ones (a quiet socket read)."""
    data = os.urandom(2 * CHUNK + 3)
    source = GappySource.of(data)
    run(content, [blob_of(data)], source, cfg=config(concurrency=1))
    assert_committed(content, data)


def test_router_falls_back_to_the_next_source(content: ContentStore) -> None:
    """A chunk whose first source fails is fetched from the next one, and counted there."""
    data = os.urandom(CHUNK)
    peer = MemorySource.of(data, name="peer", faults=[(PIECE, Unavailable("peer gone"))])
    origin = MemorySource.of(data, name="origin")
    stats = run(content, [blob_of(data)], origin, router=Router(peer, origin))
    assert origin.requests == [(blob_of(data).digest, PIECE, CHUNK - PIECE)]
    assert stats.fetched_by_source == {"peer": PIECE, "origin": CHUNK - PIECE}
    assert_committed(content, data)


def test_progress_is_reported(content: ContentStore) -> None:
    """The progress callback sees the transfer advance to its total."""
    data = os.urandom(2 * CHUNK)
    seen: list[int] = []
    run(content, [blob_of(data)], MemorySource.of(data), progress=lambda s: seen.append(s.bytes_done))
    assert seen and seen == sorted(seen) and seen[-1] == len(data)


class OverrunSource(MemorySource):
    """Sends ``extra`` bytes past every range it is asked for."""

    def __init__(self, data: dict[str, bytes], *, extra: int) -> None:
        super().__init__(data)
        self.extra = extra

    async def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes]:
        """The range, then more."""
        async for piece in super().read(blob, offset, length + self.extra):
            yield piece


class ShortSource(MemorySource):
    """Ends the first answer for each chunk ``short`` bytes early, silently."""

    def __init__(self, data: dict[str, bytes], *, short: int) -> None:
        super().__init__(data)
        self.short = short
        self.cut: set[int] = set()

    async def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes]:
        """The range, short once per offset."""
        if offset not in self.cut and length > self.short:
            self.cut.add(offset)
            length -= self.short
        async for piece in super().read(blob, offset, length):
            yield piece


class GappySource(MemorySource):
    """Yields an empty piece before and after every real one."""

    async def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes]:
        """The range, with empty pieces around each piece."""
        async for piece in super().read(blob, offset, length):
            yield b""
            yield piece
            yield b""


def test_blobs_share_slots_fairly_and_arrive_in_order(content: ContentStore) -> None:
    """As many blobs as slots: after the first round (where the first blob found every slot
    free), each blob is fetched by one stream, its chunks in order, so most bytes are hashed
    from memory as they are written instead of read back from disk."""
    blobs = [os.urandom(CHUNK * 8) for _ in range(4)]
    source = MemorySource.of(*blobs)
    read_back = 0
    real_pread = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        nonlocal read_back
        data = real_pread(fd, n, offset)
        read_back += len(data) if n > 1024 else 0  # not the small chunk records
        return data

    os.pread = pread  # type: ignore[assignment]
    try:
        run(content, [blob_of(b) for b in blobs], source, cfg=config(concurrency=4))
    finally:
        os.pread = real_pread  # type: ignore[assignment]
    for data in blobs:
        assert_committed(content, data)
    for data in blobs[1:]:
        offsets = [o for d, o, _ in source.requests if d == blob_of(data).digest]
        assert offsets == [i * CHUNK for i in range(8)]
    # The first blob's first round (three chunks ahead of its hash), and any chunk a blob
    # got a second slot for once others finished: a small share, where fetching every blob
    # with all slots at once would read back three quarters of the bytes.
    assert read_back <= len(blobs) * 8 * CHUNK // 4


# -- interrupts, sources that ignore Range, bytes that fail their digest (issue 10) ---------------


class TricklingSource(MemorySource):
    """Serves pieces slowly, so a fetch can be cancelled with chunks half received."""

    def __init__(self, data: dict[str, bytes], *, delay: float) -> None:
        super().__init__(data)
        self.delay = delay
        self.served = 0

    async def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes]:
        """The range, a piece every ``delay`` seconds."""
        async for piece in super().read(blob, offset, length):
            await asyncio.sleep(self.delay)
            self.served += len(piece)
            yield piece


def test_cancel_keeps_partial_chunks_and_the_next_fetch_asks_only_the_rest(content: ContentStore) -> None:
    """Cancelled with every chunk half received: each chunk's received prefix is durable and recorded,
    the next fetch asks only for the bytes after it, and the blob's sha256 still comes out right."""
    from modelcache.store.content import read_partial

    data = os.urandom(4 * CHUNK)
    blob = blob_of(data)
    slow = TricklingSource({blob.digest: data}, delay=0.01)
    # About 3 pieces per chunk.
    fetch_interrupted(content, [blob], OriginOnly(slow), config(), until=lambda: slow.served >= 12 * PIECE)
    served = slow.served
    kept = read_partial(content.ingest_dir / blob.hex, len(data), CHUNK)
    assert 0 < sum(kept.values()) == served < len(data)
    assert sorted(kept) == [0, 1, 2, 3]  # four streams, each stopped inside its chunk
    assert content.ingests()[0].bytes_done == served

    healthy = MemorySource.of(data)
    stats = run(content, [blob], healthy)
    assert sorted((o, n) for _, o, n in healthy.requests) == [
        (i * CHUNK + kept[i], CHUNK - kept[i]) for i in range(4)]
    assert healthy.requested() == len(data) - served
    assert stats.bytes_reused == served and stats.bytes_done == len(data)
    assert_committed(content, data)


class RangeIgnoringSource(MemorySource):
    """Answers any range as a server that ignores Range does: the whole blob from byte 0.

    Like the HTTP sources, it raises RangeIgnored for a range that stops short of the blob's end
    (unless the caller streams), and otherwise skips to the offset; ``sent`` counts every byte
    the 'server' sent, skipped or not.
    """

    def __init__(self, data: dict[str, bytes]) -> None:
        super().__init__(data)
        self.sent = 0

    async def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes]:
        """The whole blob, skipped to ``offset``."""
        from modelcache.errors import RangeIgnored
        from modelcache.sources.http import STREAMING

        self.requests.append((blob.digest, offset, length))
        data = self.data[blob.digest]
        if offset + length < len(data) and not STREAMING.get():
            self.sent += PIECE  # what a server pushes before the client hangs up
            raise RangeIgnored("HTTP 200 to a Range")
        for start in range(0, len(data), PIECE):
            piece = data[start:start + PIECE]
            self.sent += len(piece)
            await asyncio.sleep(0)
            if start + len(piece) > offset:
                yield piece[max(0, offset - start):]


def test_a_source_ignoring_range_is_read_as_one_stream(content: ContentStore) -> None:
    """Ranged GETs answered with the whole blob: the blob is read once, not once per chunk from byte 0."""
    data = os.urandom(16 * CHUNK + 5)
    source = RangeIgnoringSource({blob_of(data).digest: data})
    run(content, [blob_of(data)], source)
    assert_committed(content, data)
    streams = [r for r in source.requests if r[1] + r[2] == len(data)]
    assert len(streams) == 1
    assert source.sent <= len(data) + 4 * PIECE  # one body, plus what the first refused answers pushed


def test_a_stream_broken_midway_resumes_where_it_stopped(content: ContentStore) -> None:
    """In one-stream mode a body cut short is asked again, and only the chunks still missing are written."""
    data = os.urandom(6 * CHUNK)

    class Breaking(RangeIgnoringSource):
        broke = False

        async def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes]:
            n = 0
            async for piece in super().read(blob, offset, length):
                n += len(piece)
                if not self.broke and n > 3 * CHUNK:
                    self.broke = True
                    raise Unavailable("connection reset")
                yield piece

    source = Breaking({blob_of(data).digest: data})
    stats = run(content, [blob_of(data)], source)
    assert_committed(content, data)
    streams = [(o, n) for _, o, n in source.requests if o + n == len(data)]
    assert len(streams) == 2 and streams[0][0] == 0 and 3 * CHUNK - PIECE <= streams[1][0] <= 3 * CHUNK + PIECE
    assert stats.chunks_retried == 1


def test_bytes_failing_their_digest_are_fetched_once_more(content: ContentStore) -> None:
    """Wrong bytes once: discarded and fetched again, committed right. Wrong twice: DigestMismatch."""
    data = os.urandom(3 * CHUNK)
    blob = blob_of(data)

    class FlipsFirst(MemorySource):
        def __init__(self, flips: int) -> None:
            super().__init__({blob.digest: data})
            self.flips = flips

        async def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes]:
            flip = offset == CHUNK and self.flips > 0  # the first byte of chunk 1, once per fetch
            self.flips -= flip
            async for piece in super().read(blob, offset, length):
                if flip and piece:
                    piece, flip = bytes([piece[0] ^ 0xFF]) + piece[1:], False
                yield piece

    once = FlipsFirst(flips=1)
    stats = run(content, [blob], once)
    assert once.requested() == 2 * len(data)
    assert stats.bytes_done == stats.bytes_total == len(data)
    assert_committed(content, data)

    content.delete(blob.digest)
    twice = FlipsFirst(flips=2)
    with pytest.raises(DigestMismatch, match=rf"{blob.digest}.*fetched twice"):
        run(content, [blob], twice)
    assert twice.requested() == 2 * len(data)
    assert_absent(content, blob)
    assert not (content.ingest_dir / blob.hex).exists()


class HangupSource(MemorySource):
    """Like the lean reader: a buffer is being filled ahead while the caller writes the last piece; when
    the caller hangs up (modelcache.transfer.hangup), it yields what that buffer holds, then fails."""

    def __init__(self, data: dict[str, bytes], *, piece: int, ahead: int) -> None:
        super().__init__(data)
        self.piece, self.ahead = piece, ahead
        self.hung_up = asyncio.Event()

    async def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes]:
        """Whole pieces, until hung up; then the ``ahead`` bytes 'received' so far, then an error."""
        from modelcache.transfer.hangup import HANGUP

        self.requests.append((blob.digest, offset, length))
        data = self.data[blob.digest]
        hangup = HANGUP.get()
        assert hangup is not None, "the engine sets a hangup for every range it reads"
        hangup.add(self.hung_up.set)
        try:
            at = offset
            while at < offset + length:
                yield data[at:at + self.piece]
                at += self.piece
                if self.hung_up.is_set():
                    yield data[at:at + self.ahead]
                    raise Unavailable("connection closed")
        finally:
            hangup.discard(self.hung_up.set)


def test_cancel_during_a_write_takes_what_the_reader_holds(content: ContentStore, monkeypatch) -> None:
    """Cancelled while waiting on its own write (not on the reader): the engine hangs up, and the bytes
    the reader had received into its next buffer are written and kept too."""
    from modelcache.store.content import BlobIngest, read_partial
    from modelcache.transfer.rangecopy import WRITE_BLOCK

    data = os.urandom(4 * WRITE_BLOCK)
    blob = blob_of(data)
    source = HangupSource({blob.digest: data}, piece=WRITE_BLOCK, ahead=12_345)
    loop = asyncio.new_event_loop()
    writing = asyncio.Event()
    slow_write = BlobIngest.write

    def write(self, offset, pieces):  # noqa: ANN001 - the second write of the range waits, as a slow disk would
        if offset >= WRITE_BLOCK:
            loop.call_soon_threadsafe(writing.set)
            time.sleep(0.3)
        return slow_write(self, offset, pieces)

    monkeypatch.setattr(BlobIngest, "write", write)

    async def go() -> None:
        engine = Engine(content, config(chunk_size=len(data), concurrency=1))
        try:
            task = asyncio.create_task(engine.fetch([blob], OriginOnly(source)))
            await asyncio.wait_for(writing.wait(), 10)
            task.cancel()  # while the engine waits on that write: the reader is suspended, not cancelled
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            engine.close()

    try:
        loop.run_until_complete(go())
    finally:
        loop.close()
    assert source.hung_up.is_set()
    # Three whole pieces (written, being written when cancelled, handed over and waiting for that
    # write) and what the reader held in its next buffer.
    assert read_partial(content.ingest_dir / blob.hex, len(data), len(data)) == {0: 3 * WRITE_BLOCK + 12_345}


def test_a_fetch_asked_while_another_is_being_stopped_starts_anew(content: ContentStore) -> None:
    """The last caller of a blob gives up (its fetch stops, keeping what arrived); a caller asking for
    the blob meanwhile gets a new fetch that resumes there, not the cancellation of the old one."""
    data = os.urandom(4 * CHUNK)
    blob = blob_of(data)
    slow = TricklingSource({blob.digest: data}, delay=0.01)

    async def go() -> TransferStats:
        engine = Engine(content, config())
        try:
            first = asyncio.create_task(engine.fetch([blob], OriginOnly(slow)))
            for _ in range(500):
                if slow.served >= 4 * PIECE:
                    break
                await asyncio.sleep(0.01)
            first.cancel()
            await asyncio.sleep(0)  # the first caller is cancelled and is stopping its fetch
            second = asyncio.create_task(engine.fetch([blob], OriginOnly(MemorySource.of(data))))
            with pytest.raises(asyncio.CancelledError):
                await first
            return await second
        finally:
            engine.close()

    stats = asyncio.run(go())
    assert_committed(content, data)
    assert 0 < stats.bytes_reused < len(data)


def test_cancel_while_waiting_to_retry_keeps_the_bytes_of_the_failed_try(content: ContentStore) -> None:
    """A try that fails after two pieces, then a cancel while the retry waits: those pieces are kept."""
    from modelcache.store.content import read_partial

    data = os.urandom(CHUNK)
    blob = blob_of(data)
    source = MemorySource.of(data, faults=[(2 * PIECE, Unavailable("HTTP 503", retry_after=30))])

    # The try fails at once (pieces from memory); the retry waits up to 30 s, cancelled after 0.3 s.
    fetch_interrupted(content, [blob], OriginOnly(source), config(retries=3), grace=0.3)
    assert len(source.requests) == 1
    assert read_partial(content.ingest_dir / blob.hex, len(data), CHUNK) == {0: 2 * PIECE}


def test_the_next_chunk_is_fetched_while_the_last_one_is_made_durable(content: ContentStore, monkeypatch) -> None:
    """A chunk's fdatasync runs beside the next range, not before it (on a busy disk it takes seconds):
    with one stream, the first chunk's mark_done waits until the source has been asked for the next
    chunk, which only a worker not blocked on that fdatasync can ask for."""
    import threading

    from modelcache.store.content import BlobIngest

    data = os.urandom(4 * CHUNK)
    blob = blob_of(data)
    source = MemorySource.of(data)
    next_asked = threading.Event()
    original = MemorySource.read

    def read(self, blob: Blob, offset: int, length: int):
        if offset == CHUNK:
            next_asked.set()
        return original(self, blob, offset, length)

    order: list[str] = []
    mark_done = BlobIngest.mark_done

    def slow_mark_done(self, index: int) -> None:
        if index == 0:
            order.append(f"chunk 0 durable: {'after' if next_asked.wait(10) else 'before'} chunk 1 was asked")
        mark_done(self, index)

    monkeypatch.setattr(MemorySource, "read", read)
    monkeypatch.setattr(BlobIngest, "mark_done", slow_mark_done)
    run(content, [blob], source, cfg=config(concurrency=1))
    assert order == ["chunk 0 durable: after chunk 1 was asked"]
    assert_committed(content, data)


def _durable_prefix(ingest) -> int:
    """Bytes from 0 in chunks recorded durable, up to the first that is not."""
    n = 0
    for done in ingest.done:
        if not done:
            break
        n += 1
    return n * CHUNK


def test_a_stream_fetches_the_next_chunk_while_the_last_one_is_made_durable(content: ContentStore,
                                                                             monkeypatch) -> None:
    """One stream (a source ignoring Range): a chunk's fdatasync runs beside the next chunk's download,
    not before it; bounded: bytes written and not durable never reach past the chunk after the one
    syncing, however slow the disk."""
    import threading

    from modelcache.store.content import BlobIngest

    data = os.urandom(8 * CHUNK)
    source = RangeIgnoringSource({blob_of(data).digest: data})
    next_written = threading.Event()
    ahead: list[int] = []
    write, mark_done = BlobIngest.write, BlobIngest.mark_done

    def watching_write(self, offset: int, pieces) -> None:
        write(self, offset, pieces)
        end = offset + sum(len(p) for p in ([pieces] if isinstance(pieces, bytes | memoryview) else pieces))
        ahead.append(end - _durable_prefix(self))
        if offset >= CHUNK:
            next_written.set()

    order: list[str] = []

    def slow_mark_done(self, index: int) -> None:
        if index == 0:
            order.append(f"chunk 0 durable: {'after' if next_written.wait(10) else 'before'} chunk 1 arrived")
        time.sleep(0.05)  # a slow disk: an unbounded stream would run chunks ahead of it
        mark_done(self, index)

    monkeypatch.setattr(BlobIngest, "write", watching_write)
    monkeypatch.setattr(BlobIngest, "mark_done", slow_mark_done)
    run(content, [blob_of(data)], source)
    assert order == ["chunk 0 durable: after chunk 1 arrived"]
    assert ahead and max(ahead) <= 2 * CHUNK, max(ahead)
    assert_committed(content, data)


def test_engine_stream_returns_with_every_chunk_durable(content: ContentStore, monkeypatch) -> None:
    """Engine.stream (the layer unpacker's path) returns only once the last chunk's sync has, though
    each sync runs beside the next download: its caller commits at once."""
    from modelcache.store.content import BlobIngest

    data = os.urandom(3 * CHUNK + 11)
    blob = blob_of(data)
    mark_done = BlobIngest.mark_done

    def slow_mark_done(self, index: int) -> None:
        time.sleep(0.3 if index == 3 else 0)
        mark_done(self, index)

    monkeypatch.setattr(BlobIngest, "mark_done", slow_mark_done)

    async def go() -> bool:
        engine = Engine(content, config())
        ingest = await content.open_ingest(blob, CHUNK)
        assert ingest is not None
        try:
            await engine.stream(ingest, MemorySource.of(data), TransferStats())
            complete = ingest.complete()
            ingest.commit()
            return complete
        finally:
            ingest.close()
            engine.close()

    assert asyncio.run(go())
    assert_committed(content, data)


_CRASH_MID_SYNC = """
import asyncio, os, signal, sys, threading
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from test_engine import CHUNK, RangeIgnoringSource, blob_of, config
from modelcache.store.content import BlobIngest, ContentStore
from modelcache.transfer import Engine, OriginOnly

data = open(sys.argv[3], "rb").read()
arrived = threading.Event()
write, mark_done = BlobIngest.write, BlobIngest.mark_done

def watching_write(self, offset, pieces):
    write(self, offset, pieces)
    if offset >= 3 * CHUNK:
        arrived.set()

def crashing_mark_done(self, index):
    if index == 2:  # power lost inside chunk 2's fdatasync, chunk 3 arriving meanwhile
        os.kill(os.getpid(), signal.SIGKILL) if arrived.wait(10) else sys.exit(3)
    mark_done(self, index)

BlobIngest.write, BlobIngest.mark_done = watching_write, crashing_mark_done

async def go():
    engine = Engine(ContentStore(Path(sys.argv[2])), config())
    try:
        await engine.fetch([blob_of(data)], OriginOnly(RangeIgnoringSource({blob_of(data).digest: data})))
    finally:
        engine.close()

asyncio.run(go())
"""


def test_a_crash_while_a_stream_syncs_resumes_from_the_last_durable_chunk(content: ContentStore,
                                                                           tmp_path: Path) -> None:
    """SIGKILL inside a chunk's fdatasync while the next chunk arrives (the overlap): the next pull
    counts only the chunks recorded durable before it, and streams the rest from there."""
    import signal
    import subprocess
    import sys

    data = os.urandom(6 * CHUNK + 3)
    blob = blob_of(data)
    (tmp_path / "data").write_bytes(data)
    proc = subprocess.run([sys.executable, "-c", _CRASH_MID_SYNC, str(Path(__file__).parent),
                           str(content.root), str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=120, env=os.environ | {"PYTHONPATH": os.pathsep.join(
                              [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
    assert not content.has(blob.digest)

    source = RangeIgnoringSource({blob.digest: data})
    stats = run(content, [blob], source)
    assert_committed(content, data)
    assert stats.bytes_reused == 2 * CHUNK  # chunks 0 and 1; chunk 2 was written but never durable
    streams = [o for _, o, n in source.requests if o + n == len(data)]
    assert streams == [2 * CHUNK]


@pytest.mark.parametrize("failing", ["middle", "last"])
def test_a_stream_whose_sync_fails_fails(content: ContentStore, monkeypatch, failing: str) -> None:
    """A chunk's fdatasync failing beside the next download is not lost: the fetch fails with it,
    and nothing is committed."""
    from modelcache.store.content import BlobIngest

    data = os.urandom(4 * CHUNK)
    mark_done = BlobIngest.mark_done

    def failing_mark_done(self, index: int) -> None:
        if index in (1, 3) and (index == 3 or failing == "middle"):
            raise OSError("I/O error on the disk")
        mark_done(self, index)

    monkeypatch.setattr(BlobIngest, "mark_done", failing_mark_done)
    with pytest.raises(OSError, match="I/O error"):
        run(content, [blob_of(data)], RangeIgnoringSource({blob_of(data).digest: data}))
    assert_absent(content, blob_of(data))
