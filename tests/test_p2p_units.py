"""The peer layer's small parts, each on its own: pieces, rendezvous, signatures, discovery, membership,
the router's choices (issue 11)."""

from __future__ import annotations

import asyncio
import socket
import time

from support import FetchingNeverReady

from modelcache.model import Blob
from modelcache.p2p import signing
from modelcache.p2p.client import PeerClient, PeerSource
from modelcache.p2p.discovery import DnsPeers, StaticPeers, parse_dns
from modelcache.p2p.gate import Gate, share
from modelcache.p2p.members import Members
from modelcache.p2p.pieces import piece_size
from modelcache.p2p.ring import piece_key, rank
from modelcache.p2p.router import HOME_PROBES, PROBES, PeerRouter, in_step, plan, rounds

GiB = 1 << 30
MiB = 1 << 20


def test_piece_size_is_a_function_of_the_blob_size_alone() -> None:
    assert piece_size(0) == piece_size(100 * MiB) == piece_size(4 * GiB) == 4 * MiB
    assert piece_size(10 * GiB) == 16 * MiB
    assert piece_size(1000 * GiB) == 64 * MiB  # capped
    assert piece_size(1 * MiB, 64 << 10) == 64 << 10


def test_rendezvous_moves_only_the_keys_whose_home_changed() -> None:
    members = [f"http://10.0.0.{i}:8470" for i in range(8)]
    keys = [piece_key("sha256:" + "ab" * 32, i) for i in range(2000)]
    before = {k: rank(k, members) for k in keys}
    joined = "http://10.0.0.99:8470"
    after = {k: rank(k, [*members, joined]) for k in keys}
    moved = [k for k in keys if after[k][0] != before[k][0]]
    assert moved and all(after[k][0] == joined for k in moved)  # only to the newcomer
    assert 0.05 < len(moved) / len(keys) < 0.2  # about 1/9 of them
    gone = members[3]
    left = {k: rank(k, [m for m in members if m != gone]) for k in keys}
    assert all(left[k][0] == before[k][0] for k in keys if before[k][0] != gone)
    assert all(left[k][0] == before[k][1] for k in keys if before[k][0] == gone)  # the fallback takes over
    homes = [before[k][0] for k in keys]
    assert max(homes.count(m) for m in members) < 1.3 * len(keys) / len(members)


def test_signatures_bind_method_path_range_and_time() -> None:
    key = b"0123456789abcdef0123"
    header = signing.sign(key, "GET", "/v1/peer/blobs/x?mode=home", "bytes=0-9")
    assert signing.check(key, "GET", "/v1/peer/blobs/x?mode=home", "bytes=0-9", header) is None
    assert signing.check(key, "GET", "/v1/peer/blobs/x?mode=home", "bytes=0-99", header) == "wrong peer signature"
    assert signing.check(key, "GET", "/v1/peer/blobs/y?mode=home", "bytes=0-9", header) == "wrong peer signature"
    assert signing.check(b"another-key-entirely", "GET", "/v1/peer/blobs/x?mode=home", "bytes=0-9",
                         header) == "wrong peer signature"
    assert signing.check(key, "GET", "/p", "", None) == "no peer signature"
    assert signing.check(key, "GET", "/p", "", "garbage") == "malformed peer signature"
    old = signing.sign(key, "GET", "/p", "", now=time.time() - 120)
    assert signing.check(key, "GET", "/p", "", old) == "stale peer signature"


