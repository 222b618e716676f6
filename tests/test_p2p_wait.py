"""A requester goes to the origin only when no peer holds or fetches a piece, never because one was slow
(issue 11): a home that answers ``wait`` is asked again, a home that failed hands the piece to its fallback
as acting home. The engine and the real PeerClient against fake peers on loopback (aiohttp test servers)."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from daemon_support import free_port
from test_engine import MemorySource, assert_committed, blob_of, config

from modelcache.errors import NotFound
from modelcache.model import Blob
from modelcache.p2p.client import HOLDER_HEADER, MODE_HEADER, PeerClient, PeerSource
from modelcache.p2p.router import plan
from modelcache.store.content import ContentStore
from modelcache.transfer import Engine

PIECE = 16 << 10


@pytest.fixture
def content(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "store")


class FakePeer:
    """Answers ``home`` asks of each range with ``wait`` ``waits`` times, then the bytes; ``have`` asks with
    the bytes if ``holds``, else 404; ``answer`` overrides every home ask (e.g. elected: 404 origin)."""

    def __init__(self, data: bytes, *, waits: int = 0, holds: bool = True, answer: str | None = None,
                 late: float = 0.0, redirect: str | None = None) -> None:
        self.data, self.waits, self.holds, self.answer, self.late = data, waits, holds, answer, late
        self.redirect = redirect  # home asks are sent to this holder (307)
        self.asked: Counter[tuple[str, str]] = Counter()  # (mode, range) -> times

    async def handle(self, request: web.Request) -> web.StreamResponse:
        mode, range_ = request.query.get("mode", "have"), request.headers["Range"]
        self.asked[(mode, range_)] += 1
        if self.late and self.asked[(mode, range_)] == 1:
            await asyncio.sleep(self.late)  # its first answer comes past the requester's read timeout
        if mode == "home" and self.redirect:
            return web.Response(status=307, headers={HOLDER_HEADER: self.redirect})
        if mode == "home" and self.answer:
            return web.Response(status=404, headers={MODE_HEADER: self.answer})
        if mode == "home" and self.asked[(mode, range_)] <= self.waits:
            await asyncio.sleep(0.02)  # a home's short wait for its own fetch
            return web.Response(status=404, headers={MODE_HEADER: "wait"})
        if not self.holds and mode != "home":
            return web.Response(status=404)
        first, _, last = range_.removeprefix("bytes=").partition("-")
        return web.Response(status=206, body=self.data[int(first):int(last) + 1])

    def modes(self) -> set[str]:
        return {mode for mode, _ in self.asked}


class Asks:
    """A PieceRouter whose sources are the real client's asks for a fixed plan, then the origin."""

    def __init__(self, client: PeerClient, asks: list[tuple[str, str]], origin: MemorySource) -> None:
        self.client, self.asks, self.origin = client, asks, origin
        self.reports: list[tuple[str, str]] = []

    def sources(self, blob: Blob, chunk: int) -> Sequence[object]:
        return [*self.client.asks(self.asks), self.origin]

    def piece_size(self, blob: Blob) -> int:
        return PIECE

    def order(self, blob: Blob, indexes: list[int]) -> list[int]:
        return indexes

    async def piece_digests(self, blob: Blob) -> list[str] | None:
        return None

    def report(self, source: object, blob: Blob, index: int, outcome: str) -> None:
        self.reports.append((getattr(source, "url", "origin"), outcome))

    def trusted(self, blob: Blob) -> Sequence[object]:
        return [self.origin]


def pull(content: ContentStore, data: bytes, peers: dict[str, FakePeer | None],
         read_timeout: float = 2.0) -> tuple[MemorySource, Asks]:
    """Fetch ``data`` with the home and its fallback as ``peers`` (None: an address nobody listens on)."""
    origin = MemorySource.of(data, name="origin")

    async def go() -> Asks:
        servers, urls = [], []
        for peer in peers.values():
            if peer is None:
                urls.append(f"http://127.0.0.1:{free_port()}")
                continue
            app = web.Application()
            app.router.add_get("/v1/peer/blobs/{digest}", peer.handle)
            server = TestServer(app, host="127.0.0.1")
            await server.start_server()
            servers.append(server)
            urls.append(str(server.make_url("")).rstrip("/"))
        client = PeerClient(b"k" * 16, "me", read_timeout=read_timeout, me=lambda: "http://me")
        router = Asks(client, plan([*urls, "http://me"], "http://me"), origin)
        engine = Engine(content, config(concurrency=2))
        try:
            await engine.fetch([blob_of(data)], router)  # type: ignore[arg-type]
        finally:
            engine.close()
            await client.close()
            for server in servers:
                await server.close()
        return router

    return origin, asyncio.run(go())


