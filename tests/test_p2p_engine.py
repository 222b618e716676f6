"""The engine's side of peer-to-peer (issue 11): per-source retries, pieces cut by the blob alone,
per-piece checks of untrusted bytes, feedback to the router, fetches shared across callers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from test_engine import MemorySource, assert_committed, blob_of, config

from modelcache.errors import NotFound, Unavailable
from modelcache.model import Blob
from modelcache.store.content import ContentStore
from modelcache.transfer import Engine, TransferConfig
from modelcache.transfer.routing import PieceRouter

PIECE_SIZE = 16 << 10


@pytest.fixture
def content(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "store")


class Peer(MemorySource):
    """An untrusted source with one attempt, as a peer is."""

    trusted = False
    attempts = 1


class Liar(Peer):
    """A peer that flips the first byte of every range it serves."""

    async def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes]:
        first = True
        async for piece in super().read(blob, offset, length):
            if first:
                piece = bytes([piece[0] ^ 0xFF]) + piece[1:]
                first = False
            yield piece


class Pieces:
    """A PieceRouter over fixed sources: pieces of PIECE_SIZE, reversed order, a digest list if given."""

    def __init__(self, *sources: MemorySource, digests: list[str] | None = None) -> None:
        self._sources = list(sources)
        self.digests = digests
        self.reports: list[tuple[str, int, str]] = []

    def sources(self, blob: Blob, chunk: int) -> Sequence[MemorySource]:
        return [s for s in self._sources if (s.name, "lied") not in {(n, o) for n, _, o in self.reports}]

    def piece_size(self, blob: Blob) -> int:
        return PIECE_SIZE

    def order(self, blob: Blob, indexes: list[int]) -> list[int]:
        return list(reversed(indexes))

    async def piece_digests(self, blob: Blob) -> list[str] | None:
        return self.digests

    def report(self, source: object, blob: Blob, index: int, outcome: str) -> None:
        self.reports.append((getattr(source, "name", "?"), index, outcome))

    def trusted(self, blob: Blob) -> Sequence[MemorySource]:
        return self._sources[-1:]


def digests_of(data: bytes) -> list[str]:
    return [hashlib.sha256(data[i:i + PIECE_SIZE]).hexdigest() for i in range(0, len(data), PIECE_SIZE)]


def fetch(store: ContentStore, data: bytes, router: object, cfg: TransferConfig | None = None) -> Engine:
    async def go() -> Engine:
        engine = Engine(store, cfg or config())
        try:
            await engine.fetch([blob_of(data)], router)  # type: ignore[arg-type]
        finally:
            engine.close()
        return engine

    return asyncio.run(go())


def test_pieces_router_is_a_piece_router() -> None:
    assert isinstance(Pieces(), PieceRouter)


def test_a_peer_miss_or_failure_falls_through_at_once(content: ContentStore) -> None:
    """A peer that lacks the blob or dies costs no backoff sleep: the origin is asked at once."""
    data = os.urandom(4 * PIECE_SIZE)
    missing = Peer({}, name="miss")
    dead = Peer.of(data, name="dead", faults=[(0, Unavailable("refused"))] * 100)
    origin = MemorySource.of(data, name="origin")
    router = Pieces(missing, dead, origin)
    started = time.monotonic()
    fetch(content, data, router, config(backoff_base=30.0, backoff_max=30.0))
    assert time.monotonic() - started < 5  # one backoff would be up to 30 s
    assert_committed(content, data)
    assert origin.requested() == len(data)
    assert {o for n, _, o in router.reports if n == "miss"} == {"miss"}
    assert {o for n, _, o in router.reports if n == "dead"} == {"failed"}


def test_pieces_are_cut_by_the_router_whatever_the_chunk_size(content: ContentStore, tmp_path) -> None:
    """Two engines with different --chunk-size ask for the same piece ranges, in the router's order."""
    data = os.urandom(5 * PIECE_SIZE + 123)
    seen = []
    for n, chunk in enumerate((64 << 10, 4 << 10)):
        origin = MemorySource.of(data, name="origin")
        fetch(ContentStore(tmp_path / f"s{n}"), data, Pieces(origin), config(chunk_size=chunk, concurrency=1))
        seen.append([(o, n) for _, o, n in origin.requests])
    assert seen[0] == seen[1]
    assert seen[0][0] == (5 * PIECE_SIZE, 123)  # the router's order: last piece first
    assert sorted(seen[0]) == [(i * PIECE_SIZE, PIECE_SIZE) for i in range(5)] + [(5 * PIECE_SIZE, 123)]