def test_dns_discovery_resolves_and_follows_changes_without_a_restart() -> None:
    async def go() -> None:
        real = DnsPeers("localhost", 8470)
        assert "http://127.0.0.1:8470" in await real.resolve()  # the system resolver, /etc/hosts here

        answers = [[("10.0.0.1",)], [("10.0.0.1",), ("10.0.0.2",)], [("fd00::3",)]]

        async def resolver(name: str, port: int, **kwargs: object) -> list[tuple]:
            addrs = answers.pop(0) if len(answers) > 1 else answers[0]
            return [(socket.AF_INET6 if ":" in a[0] else socket.AF_INET, 1, 6, "", (a[0], port)) for a in addrs]

        dns = DnsPeers("modelcache.svc", 9000, interval=0.01, resolver=resolver)
        task = asyncio.create_task(dns.run())
        seen = []
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not seen or seen[-1] != dns.urls():
                seen.append(dns.urls())
            if dns.urls() == {"http://[fd00::3]:9000"}:
                break
        task.cancel()
        assert seen[0] == {"http://10.0.0.1:9000"}
        assert {"http://10.0.0.1:9000", "http://10.0.0.2:9000"} in seen
        assert seen[-1] == {"http://[fd00::3]:9000"}

    asyncio.run(go())
    assert parse_dns("svc.ns", 8470) == ("svc.ns", 8470)
    assert parse_dns("svc.ns:9000", 8470) == ("svc.ns", 9000)


def test_a_node_never_counts_itself_and_benches_bad_peers() -> None:
    peers = StaticPeers(["127.0.0.1:1", "http://127.0.0.1:2/", "http://127.0.0.1:3", "http://127.0.0.1:4"])
    members = Members(peers, "node-a", me="http://127.0.0.1:1")
    assert members.peers() == ["http://127.0.0.1:2", "http://127.0.0.1:3", "http://127.0.0.1:4"]
    members.found_self("http://127.0.0.1:4")  # a peer answered with our own node id (DNS lists us too)
    assert "http://127.0.0.1:4" not in members.peers()
    members.report("http://127.0.0.1:2", "failed")
    members.report("http://127.0.0.1:3", "miss")
    assert members.peers() == ["http://127.0.0.1:3"]
    assert sorted(members.ranking()) == ["http://127.0.0.1:1", "http://127.0.0.1:3"]
    peers.set(["http://127.0.0.1:1", "http://127.0.0.1:5"])  # membership changes without a restart
    assert members.peers() == ["http://127.0.0.1:5"]


def test_a_peer_that_times_out_is_benched_only_at_its_third_strike_in_a_row() -> None:
    """A timeout may be a loaded machine's lag, not a dead peer: benching it at once would make us the home
    of its pieces (and send us to the origin); three in a row with no answer between bench it."""
    from modelcache.p2p.members import SLOW_STRIKES

    url = "http://127.0.0.1:7"
    members = Members(StaticPeers([url]), "me")
    for _ in range(SLOW_STRIKES - 1):
        members.report(url, "slow")
    members.report(url, "miss")  # it answered: the strikes start over
    for _ in range(SLOW_STRIKES - 1):
        members.report(url, "slow")
    assert members.peers() == [url]
    members.report(url, "slow")
    assert members.peers() == []


class Origin:
    name = "oci://origin"

    def read(self, blob: Blob, offset: int, length: int):  # pragma: no cover - never read here
        raise AssertionError