def test_a_home_that_fetches_the_piece_slowly_is_waited_on_not_bypassed(content: ContentStore) -> None:
    """The home answers ``wait`` three times for every piece (it fetches them, slowly): every byte comes
    from it, none from the origin, and the fallback is only asked whether it holds a piece."""
    data = os.urandom(4 * PIECE)
    home, fallback = FakePeer(data, waits=3), FakePeer(data, holds=False)
    origin, _ = pull(content, data, {"home": home, "fallback": fallback})
    assert_committed(content, data)
    assert origin.requested() == 0
    assert all(n == 4 for (mode, _), n in home.asked.items() if mode == "home")  # 3 waits, then the bytes
    assert fallback.modes() <= {"have"}


def test_a_departed_home_hands_its_pieces_to_the_fallback_as_acting_home(content: ContentStore) -> None:
    """The home's address refuses connections: the fallback is asked as the piece's home (it fetches it
    once for everyone the home failed) and waited on; the origin serves nothing."""
    data = os.urandom(4 * PIECE)
    fallback = FakePeer(data, waits=2, holds=False)
    origin, router = pull(content, data, {"home": None, "fallback": fallback})
    assert_committed(content, data)
    assert origin.requested() == 0
    assert fallback.modes() == {"home"}
    assert ("failed" in {o for u, o in router.reports if u != fallback_url(router)})  # the home, benched


def test_a_home_late_once_is_asked_again_not_replaced(content: ContentStore) -> None:
    """The home's first answer for each piece comes past the read timeout (a loaded machine): it is asked
    once more, and serves; neither the fallback as a home nor the origin is used."""
    data = os.urandom(2 * PIECE)
    home, fallback = FakePeer(data, late=1.0), FakePeer(data, holds=False)
    origin, router = pull(content, data, {"home": home, "fallback": fallback}, read_timeout=0.4)
    assert_committed(content, data)
    assert origin.requested() == 0
    assert fallback.modes() <= {"have"}
    home_url = next(url for url, mode in router.asks if mode == "home")
    assert (home_url, "failed") in router.reports  # the late answer failed once (a strike), the retry served


def test_a_holder_the_home_sends_us_to_that_is_gone_hands_back_to_the_home(content: ContentStore) -> None:
    """The home sends us to a holder that has left (connection refused): we ask the home again in held mode
    and it serves; the home is not counted as failed, nor the fallback asked as a home, nor the origin."""
    data = os.urandom(2 * PIECE)
    home = FakePeer(data, redirect=f"http://127.0.0.1:{free_port()}")
    fallback = FakePeer(data, holds=False)
    origin, router = pull(content, data, {"home": home, "fallback": fallback})
    assert_committed(content, data)
    assert origin.requested() == 0
    assert {mode for mode, _ in home.asked} == {"home", "held"}
    assert fallback.modes() <= {"have"} and all(o != "failed" for _, o in router.reports)


def test_a_home_that_elected_us_sends_us_on_without_waiting(content: ContentStore) -> None:
    """A home that cannot fetch the piece elects us (404, Mode: origin): no patient re-ask, the fallback is
    asked only whether it holds it, and the origin serves the piece once."""
    data = os.urandom(2 * PIECE)
    home, fallback = FakePeer(data, answer="origin"), FakePeer(data, holds=False)
    origin, _ = pull(content, data, {"home": home, "fallback": fallback})
    assert_committed(content, data)
    assert origin.requested() == len(data)
    assert all(n == 1 for n in home.asked.values())
    assert fallback.modes() == {"have"}


def fallback_url(router: Asks) -> str:
    return next(url for url, mode in router.asks if mode == "fallback")


def test_a_patient_ask_with_nothing_to_wait_for_is_skipped_at_once() -> None:
    """The patient re-ask of a home runs only after the home said it fetches the piece."""
    client = PeerClient(b"k" * 16, "me")
    home, patient = client.asks([("http://127.0.0.1:1", "home")])
    assert not home.patient and patient.patient and home.round is patient.round

    async def read(source: PeerSource) -> bytes:
        return b"".join([b async for b in source.read(Blob("sha256:" + "ab" * 32, 10), 0, 10)])

    with pytest.raises(NotFound, match="nothing to wait for"):
        asyncio.run(read(patient))