def test_a_lying_peer_piece_is_checked_rewound_and_refetched(content: ContentStore) -> None:
    """With a digest list, a bad piece is caught on arrival, reported, and fetched from the origin."""
    data = os.urandom(4 * PIECE_SIZE)
    liar = Liar.of(data, name="liar")
    origin = MemorySource.of(data, name="origin")
    router = Pieces(liar, origin, digests=digests_of(data))
    fetch(content, data, router, config(concurrency=1))
    assert_committed(content, data)
    assert ("liar", 3, "lied") in router.reports  # the first piece walked (reversed order)
    assert origin.requested() == len(data)  # every piece again from the origin, the liar never used twice
    assert len(liar.requests) == 1


def test_a_lying_peer_without_a_list_is_caught_at_commit(content: ContentStore) -> None:
    """No digest list: the blob's sha256 catches it; the blob is fetched again from trusted sources."""
    data = os.urandom(3 * PIECE_SIZE)
    liar = Liar.of(data, name="liar")
    origin = MemorySource.of(data, name="origin")
    router = Pieces(liar, origin)
    fetch(content, data, router)
    assert_committed(content, data)
    assert ("liar", -1, "lied") in router.reports
    assert origin.requested() == len(data)


def test_a_caller_leaving_never_closes_the_source_under_another(content: ContentStore) -> None:
    """Two pulls share one fetch; the first is cancelled and its source closed: the second still completes."""
    data = os.urandom(8 * PIECE_SIZE)

    class Closable(MemorySource):
        closed = False

        async def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes]:
            await asyncio.sleep(0.02)
            if self.closed:
                raise NotFound(f"{self.name}: closed")
            async for piece in super().read(blob, offset, length):
                yield piece

    async def go() -> None:
        engine = Engine(content, config(concurrency=1))
        first, second = Closable.of(data, name="first"), Closable.of(data, name="second")
        try:
            a = asyncio.create_task(engine.fetch([blob_of(data)], Pieces(first)))
            await asyncio.sleep(0.05)
            b = asyncio.create_task(engine.fetch([blob_of(data)], Pieces(second)))
            await asyncio.sleep(0.05)
            a.cancel()
            first.closed = True  # what pull() does once its caller is gone
            await b
            assert second.requests
        finally:
            engine.close()

    asyncio.run(go())
    assert_committed(content, data)


def test_a_peer_stalling_mid_piece_hands_over_at_the_byte_reached(content: ContentStore) -> None:
    """A peer that stops mid-range (its read timeout) costs no backoff; the origin sends only the rest."""
    data = os.urandom(2 * PIECE_SIZE)
    half = 10_000  # MemorySource serves 10,000-byte pieces: the stall comes after the first
    stalled = Peer.of(data, name="stalled", faults=[(half, Unavailable("read timeout"))] * 10)
    origin = MemorySource.of(data, name="origin")
    router = Pieces(stalled, origin)
    fetch(content, data, router, config(concurrency=1, backoff_base=30.0, backoff_max=30.0))
    assert_committed(content, data)
    digest = blob_of(data).digest
    assert sorted(origin.requests) == [(digest, half, PIECE_SIZE - half),  # each piece resumed where it stopped
                                       (digest, PIECE_SIZE + half, PIECE_SIZE - half)]


def test_upload_limit_paces_bytes() -> None:
    from modelcache.p2p.limit import RateLimit

    async def go() -> float:
        limit = RateLimit(1 << 20)
        started = time.monotonic()
        for _ in range(12):
            await limit.take(256 << 10)  # 3 MiB at 1 MiB/s, the first second's worth as a burst
        return time.monotonic() - started

    assert 1.6 < asyncio.run(go()) < 4