def test_router_asks_the_home_then_probes_candidates_then_the_origin() -> None:
    urls = [f"http://127.0.0.1:{p}" for p in range(1001, 1007)]
    me = urls[0]
    members = Members(StaticPeers(urls), "me", me=me)
    client = PeerClient(b"k" * 16, "me")
    origin = Origin()
    router = PeerRouter(origin, members, client, minimum=64 << 10)
    blob = Blob("sha256:" + "cd" * 32, 10 * (64 << 10))
    for index in range(10):
        ranked = rank(piece_key(blob.digest, index), urls)
        sources = router.sources(blob, index)
        assert sources[-1] is origin
        peers = [s for s in sources if isinstance(s, PeerSource)]
        assert all(p.url != me for p in peers)  # never ourselves
        if ranked[0] == me:  # we are the home: nobody else is asked to fetch it, only whether they hold it
            assert [p.mode for p in peers] == ["have"] * len(peers)
            assert [p.url for p in peers] == ranked[1:1 + HOME_PROBES]  # all five others here
        else:
            # the home, then the home again as a patient ask (it waits while the home fetches the piece)
            assert [(p.url, p.mode, p.patient) for p in peers[:2]] == [(ranked[0], "home", False),
                                                                       (ranked[0], "home", True)]
            # the fallback (unless it is us) stands in as the home if the home fails; the rest are probed
            rest = [u for u in ranked[1:4] if u != me]
            assert [p.url for p in peers[2:]] == rest
            assert [p.mode for p in peers[2:]] == ["fallback" if ranked[1] != me else "have"] + \
                ["have"] * (len(rest) - 1)
            assert len({id(p.round) for p in peers}) == 1  # the asks of one piece share what they learn
    order = router.order(blob, list(range(40)))
    homes = {i: rank(piece_key(blob.digest, i), urls)[0] for i in range(40)}
    mine = [i for i in range(40) if homes[i] == me]
    assert sorted(order) == list(range(40))
    # In step with the homes: each home's pieces in index order, and the k-th piece of any home before
    # the k+1-th of any other (a home is asked for the piece it fetches just then).
    position = {i: [j for j in range(40) if homes[j] == homes[i]].index(i) for i in range(40)}
    assert [position[i] for i in order] == sorted(position[i] for i in order)
    for url in urls:
        assert [i for i in order if homes[i] == url] == [i for i in range(40) if homes[i] == url]
    assert router.ahead(blob, list(range(40))) == mine  # fetched ahead, in index order
    other = PeerRouter(origin, Members(StaticPeers(urls), "x", me=urls[1]), client, minimum=64 << 10)
    assert other.order(blob, list(range(40))) != order  # each node walks its own order within a round
    alone = PeerRouter(origin, Members(StaticPeers([me]), "me", me=me), client, minimum=64 << 10)
    assert alone.ahead(blob, list(range(40))) == []  # no peers: nothing to fetch ahead of the workers
    router.report(PeerSource(client, urls[2], "home"), blob, 0, "lied")
    assert urls[2] not in members.ranking()  # a liar drops out: the next candidate becomes the home


def test_blobs_of_unknown_sha256_go_through_peers_only_with_a_check_from_the_origin() -> None:
    """An S3 object with a plain ETag (its MD5) or a Hub file with its git blob id: the store checks the
    whole blob at commit, so peers are asked. A multipart ETag checks nothing: the origin alone."""
    urls = [f"http://127.0.0.1:{p}" for p in range(1001, 1004)]
    origin = Origin()
    router = PeerRouter(origin, Members(StaticPeers(urls), "me"), PeerClient(b"k" * 16, "me"), minimum=64 << 10)
    unchecked = Blob("sha256:" + "ef" * 32, 1 << 20, verified=False)
    assert list(router.sources(unchecked, 0)) == [origin]
    for checked in (Blob("sha256:" + "ef" * 32, 1 << 20, verified=False, md5="0" * 32),
                    Blob("sha256:" + "ef" * 32, 1 << 20, verified=False, git_sha1="0" * 40),
                    Blob("sha256:" + "ef" * 32, 1 << 20)):
        assert len(router.sources(checked, 0)) == 5  # home, home again (patient), fallback, probe, origin


def test_a_home_sends_later_requesters_to_holders_in_sweeps(tmp_path) -> None:
    """The home hands a piece's requesters to its holders in sweeps: a broadcast tree, not a star."""
    from modelcache.p2p.holders import Holders

    holders = Holders()
    key = ("sha256:" + "ab" * 32, 0)
    answers = []
    for n in range(1, 32):
        requester = f"http://r{n}"
        answer = holders.next_holder(key, requester)
        answers.append(answer)
        if answer is None:
            holders.served(key, requester)  # the home served it whole
        else:
            assert answer != requester and answer in holders.held(key)[:-1]  # an earlier holder, never itself
    assert answers[:8] == [None, None, "http://r1", None, "http://r1", "http://r2", "http://r3", None]
    assert answers.count(None) <= 6  # the home serves about log2(N) of N requesters, not most of them
    sent = [a for a in answers if a is not None]
    assert max(sent.count(h) for h in set(sent)) <= 5  # and no holder serves everyone either
    assert holders.held(key) == [f"http://r{n}" for n in range(1, 32)]  # every requester holds it now
    assert all(holders.next_holder(key, "http://r1") != "http://r1" for _ in range(40))  # never to itself


