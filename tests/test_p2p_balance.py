"""What keeps the peer exchange in step with the origin (issue 11's namespace test): pieces relayed in small
hand-offs from the origin's reader, and home pieces still queued given to a peer with a stream to spare."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from support import FetchingNeverReady

from modelcache.errors import NotFound
from modelcache.model import Blob
from modelcache.p2p import signing
from modelcache.p2p.client import (
    CATCHUP,
    HOLDER_HEADER,
    MODE_HEADER,
    URL_HEADER,
    PeerClient,
)
from modelcache.p2p.gate import BORROW_SECONDS, SPARE, Gate, Given
from modelcache.p2p.limit import RateLimit
from modelcache.p2p.relay import BLOCK, Relay, RelayedOrigin
from modelcache.p2p.server import PeerServer
from modelcache.sources.rawget import BUFFER, FILL, RawPool
from modelcache.store import Store

PIECE = 4 << 20
SECRET = b"s" * 16


def test_a_relayed_piece_leaves_the_origins_reader_in_small_blocks_while_it_arrives() -> None:
    """The lean reader hands over 4 MiB buffers: a 4 MiB piece relayed through it reached its peers in one
    block, after its last byte. Relayed, it comes in blocks of at most relay.BLOCK, the first long before the
    last; the reader's default is back once the piece started (other reads of the task keep 4 MiB)."""
    data = bytes(range(256)) * (PIECE // 256)

    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await resp.prepare(request)
        for at in range(0, len(data), 256 << 10):
            await resp.write(data[at:at + (256 << 10)])
            await asyncio.sleep(0.02)  # about 0.3 s in all
        await resp.write_eof()
        return resp

    class Origin:
        name = "oci://origin"

        def __init__(self, pool: RawPool, url: str) -> None:
            self.pool, self.url = pool, url

        async def read(self, blob: Blob, offset: int, length: int):
            resp = await self.pool.get(self.url, {})
            async for block in resp.body():
                yield block

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/blob", slow)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        pool = RawPool(connect_timeout=5, read_timeout=5)
        relay = Relay()
        blob = Blob("sha256:" + "cd" * 32, len(data))
        try:
            source = RelayedOrigin(Origin(pool, f"http://127.0.0.1:{port}/blob"), relay, lambda b, o, n: True)
            sizes, live_seen, got = [], [], b""
            async for block in source.read(blob, 0, len(data)):
                sizes.append(len(block))
                piece = relay.find(blob.digest, 0)
                live_seen.append(piece.size if piece is not None else -1)
                got += bytes(block)
                assert FILL.get() == BUFFER  # set for the reader's start only
            assert got == data
            assert max(sizes) <= BLOCK and len(sizes) >= PIECE // BLOCK
            assert 0 < live_seen[0] < len(data)  # peers could read the first bytes before the last came
        finally:
            pool.close()
            await runner.cleanup()

    asyncio.run(main())


async def _queued(gate: Gate, tag: tuple[str, int]) -> str:
    try:
        async with gate.turn(5, tag):
            return "fetched"
    except Given:
        return "given"


def test_a_home_gives_a_queued_piece_and_a_node_counts_the_pieces_it_took() -> None:
    """Gate.give ends a fetch still waiting for its turn with Given (its place never taken), not one let in;
    Gate.spare: nothing of ours waiting and fewer than limit + SPARE streams busy, pieces taken from homes
    counting until their read ends; Gate.light: our part of the pieces planned at most an even one."""

    async def go() -> None:
        gate = Gate(lambda: 2)
        release = asyncio.Event()

        async def hold() -> None:
            async with gate.turn(0):
                await release.wait()

        holders = [asyncio.create_task(hold()) for _ in range(2)]
        queued = asyncio.create_task(_queued(gate, ("blob", 7)))
        await asyncio.sleep(0.01)
        assert not gate.spare(time.monotonic())  # a fetch of ours waits: nothing to spare
        assert gate.give(("blob", 7)) and await queued == "given"
        assert not gate.give(("blob", 7)) and not gate.give(("blob", 8))  # nothing waits for those
        assert gate.inside == 2 and not gate.waiting()
        now = time.monotonic()
        assert gate.spare(now)  # both streams busy, every piece of ours started: SPARE more for pieces given
        gate.borrow(("other", 1), now)
        assert gate.borrowed(("other", 1)) and not gate.spare(now)
        gate.returned(("other", 1))
        assert gate.spare(now) and not gate.borrowed(("other", 1))
        release.set()
        await asyncio.gather(*holders)
        assert gate.inside == 0
        for n in range(2 + SPARE):
            assert gate.spare(now)
            gate.borrow(("other", n), now)
        assert not gate.spare(now)  # taken ones count as streams
        assert gate.spare(now + BORROW_SECONDS + 1)  # taken but never read (another source had it): lapsed
        # A node that was home for more than an even part of the pieces takes none from the others.
        gate.plan("a", [0, 1, 2], 8, 1024)
        assert not gate.light(4) and gate.light(2)  # 3 of 8: more than a quarter, less than a half
        gate.plan("b", [], 4, 1024)
        assert gate.light(4)  # 3 of 12
        for _ in range(3):
            gate.passed("a")
        gate.plan("c", [0, 1, 2, 3], 4, 1024)  # a new pull once the last one's pieces all passed: its share alone
        assert not gate.light(2)
        let_in = asyncio.create_task(_queued(gate, ("blob", 9)))
        await asyncio.sleep(0.01)
        assert await let_in == "fetched" and not gate.give(("blob", 9))

    asyncio.run(go())


def test_a_home_gives_a_queued_piece_to_a_requester_with_a_stream_to_spare(tmp_path: Path) -> None:
    """Asked as home with ``spare=1`` for a piece whose fetch still queues, the home gives it (404 origin) and
    the requester's client counts it as taken; later requesters are sent to the taker as their home. Without
    ``spare=1``, or when the fetch has started, nothing is given: the requester waits on the home."""
    store = Store(tmp_path / "store")
    digest = "sha256:" + "ab" * 32
    blob = Blob(digest, 3 * PIECE)
    queued = {(digest, PIECE)}  # piece 1's fetch waits for its turn here; piece 0's has started

    _Engine = FetchingNeverReady

    def give(d: str, offset: int) -> bool:
        if (d, offset) in queued:
            queued.discard((d, offset))
            return True
        return False

    server = PeerServer(store, _Engine(), SECRET, "home", minimum=PIECE,  # type: ignore[arg-type]
                        limit=RateLimit(0), home_wait=0.2, give=give)
    app = web.Application()
    server.add_routes(app)

    async def ask(client: TestClient, start: int, requester: str, spare: bool) -> web.Response:
        path = f"/v1/peer/blobs/{digest}?mode=home" + ("&spare=1" if spare else "")
        rng = f"bytes={start}-{start + PIECE - 1}"
        r = await client.get(path, allow_redirects=False, headers={
            "Range": rng, URL_HEADER: requester, signing.HEADER: signing.sign(SECRET, "GET", path, rng)})
        await r.read()
        return r

    async def go() -> None:
        async with TestClient(TestServer(app)) as client:
            r = await ask(client, 0, "http://a", spare=True)  # started here: not given, the requester waits
            assert (r.status, r.headers.get(MODE_HEADER)) == (404, "wait")
            r = await ask(client, PIECE, "http://b", spare=False)  # queued, but b has nothing to spare
            assert (r.status, r.headers.get(MODE_HEADER)) == (404, "wait") and queued
            r = await ask(client, PIECE, "http://a", spare=True)
            assert (r.status, r.headers.get(MODE_HEADER)) == (404, "origin") and not queued
            r = await ask(client, PIECE, "http://b", spare=False)  # sent to the taker, as its home
            assert r.status == 307 and r.headers[HOLDER_HEADER] == "http://a" and r.headers[MODE_HEADER] == "home"
            # The real client: asks with spare=1 when it has a stream to spare, and counts what it took.
            queued.add((digest, 2 * PIECE))
            took: list[tuple[str, int]] = []
            peers = PeerClient(SECRET, "c", me=lambda: "http://c", spare=lambda: True,
                               took=lambda b, offset: took.append((b.digest, offset)))
            home = str(client.make_url("")).rstrip("/")
            try:
                [first, *_] = peers.asks([(home, "home")])
                with pytest.raises(NotFound):
                    async for _ in first.read(blob, 2 * PIECE, PIECE):
                        pass
            finally:
                await peers.close()
            assert took == [(digest, 2 * PIECE)] and not queued

    try:
        asyncio.run(go())
    finally:
        store.close()


def test_a_home_answers_wait_while_a_relayed_piece_has_no_byte_yet(tmp_path: Path) -> None:
    """A piece whose origin read began but sent nothing (its server or a proxy holding it) gets a ``wait``
    answer within the home's wait, not a 206 that would keep the requester past its read timeout (failing the
    home, and sending the requester to the fallback: a second origin fetch); once bytes come, it streams."""
    store = Store(tmp_path / "store")
    digest = "sha256:" + "ef" * 32
    data = bytes(range(256)) * 256

    _Engine = FetchingNeverReady

    async def go() -> None:
        relay = Relay()
        live = relay.open(digest, 0, len(data))
        assert live is not None
        server = PeerServer(store, _Engine(), SECRET, "home", minimum=64 << 10,  # type: ignore[arg-type]
                            limit=RateLimit(0), home_wait=0.4, relay=relay)
        app = web.Application()
        server.add_routes(app)
        path, rng = f"/v1/peer/blobs/{digest}?mode=home", f"bytes=0-{len(data) - 1}"
        headers = {"Range": rng, signing.HEADER: signing.sign(SECRET, "GET", path, rng)}
        async with TestClient(TestServer(app)) as client:
            began = time.monotonic()
            r = await asyncio.wait_for(client.get(path, headers=headers), 10)
            await r.read()
            assert (r.status, r.headers.get(MODE_HEADER)) == (404, "wait") and time.monotonic() - began < 5
            asking = asyncio.create_task(client.get(path, headers=headers))
            await asyncio.sleep(0.1)
            live.add(data)
            r = await asyncio.wait_for(asking, 10)
            assert (r.status, await r.read()) == (206, data)

    try:
        asyncio.run(go())
    finally:
        store.close()


def test_peer_bodies_read_at_once_are_bounded_while_the_node_reads_its_own_pieces_from_the_origin() -> None:
    """A node's peer downloads crowd out its own origin reads (they cross two capped links, peers' bytes one),
    the pieces its peers wait on: while it has some, the client reads at most CATCHUP peer bodies at once; once
    it has none, any number (the limit is read again, no one needs to leave)."""
    fetching = [True]
    client = PeerClient(SECRET, "me", fetching=lambda: fetching[0])
    inside: list[int] = []
    release = asyncio.Event()

    async def body(n: int) -> None:
        async with client.catchup.hold():
            inside.append(n)
            await release.wait()

    async def go() -> None:
        tasks = [asyncio.create_task(body(n)) for n in range(CATCHUP + 2)]
        await asyncio.sleep(0.2)
        assert len(inside) == CATCHUP and client.catchup.active == CATCHUP
        fetching[0] = False  # our origin reads ended: the rest go at once
        await asyncio.sleep(0.2)
        assert sorted(inside) == list(range(CATCHUP + 2))
        release.set()
        await asyncio.gather(*tasks)
        assert client.catchup.active == 0

    asyncio.run(go())


def test_a_relayed_piece_whose_origin_read_crawls_is_asked_again_from_the_byte_reached(monkeypatch) -> None:
    """A home piece's origin read going at a fraction of the other pieces' pace (its TCP flow starved on a
    congested link: 0.8 MB/s for 5 s in the namespace test, while peers waited on it) is dropped and asked
    again, on a new request, from the byte it reached; the bytes handed on stay exact and in order."""
    import modelcache.p2p.relay as relay_module

    monkeypatch.setattr(relay_module, "SLOW_AFTER", 0.2)
    monkeypatch.setattr(relay_module, "WORTH", 64 << 10)
    size = 1 << 20
    data = {d: bytes([n]) * size for n, d in enumerate(("sha256:" + "11" * 32, "sha256:" + "22" * 32))}
    slow_digest, fast_digest = data
    asked: list[tuple[str, int]] = []
    reasked: list[asyncio.Event] = []  # set when the slow piece is asked again

    class Origin:
        name = "oci://origin"

        async def read(self, blob: Blob, offset: int, length: int):
            asked.append((blob.digest, offset))
            slow_asks = len([a for a in asked if a[0] == slow_digest])
            if blob.digest == slow_digest and slow_asks == 2:
                reasked[0].set()
            # The first read of the slow piece crawls at a fiftieth of the others' pace (or less, on a loaded
            # machine: its pause is long beside any scheduling delay), and the fast piece keeps its last
            # block until the slow one is asked again, so it is still arriving whenever the pace is judged.
            crawl = blob.digest == slow_digest and slow_asks == 1
            step = 16 << 10
            for at in range(offset, offset + length, step):
                await asyncio.sleep(0.5 if crawl else 0.01)
                if blob.digest == fast_digest and at + step >= offset + length:
                    await asyncio.wait_for(reasked[0].wait(), 30)
                yield data[blob.digest][at:min(at + step, offset + length)]

    async def pull(source: RelayedOrigin, digest: str) -> bytes:
        got = b""
        async for block in source.read(Blob(digest, size), 0, size):
            got += bytes(block)
        return got

    async def main() -> None:
        reasked.append(asyncio.Event())
        source = RelayedOrigin(Origin(), Relay(), lambda b, o, n: True)
        slow, fast = await asyncio.gather(pull(source, slow_digest), pull(source, fast_digest))
        assert slow == data[slow_digest] and fast == data[fast_digest]

    asyncio.run(main())
    again = [offset for digest, offset in asked if digest == slow_digest]
    assert len(again) == 2 and 0 == again[0] < again[1] < size  # once more, from the byte reached
    assert [offset for digest, offset in asked if digest == fast_digest] == [0]