def test_a_home_asked_while_resolving_waits_and_fetches_the_piece_once(content: ContentStore) -> None:
    """A peer's request for a piece of a blob this node is about to pull waits for the pull (instead of being
    sent to the origin) and is served by one origin fetch shared with the node's own; a blob this node
    neither pulls nor resolves is refused at once."""
    data = os.urandom(6 * PIECE_SIZE)
    digest = blob_of(data).digest

    async def go() -> None:
        engine = Engine(content, config(concurrency=1))
        origin = MemorySource.of(data, name="origin")
        try:
            started = time.monotonic()
            assert not await engine.ensure_piece("sha256:" + "00" * 32, 0, wait=5)
            assert time.monotonic() - started < 1
            with engine.resolving():
                asked = asyncio.create_task(engine.ensure_piece(digest, 2 * PIECE_SIZE + 5, wait=5))
                await asyncio.sleep(0.2)
                assert not asked.done()
                with engine.wanting([digest]):
                    fetching = asyncio.create_task(engine.fetch([blob_of(data)], Pieces(origin)))
                    assert await asked
                    await fetching
        finally:
            engine.close()
        assert sorted(o for _, o, _ in origin.requests) == [i * PIECE_SIZE for i in range(6)]  # each piece once

    asyncio.run(go())
    assert_committed(content, data)


class Stalled(MemorySource):
    """Holds the reader of one offset until released: a worker waiting on another home."""

    def __init__(self, *args, stall_at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stall_at = stall_at
        self.stalled = False
        self.release = asyncio.Event()

    async def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes]:
        if offset == self.stall_at:
            self.stalled = True
            await self.release.wait()
        async for piece in super().read(blob, offset, length):
            yield piece


def test_a_piece_a_peer_asks_for_is_fetched_while_every_slot_waits_elsewhere(content: ContentStore) -> None:
    """Our workers can hold every slot waiting on other homes, which wait on us for their pieces: what a
    peer asks us for gets slots of its own, or the cluster stalls until the peers' waits time out."""
    data = os.urandom(4 * PIECE_SIZE)
    digest = blob_of(data).digest

    async def go() -> None:
        engine = Engine(content, config(concurrency=1))
        origin = Stalled({digest: data}, name="origin", stall_at=3 * PIECE_SIZE)  # the one worker's first piece
        try:
            with engine.wanting([digest]):
                fetching = asyncio.create_task(engine.fetch([blob_of(data)], Pieces(origin)))
                for _ in range(500):
                    if origin.stalled:
                        break
                    await asyncio.sleep(0.01)
                assert origin.stalled
                assert await engine.ensure_piece(digest, 0, wait=2)  # a peer asks us (its home) for piece 0
                origin.release.set()
                await fetching
        finally:
            engine.close()

    asyncio.run(go())
    assert_committed(content, data)


def test_a_piece_whose_home_is_not_ready_comes_back_a_few_pieces_later(content: ContentStore) -> None:
    """A home that answers "not yet" puts its piece back a slot's round later, not at the queue's end: at the
    end, a late home's first pieces came back at the end of every peer's pull, all from that home at once
    (issue 11's namespace test)."""
    from modelcache.transfer.routing import NotYet

    data = os.urandom(12 * PIECE_SIZE)
    late = 11 * PIECE_SIZE  # the router's order is reversed: the first piece walked

    class NotReady(Peer):
        async def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes]:
            if offset == late:
                raise NotYet("its home is starting")
            raise NotFound("not here")
            yield b""  # an async generator

    origin = MemorySource.of(data, name="origin")
    fetch(content, data, Pieces(NotReady({}, name="home"), origin), config(concurrency=1))
    assert_committed(content, data)
    order = [o // PIECE_SIZE for _, o, _ in origin.requests]
    assert order[:3] == [10, 11, 9] and sorted(order) == list(range(12))