def test_a_home_that_does_not_fetch_a_blob_elects_one_requester_per_piece() -> None:
    """A home with no pull of the blob cannot reach the origin: the first requester fetches the piece, the
    others are sent to it, until the election lapses (a requester that died stops drawing others)."""
    from modelcache.p2p.holders import ELECTION_SECONDS, Holders

    holders = Holders()
    key, other = ("sha256:" + "cd" * 32, 0), ("sha256:" + "cd" * 32, 65536)
    assert holders.elect(key, "http://a", now=100.0) is None  # the first asks: it fetches
    assert holders.elect(key, "http://b", now=100.5) == "http://a"
    assert holders.elect(key, "http://c", now=101.0) == "http://a"
    assert holders.elect(key, "http://a", now=101.0) is None  # asked again, still its own to fetch
    assert holders.elect(other, "http://b", now=101.0) is None  # each piece its own election
    assert holders.elected(key, now=101.0) == "http://a"  # the home's own pull asks a first, not the origin
    assert holders.elected(other, now=101.0) == "http://b" and holders.elected(("x", 0), now=101.0) is None
    later = 100.0 + ELECTION_SECONDS + 1
    assert holders.elected(key, now=later) is None
    assert holders.elect(key, "http://c", now=later) is None  # lapsed: c fetches it now
    assert holders.elect(key, "http://b", now=later) == "http://c"


def test_a_home_asks_more_candidates_than_a_requester_before_the_origin() -> None:
    """When nodes join in numbers, a piece's earlier home can rank below several of them: the new home asks
    HOME_PROBES candidates whether they hold the piece (not just PROBES) before it goes to the origin."""
    urls = [f"http://10.0.0.{n}:8470" for n in range(20)]
    assert HOME_PROBES > PROBES
    for index in range(10):
        ranked = rank(piece_key("sha256:" + "ab" * 32, index), urls)
        # The home: the next HOME_PROBES candidates, asked whether they hold it (the earlier home ranked
        # 6th after a pool doubled is among them).
        assert plan(ranked, ranked[0]) == [(u, "have") for u in ranked[1:1 + HOME_PROBES]]
        # Anyone else: the home, the fallback and the probes after them, as before.
        me = ranked[-1]
        assert plan(ranked, me) == [(ranked[0], "home"), (ranked[1], "fallback"),
                                    *[(u, "have") for u in ranked[2:PROBES + 1]]]
        assert plan(ranked, ranked[2])[:2] == [(ranked[0], "home"), (ranked[1], "fallback")]
        assert len(plan(ranked, ranked[2])) == PROBES


def test_in_a_large_cluster_only_the_first_round_is_walked_in_step_with_the_homes() -> None:
    """Past ORIGIN_STREAMS members a node walks every home's first piece in step, then the rest from an offset
    of its own (each node a different one), not round after round: in step, the last rounds are every node
    wanting the same few pieces at once (the cluster simulator's slowest node: 3.4x solo at 100 nodes)."""
    assert in_step(2) is None and in_step(8) is None  # a small cluster: every round in step, as before
    assert in_step(9) == 1 and in_step(5000) == 1
    urls = [f"http://10.0.0.{n}:8470" for n in range(12)]
    blob = Blob("sha256:" + "ef" * 32, 200 * (64 << 10))
    homes = {i: rank(piece_key(blob.digest, i), urls)[0] for i in range(200)}
    first = {min(i for i in range(200) if homes[i] == u) for u in set(homes.values())}
    orders = []
    for me in urls[:3]:
        router = PeerRouter(Origin(), Members(StaticPeers(urls), "me", me=me), PeerClient(b"k" * 16, "me"),
                            minimum=64 << 10)
        order = router.order(blob, list(range(200)))
        assert sorted(order) == list(range(200))
        assert set(order[:len(first)]) == first  # every home's first piece first
        rest = order[len(first):]
        start = rest.index(min(rest))
        assert rest[start:] + rest[:start] == sorted(rest)  # then the others in index order, from an offset
        orders.append(rest[0])
    assert len(set(orders)) == 3  # each node from its own
    every = rounds(list(range(200)), homes.__getitem__, urls[0], lambda home: len(home))
    assert every != rounds(list(range(200)), homes.__getitem__, urls[0], lambda home: len(home), in_step=1)


def test_a_home_that_elected_a_requester_asks_it_first_when_it_pulls_the_blob_itself() -> None:
    """Asked as a piece's home before its own pull began, a node elected a requester to fetch the piece;
    when it then pulls the blob, that requester comes first, as the piece's home (not the origin)."""
    urls = [f"http://127.0.0.1:{p}" for p in range(1001, 1007)]
    blob = Blob("sha256:" + "cd" * 32, 40 * (64 << 10))
    index = next(i for i in range(40) if rank(piece_key(blob.digest, i), urls)[0] == urls[0])
    offset = index * (64 << 10)
    elected = {(blob.digest, offset): urls[5]}
    router = PeerRouter(Origin(), Members(StaticPeers(urls), "me", me=urls[0]), PeerClient(b"k" * 16, "me"),
                        minimum=64 << 10, elected=lambda digest, at: elected.get((digest, at)))
    peers = [s for s in router.sources(blob, index) if isinstance(s, PeerSource)]
    assert [(p.url, p.mode) for p in peers[:2]] == [(urls[5], "home")] * 2
    assert urls[5] not in [p.url for p in peers[2:]] and all(p.mode == "have" for p in peers[2:])
    other = next(i for i in range(40) if rank(piece_key(blob.digest, i), urls)[0] == urls[0] and i != index)
    assert all(p.mode == "have" for p in router.sources(blob, other) if isinstance(p, PeerSource))


async def piece_tagged(gate: Gate, inside: list[str], release: dict[str, asyncio.Event], name: str, position: int,
                       tag: tuple[str, int]) -> None:
    async with gate.turn(position, tag):
        inside.append(name)
        await release[name].wait()


def test_the_origin_gate_shares_the_clusters_streams_and_lets_the_lowest_position_in_first() -> None:
    """Each of n nodes fetches its home pieces on 8 // n origin streams (one alone keeps 8); waiters go in by
    position (the k-th piece of every blob before any k+1-th), the limit is read again as members change,
    and a waiter cancelled in the queue or just let in never keeps a place."""
    assert [share(n) for n in (1, 2, 4, 8, 50)] == [8, 4, 2, 1, 1]

    async def go() -> None:
        limit = [2]
        gate = Gate(lambda: limit[0])
        inside: list[str] = []
        release = {name: asyncio.Event() for name in ("a0", "b0", "a1", "b1", "a2", "b2", "x")}

        async def piece(name: str, position: int) -> None:
            async with gate.turn(position):
                inside.append(name)
                await release[name].wait()

        tasks = [asyncio.create_task(piece(n, int(n[1]))) for n in ("a0", "a1", "a2", "b0", "b1", "b2")]
        await asyncio.sleep(0.01)
        assert inside == ["a0", "a1"] and gate.inside == 2  # first come while there is room
        doomed = asyncio.create_task(piece("x", 0))
        await asyncio.sleep(0.01)
        doomed.cancel()  # cancelled while queued: skipped, its place not kept
        release["a0"].set()
        await asyncio.sleep(0.01)
        assert inside == ["a0", "a1", "b0"]  # position 0 of blob b before position 2 of blob a
        limit[0] = 4  # a member left: more room, used at the next exit
        release["a1"].set()
        await asyncio.sleep(0.01)
        assert inside == ["a0", "a1", "b0", "b1", "a2", "b2"] and gate.inside == 4
        for event in release.values():
            event.set()
        await asyncio.gather(*tasks, doomed, return_exceptions=True)
        assert gate.inside == 0
        # While a blob's home pieces pass, the limit follows our part of its pieces, not the head count.
        gate.plan("blob", list(range(3, 48, 3)), 48, 1024)
        assert gate.limit() == 3  # 8 x 15/48 = 2.5 streams, rounded
        assert gate.position("blob", 9) == 2 and gate.position("blob", 10) is None
        assert gate.tag("blob", 9 * 1024 + 5) == ("blob", 9) and gate.tag("blob", 10 * 1024) is None
        # A piece a peer waits on goes in next, before waiters of lower positions, whether it waits already or
        # comes later; but within the limit (a burst over it starved every stream of the node).
        holders = [asyncio.create_task(piece(f"h{n}", 0)) for n in range(3)]
        for name in ("h0", "h1", "h2", "q", "late", "w"):
            release[name] = asyncio.Event()
        waiting = asyncio.create_task(piece("w", 0))
        queued = asyncio.create_task(piece_tagged(gate, inside, release, "q", 9, ("blob", 9)))
        await asyncio.sleep(0.01)
        assert "q" not in inside and gate.inside == 3
        gate.hurry(("blob", 9))
        gate.hurry(("blob", 12))
        late = asyncio.create_task(piece_tagged(gate, inside, release, "late", 12, ("blob", 12)))
        await asyncio.sleep(0.01)
        assert not {"q", "late", "w"} & set(inside) and gate.inside == 3  # not over the limit
        release["h0"].set()
        await asyncio.sleep(0.01)
        assert "q" in inside and not {"late", "w"} & set(inside) and gate.inside == 3  # before w's position 0
        release["h1"].set()
        await asyncio.sleep(0.01)
        assert "late" in inside and "w" not in inside
        for event in release.values():
            event.set()
        await asyncio.gather(*holders, queued, late, waiting)
        assert gate.inside == 0
        for _ in range(15):
            gate.passed("blob")
        assert gate.limit() == 4 and gate.position("blob", 9) is None  # all passed: the share by members

    asyncio.run(go())


def test_a_home_piece_is_relayed_to_readers_while_it_arrives_from_the_origin() -> None:
    """A reader of a relayed piece gets its first bytes before the origin sent the last (not once it is whole);
    a read that breaks off wakes the readers with Broken; pieces past the budget are not relayed."""
    from modelcache.p2p.relay import Broken, Relay, RelayedOrigin

    blob = Blob("sha256:" + "ab" * 32, 3 << 20)
    data = bytes(range(256)) * (4 << 12)  # 1 MiB

    class Slow:
        name = "oci://origin"

        def __init__(self, fail: bool = False) -> None:
            self.fail, self.sent = fail, 0

        async def read(self, blob: Blob, offset: int, length: int):
            for n in range(4):
                await asyncio.sleep(0.05)
                if self.fail and n == 2:
                    raise OSError("reset")
                self.sent += length // 4
                yield data[:length // 4]

    async def go() -> None:
        relay = Relay(budget=2 << 20)
        origin = Slow()
        relayed = RelayedOrigin(origin, relay, lambda b, o, n: True)

        async def consume(source, offset: int) -> int:
            return sum([len(b) async for b in source.read(blob, offset, 1 << 20)])

        engine = asyncio.create_task(consume(relayed, 0))
        live = await asyncio.wait_for(relay.started(blob.digest, 5), 1)  # any byte of the piece finds it
        first = await live.read(0, 1 << 20)
        assert len(first) == 256 << 10 and origin.sent < 1 << 20  # before the origin sent it all
        assert first == data[:256 << 10]
        assert await live.read(768 << 10, 1 << 20) == data[:256 << 10]  # waits for the last quarter
        assert await engine == 1 << 20 and live.whole
        assert relay.find(blob.digest, 0) is live  # kept a moment after it is whole (KEEP)
        # Beyond the budget (2 MiB: this one plus the next fill it): read through, not relayed.
        await consume(RelayedOrigin(Slow(), relay, lambda b, o, n: True), 1 << 20)
        assert await consume(RelayedOrigin(Slow(), relay, lambda b, o, n: True), 2 << 20) == 1 << 20
        assert relay.find(blob.digest, 2 << 20) is None
        # A read that breaks off: its reader is told, and the piece is dropped.
        broken = Relay()
        reader = RelayedOrigin(Slow(fail=True), broken, lambda b, o, n: True)
        failing = asyncio.create_task(consume(reader, 0))
        piece = await asyncio.wait_for(broken.started(blob.digest, 0), 1)
        try:
            await piece.read(900 << 10, 1024)
            raise AssertionError("a broken piece was read past its end")
        except Broken:
            pass
        assert broken.find(blob.digest, 0) is None
        try:
            await failing
        except OSError:
            pass

    asyncio.run(go())



def test_a_home_relaying_a_piece_with_every_upload_slot_busy_says_wait_in_time(tmp_path) -> None:
    """A home streaming a piece as it arrives keeps the wait protocol: every upload slot for live pieces busy,
    it answers 404 ``wait`` within its home wait (the requester asks again) instead of holding the requester
    past its read timeout; once a slot frees, the same ask gets the piece's bytes as they arrive. Those slots
    are not the stored bytes' (a home whose relays crawl still serves its whole pieces)."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from modelcache.p2p.client import MODE_HEADER
    from modelcache.p2p.limit import RateLimit
    from modelcache.p2p.relay import Relay
    from modelcache.p2p.server import RELAYS, UPLOADS, PeerServer
    from modelcache.store import Store

    store = Store(tmp_path / "store")
    digest = "sha256:" + "ab" * 32
    data = bytes(range(256)) * 256  # 64 KiB, the piece

    _Engine = FetchingNeverReady

    secret = b"s" * 16

    async def go() -> None:
        relay = Relay()
        live = relay.open(digest, 0, len(data))
        assert live is not None
        live.add(data[:len(data) // 2])  # half arrived from the origin so far
        server = PeerServer(store, _Engine(), secret, "home", minimum=64 << 10,  # type: ignore[arg-type]
                            limit=RateLimit(0), home_wait=0.4, relay=relay)
        app = web.Application()
        server.add_routes(app)
        for _ in range(UPLOADS):
            await server._uploads.acquire()  # every slot for stored bytes busy: no matter to a live piece
        for _ in range(RELAYS):
            await server._relays.acquire()  # every slot for live pieces busy
        path, rng = f"/v1/peer/blobs/{digest}?mode=home", f"bytes=0-{len(data) - 1}"
        headers = {"Range": rng, signing.HEADER: signing.sign(secret, "GET", path, rng)}
        async with TestClient(TestServer(app)) as client:
            began = time.monotonic()
            r = await asyncio.wait_for(client.get(path, headers=headers), 10)  # bounded: before, it never answered
            await r.read()
            assert (r.status, r.headers.get(MODE_HEADER)) == (404, "wait")
            assert time.monotonic() - began < 5  # in time, not after the piece or a read timeout
            for _ in range(RELAYS):
                server._relays.release()
            asking = asyncio.create_task(client.get(path, headers=headers))
            await asyncio.sleep(0.1)
            live.add(data[len(data) // 2:])  # the rest arrives while the requester is served
            r = await asyncio.wait_for(asking, 10)
            assert (r.status, await r.read()) == (206, data)

    try:
        asyncio.run(go())
    finally:
        store.close()
