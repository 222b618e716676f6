#!/usr/bin/env python3
"""Simulate one model pulled by a whole cluster through modelcache's peers (issue 11), with the real code.

One command::

    python tools/sim_p2p.py            # 10, 100, 1000, 5000 nodes, a 100 GB model (~25 min of one core)
    python tools/sim_p2p.py --quick    # 10 and 100 nodes, a 10 GB model (seconds)
    python tools/sim_p2p.py --nodes 5000 --scenario "all at once" --save r.jsonl   # one part of the run
    python tools/sim_p2p.py --load r*.jsonl                                         # the table and plot of parts

Three scenarios per node count: every node starts at once; the same with
10% of the nodes leaving at half the solo pull time; nodes arriving in four
waves a quarter of the solo time apart. Printed per scenario and node count,
and plotted against node count (``benchmarks/sim-p2p.png``): origin egress
as a multiple of the model size, the slowest node's pull time (and p50, p99)
as a multiple of one node's solo pull at the same caps, and the largest
node's upload over the mean. ``--why`` adds, per run, each piece read from
the origin more than once: who read it (the piece's home or another node;
fetched ahead, for a peer, or by a worker) and whether a live peer held it
then, or was reading it from the origin.

What is the real code, imported and called, not reimplemented:

- the piece size and count (:mod:`modelcache.p2p.pieces`);
- the rendezvous weights (:func:`modelcache.rendezvous.score` of
  :func:`modelcache.p2p.ring.piece_key`) ranking every piece's candidates;
  the top of each ranking is taken with numpy from a matrix of those weights
  and checked against :func:`~modelcache.rendezvous.rank` on a sample at
  every membership change;
- which peers a node asks for a piece and in which mode
  (:func:`modelcache.p2p.router.plan`) and the order its workers walk the
  pieces in (:func:`modelcache.p2p.router.rounds`, with the router's seed and
  :func:`~modelcache.p2p.router.in_step` of the members at its arrival;
  ``--order walk`` for the earlier :func:`~modelcache.p2p.router.walk`);
- each home's holder bookkeeping and redirect decision
  (:class:`modelcache.p2p.holders.Holders`), one per node as each daemon's
  peer server keeps one;
- the size of each node's origin gate for the home pieces it fetches ahead
  (:class:`modelcache.p2p.gate.Gate`'s ``plan``/``passed``/``limit``, sized
  by :func:`~modelcache.p2p.gate.share` of the live members), its lookahead
  gate (:data:`~modelcache.p2p.gate.LOOKAHEAD` x that), the relay's budget
  (:data:`modelcache.p2p.relay.BUDGET`).

What is modelled (after ``transfer/engine.py``, ``p2p/client.py``,
``p2p/server.py``, ``p2p/gate.py`` and ``p2p/relay.py``): each node fetches
the pieces it is home for ahead, in index order, each in its own task:
candidates asked whether they hold it, then the origin through the gate
(waiters by position), so the cluster opens about as many origin streams as
one node; its ``concurrency`` workers walk the rest. A peer asked as a
piece's home that is fetching it (or will) fetches it now, once (on the
engine's peer slots, or hurrying a home piece past both gates once the
requester waited half the home's wait), and makes requesters wait up to
``home_wait`` (else 404 ``wait``: the requester defers the piece once to the
end of its queue, then asks again, patiently); a home reading a piece from
the origin streams it to its requesters as it arrives (no faster than it
arrives, once they caught up); a 307 sends a requester to a holder
(``have``, then the home again in ``held`` mode); a node uploads at most
``UPLOADS`` pieces at once and a request waiting longer than the read
timeout for its turn fails (the peer is benched for 10 s and the next
source is asked); a piece cut short (a peer left) resumes at the byte
reached from the next source. Bytes move as fluid flows sharing each node's
upload and download cap and the origin's cap, max-min fair by progressive
filling, recomputed at every event; events closer together than
``--quantum`` seconds are handled together. Not modelled: request latency
(a probe or a 404 costs nothing here), disk, CPU, piece digest checks.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import json
import math
import random
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from modelcache.p2p.client import PATIENCE, PeerClient  # noqa: E402  (the client's default timeouts)
from modelcache.p2p.gate import LOOKAHEAD, Gate, share  # noqa: E402
from modelcache.p2p.holders import Holders  # noqa: E402
from modelcache.p2p.members import FAILED_PAUSE  # noqa: E402
from modelcache.p2p.node import home_wait  # noqa: E402
from modelcache.p2p.pieces import piece_count, piece_size  # noqa: E402
from modelcache.p2p.relay import BUDGET as RELAY_BUDGET  # noqa: E402
from modelcache.p2p.ring import piece_key  # noqa: E402
from modelcache.p2p.router import HOME_PROBES, PROBES, in_step, plan, rounds, walk  # noqa: E402
from modelcache.p2p.server import UPLOADS  # noqa: E402
from modelcache.rendezvous import rank, score  # noqa: E402
from modelcache.transfer.config import TransferConfig  # noqa: E402

try:
    from benchlib import record  # tools/ is on the path when this runs as a script
except ImportError:  # imported from elsewhere (the tests)
    def record(kind: str, **fields: object) -> None:
        """No report to write to."""

GB = 10**9
DIGEST = "sha256:" + "5e" * 32
ORIGIN = -1
DEPTH = max(PROBES, HOME_PROBES) + 1  # candidates plan() may ask
TOP = DEPTH + 4  # candidates kept per piece (more than plan() asks, for peers a node has benched)
READ_TIMEOUT = PeerClient(b"", "").read_timeout  # a request silent this long fails
HOME_WAIT = home_wait(READ_TIMEOUT)  # as p2p/node.py gives the peer server


@dataclass
class Config:
    """One simulated pull."""

    nodes: int
    model: int = 100 * GB
    up: float = 1.25 * GB  # bytes/s each node uploads at most (10 Gbit/s)
    down: float = 1.25 * GB
    origin: float = 5 * GB
    concurrency: int = TransferConfig().concurrency
    leave: float = 0.0  # fraction of nodes leaving at ``leave_at`` x solo time
    leave_at: float = 0.5
    waves: int = 1  # nodes arrive in this many equal waves, ``wave_gap`` x solo time apart
    wave_gap: float = 0.25
    seed: int = 1
    order: str = "rounds"  # the workers' order: router.rounds (the daemon's), or router.walk (the earlier one)
    quantum: float = 0.5  # events closer than this fraction of one piece's time at the node cap are handled together

    def solo(self) -> float:
        """One node alone pulling the model from the origin at the same caps."""
        return self.model / min(self.down, self.origin)


@dataclass
class Result:
    """What one simulated pull measured."""

    config: Config
    origin_bytes: int
    durations: list[float]  # each node that finished: done - arrived
    uploads: list[int]  # bytes each node uploaded (every node that took part)
    makespan: float
    events: int
    wall: float
    from_peers: int = 0
    timeouts: int = 0
    redirects: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def ratios(self) -> dict[str, float]:
        """The figures the issue asks for."""
        solo = self.config.solo()
        d = sorted(self.durations)
        mean_up = sum(self.uploads) / max(1, len(self.uploads))
        return {"origin": self.origin_bytes / self.config.model,
                "slowest": d[-1] / solo if d else math.inf,
                "p50": _pct(d, 0.50) / solo, "p99": _pct(d, 0.99) / solo,
                "upload": max(self.uploads) / mean_up if mean_up else 0.0}


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else math.inf


class Ranking:
    """Every piece's candidates under the live membership: the real weights, the top taken with numpy."""

    def __init__(self, urls: list[str], pieces: int) -> None:
        self.urls = urls
        weights = np.empty((pieces, len(urls)), dtype=np.uint64)
        for i in range(pieces):
            key = piece_key(DIGEST, i)
            weights[i] = [score(key, u) for u in urls]
        self.weights = weights
        self.top: list[list[int]] = []

    def update(self, alive: np.ndarray, check: int = 3) -> None:
        """Recompute every piece's top candidates among ``alive`` members, checked against the real rank()."""
        masked = np.where(alive[None, :], self.weights, np.uint64(0))
        k = min(TOP, int(alive.sum()))
        part = np.argpartition(masked, masked.shape[1] - k, axis=1)[:, -k:]
        order = np.argsort(np.take_along_axis(masked, part, axis=1), axis=1)[:, ::-1]
        self.top = np.take_along_axis(part, order, axis=1).tolist()
        live = [u for u, a in zip(self.urls, alive, strict=True) if a]
        for i in range(0, len(self.top), max(1, len(self.top) // check)):
            assert [self.urls[n] for n in self.top[i]] == rank(piece_key(DIGEST, i), live)[:k], "ranking differs"


WORKER, JOB, AHEAD = 0, 1, 2  # what runs a fetch: a worker slot, a peer slot (a home's ensure_piece), fetch-ahead


class Req:
    """One node's fetch of one piece: its sources in turn, a redirect's targets, the bytes it has."""

    __slots__ = ("node", "piece", "sources", "pos", "targets", "got", "defer", "token", "sent", "kind", "live",
                 "home", "home_failed", "since", "waits_on", "k", "up", "followers", "gated", "relayed", "src")

    def __init__(self, node: int, piece: int, sources: list[tuple[int, str]], defer: bool, kind: int) -> None:
        self.node, self.piece, self.sources, self.defer, self.kind = node, piece, sources, defer, kind
        self.home = sources[0][0] if sources and sources[0][1] == "home" else -2
        self.home_failed = False  # the client's Round: the home is gone, so the fallback is asked as the home
        self.since = math.inf  # when it began waiting on a home that fetches the piece (the client's patience)
        self.waits_on = -2  # that home: each home asked gets its own patience (a patient ask's own deadline)
        self.pos = 0
        self.targets: list[tuple[int, str]] = []
        self.got = 0
        self.token = 0  # bumped whenever a wait ends, so stale timers are ignored
        self.sent = 0.0
        self.live = True
        self.k = -1  # its flow's index while bytes flow
        self.src = -2  # where its bytes flow from (ORIGIN or a node)
        self.up: Req | None = None  # a relayed piece's origin fetch at its home, while that is in flight
        self.followers: list[Req] | None = None  # an origin fetch relayed: the requests streaming it
        self.gated = False  # holds a place in its node's origin gate
        self.relayed = False  # an origin fetch its home relays to peers (p2p/relay.py)


class Sim:
    """The event loop over one :class:`Config`."""

    def __init__(self, cfg: Config, ranking: Ranking | None = None) -> None:
        self.cfg = cfg
        rng = random.Random(cfg.seed)
        n = cfg.nodes
        self.piece = piece_size(cfg.model)
        self.P = piece_count(cfg.model, self.piece)
        self.lengths = [min(self.piece, cfg.model - i * self.piece) for i in range(self.P)]
        self.urls = [f"http://10.{i >> 16}.{(i >> 8) & 255}.{i & 255}:8470" for i in range(n)]
        self.index = {u: i for i, u in enumerate(self.urls)}
        self.ranking = ranking if ranking is not None and ranking.urls == self.urls else Ranking(self.urls, self.P)
        self.now = 0.0
        self.plans: dict[int, list[tuple[int, str]]] = {}  # piece -> the plan of a node not among its first candidates
        # per node: 0 = to fetch, 1 = being fetched, 2 = held
        self.state = [bytearray(self.P) for _ in range(n)]
        self.held = [0] * n
        self.todo: list[deque[int]] = [deque() for _ in range(n)]
        self.deferred: list[set[int]] = [set() for _ in range(n)]
        self.jobs: list[deque[int]] = [deque() for _ in range(n)]  # pieces peers asked us to fetch now
        self.free = [0] * n  # worker slots
        self.pfree = [cfg.concurrency] * n  # the engine's peer slots (ensure_piece's fetches)
        self.waiters: list[dict[int, list[Req]]] = [{} for _ in range(n)]  # piece -> requests waiting on us
        self.holders = [Holders() for _ in range(n)]
        self.bench: list[dict[int, float]] = [{} for _ in range(n)]
        self.uploading = [0] * n
        self.queue: list[deque[tuple[Req, int]]] = [deque() for _ in range(n)]  # (request, its token when queued)
        self.uploaded = [0] * n
        # The pipelined origin phase (p2p/gate.py, p2p/relay.py): each node's home pieces fetched ahead through
        # its lookahead gate and its origin gate, and the pieces it relays while they arrive.
        self.gates: list[Gate | None] = [None] * n
        self.ahead: list[deque[int]] = [deque() for _ in range(n)]  # home pieces not started, in index order
        self.pace_in = [0] * n  # home pieces under way (the lookahead gate)
        self.gate_in = [0] * n  # origin reads of home pieces (the origin gate)
        self.gate_wait: list[list[tuple[int, int, Req]]] = [[] for _ in range(n)]  # (position, seq, request)
        self.hurried: list[set[int]] = [set() for _ in range(n)]
        self.live: list[dict[int, Req]] = [{} for _ in range(n)]  # piece -> its origin fetch, relayed now
        self.relay_slots = RELAY_BUDGET // self.piece  # pieces relayed at once per node (0: none)
        self.streams = self.peak_streams = 0  # origin reads at once
        self.following: set[Req] = set()  # requests streaming a piece still arriving at its home
        self.alive = np.zeros(n, dtype=bool)
        self.member = [False] * n  # the same as a list (fast to index one at a time)
        self.members = 0
        self.arrived = [math.inf] * n
        self.done = [math.inf] * n
        self.gone = [False] * n
        self.origin_bytes = self.from_peers = self.timeouts = self.redirects = self.events = 0
        self.relayed_streams = 0  # requests streamed a piece while it arrived at its home
        self.origin_fetches = [0] * self.P  # origin reads begun per piece (from its first byte or resumed)
        self.again: dict[str, float] = {}  # pieces read from the origin once more, by why (for --why)
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        # flows: parallel numpy arrays (swap-remove) plus the requests they serve
        cap = max(64, n * cfg.concurrency * 2)
        self.f_src = np.zeros(cap, dtype=np.int64)
        self.f_dst = np.zeros(cap, dtype=np.int64)
        self.f_rem = np.zeros(cap, dtype=np.float64)
        self.f_len = np.zeros(cap, dtype=np.float64)
        self.f_req: list[Req | None] = [None] * cap
        self.nf = 0
        self.capu = np.array([cfg.up] * n + [cfg.origin])
        self.capd = np.array([cfg.down] * n + [math.inf])
        # arrivals and departures
        order = list(range(n))
        rng.shuffle(order)
        waves = max(1, cfg.waves)
        for w in range(waves):
            batch = order[w * n // waves:(w + 1) * n // waves]
            self.at(w * cfg.wave_gap * cfg.solo(), lambda b=batch: self.arrive(b))
        if cfg.leave > 0:
            leavers = rng.sample(range(n), max(1, round(cfg.leave * n)))
            self.at(cfg.leave_at * cfg.solo(), lambda: self.depart(leavers))

    # ---- timers -------------------------------------------------------------------------------------------

    def at(self, when: float, call: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self.timers, (when, self._seq, call))

    # ---- membership ---------------------------------------------------------------------------------------

    def arrive(self, batch: list[int]) -> None:
        for n in batch:
            self.alive[n] = True
            self.member[n] = True
            self.arrived[n] = self.now
        self.members += len(batch)
        self.ranking.update(self.alive)
        self.plans.clear()
        top = self.ranking.top
        urls = self.urls
        indexes = list(range(self.P))
        for n in batch:
            me = urls[n]
            seeds: dict[str, int] = {}

            def seed(home: str, me: str = me, seeds: dict[str, int] = seeds) -> int:
                # The router's seed (PeerRouter.order), once per home rather than once per piece.
                s = seeds.get(home)
                if s is None:
                    s = seeds[home] = score(f"{DIGEST}|{home}", me)
                return s

            # The real order: in step with the homes (router.rounds), our own pieces fetched ahead of it.
            if self.cfg.order == "walk":
                order = walk(indexes, lambda i, n=n: top[i][0] == n, score(DIGEST, me))
            else:
                order = rounds(indexes, lambda i: urls[top[i][0]], me, seed, in_step(self.members))
            state = self.state[n]
            mine = [i for i in indexes if top[i][0] == n] if self.members > 1 else []
            for i in mine:
                state[i] = 1
            self.todo[n] = deque(i for i in order if state[i] == 0)
            if mine:
                gate = self.gates[n] = Gate(lambda: share(self.members))
                gate.plan(DIGEST, mine, self.P, self.piece)
                self.ahead[n] = deque(mine)
            self.free[n] = self.cfg.concurrency
        for n in batch:
            self.pace(n)
            self.fill(n)

    def depart(self, leavers: list[int]) -> None:
        for n in leavers:
            self.alive[n] = False
            self.member[n] = False
            self.gone[n] = True
        self.members -= len(leavers)
        self.ranking.update(self.alive)
        self.plans.clear()
        gone = set(leavers)
        # Flows to or from a leaver stop: a requester that was receiving resumes at the byte reached.
        cut = [k for k in range(self.nf) if int(self.f_src[k]) in gone or int(self.f_dst[k]) in gone]
        for k in sorted(cut, reverse=True):
            req, src = self.f_req[k], int(self.f_src[k])
            assert req is not None
            moved = int(max(0.0, self.f_len[k] - max(0.0, self.f_rem[k])))  # a relayed stream may be owed bytes
            self.account(src, moved)
            self.remove_flow(k)
            self.unfollow(req)
            if src != self.cfg.nodes and src not in gone:
                self.uploading[src] -= 1
                self.pump(src)
            if req.node in gone:
                req.live = False
                continue
            req.got += moved
            self.failed(req, src)
        for n in leavers:
            for reqs in self.waiters[n].values():
                for req in reqs:
                    if self.waiting(req):
                        req.token += 1
                        self.failed(req, n)
            self.waiters[n].clear()
            for req, token in self.queue[n]:
                if self.waiting(req) and req.token == token:
                    req.token += 1
                    self.failed(req, n)
            self.queue[n].clear()
            self.jobs[n].clear()
            self.todo[n].clear()
            self.ahead[n].clear()
            self.gate_wait[n].clear()
            self.live[n].clear()

    # ---- one node's slots ---------------------------------------------------------------------------------

    def fill(self, n: int) -> None:
        """Give node ``n``'s free worker slots its own queue (rounds order), skipping pieces taken meanwhile."""
        state = self.state[n]
        todo = self.todo[n]
        deferred = self.deferred[n]
        while self.free[n] > 0:
            while todo and state[todo[0]] != 0:
                todo.popleft()  # taken meanwhile for a peer that asked us as its home
            if not todo:
                return
            i = todo.popleft()
            state[i] = 1
            self.free[n] -= 1
            self.ask(Req(n, i, self.sources(n, i), bool(todo) and i not in deferred, WORKER))

    def jobs_fill(self, n: int) -> None:
        """Pieces peers asked us for as their home (Engine.ensure_piece), on the engine's peer slots."""
        jobs = self.jobs[n]
        while jobs and self.pfree[n] > 0:
            i = jobs.popleft()
            self.pfree[n] -= 1
            self.ask(Req(n, i, self.sources(n, i), False, JOB))

    def pace(self, n: int) -> None:
        """Home pieces fetched ahead: in index order, at most LOOKAHEAD x the origin gate's size under way."""
        ahead = self.ahead[n]
        gate = self.gates[n]
        while ahead and gate is not None and self.pace_in[n] < LOOKAHEAD * gate.limit():
            i = ahead.popleft()
            self.pace_in[n] += 1
            self.ask(Req(n, i, self.sources(n, i), False, AHEAD))

    def hurry(self, n: int, i: int) -> None:
        """A peer waited half the home's wait for piece ``i`` to start: it goes in now, over both gates."""
        if self.gone[n] or self.state[n][i] != 1:
            return
        hurried = self.hurried[n]
        if i in hurried:
            return
        hurried.add(i)
        ahead = self.ahead[n]
        if i in ahead:  # not under way yet: past the lookahead gate
            ahead.remove(i)
            self.pace_in[n] += 1
            self.ask(Req(n, i, self.sources(n, i), False, AHEAD))
            return
        for _, _, req in self.gate_wait[n]:  # waiting at the origin gate: in now (its heap entry goes stale)
            if req.piece == i and req.live and req.k < 0:
                self.gate_in[n] += 1
                req.gated = True
                self.origin(req)
                return

    def wake_gate(self, n: int) -> None:
        heap, gate = self.gate_wait[n], self.gates[n]
        while heap and gate is not None and self.gate_in[n] < max(1, gate.limit()):
            _, _, req = heapq.heappop(heap)
            if req.live and req.k < 0 and not req.gated:
                self.gate_in[n] += 1
                req.gated = True
                self.origin(req)

    def sources(self, n: int, i: int) -> list[tuple[int, str]]:
        """The real plan() over this node's view of the piece's candidates (benched peers left out)."""
        top = self.ranking.top[i]
        bench = self.bench[n]
        if bench:
            now = self.now
            top = [m for m in top if bench.get(m, 0.0) <= now]
            if len(top) < DEPTH and len(self.ranking.top[i]) >= TOP:
                live = [u for u, a in zip(self.urls, self.alive, strict=True) if a and bench.get(self.index[u], 0.0) <= now]
                top = [self.index[u] for u in rank(piece_key(DIGEST, i), live)[:DEPTH]]
        elif n not in top[:PROBES + 1]:
            # Every node outside a piece's first candidates gets the same plan: computed once per membership.
            cached = self.plans.get(i)
            if cached is None:
                cached = self.plans[i] = self.plan(top[:DEPTH], n)
            return cached
        return self.plan(top[:DEPTH], n)

    def plan(self, first: list[int], n: int) -> list[tuple[int, str]]:
        urls = self.urls
        return [(self.index[u], mode) for u, mode in plan([urls[m] for m in first], urls[n])]

    # ---- one request through its sources ------------------------------------------------------------------

    def ask(self, req: Req) -> None:
        """Try the request's next target or source until bytes flow, it waits, or it is deferred."""
        i = req.piece
        member, state = self.member, self.state
        while True:
            redirected = bool(req.targets)
            if redirected:
                t, mode = req.targets.pop(0)
            elif req.pos < len(req.sources):
                t, mode = req.sources[req.pos]
                req.pos += 1
            else:
                self.to_origin(req)
                return
            req.sent = self.now
            if mode == "fallback":  # the client's Round: the home's stand-in once the home failed
                mode = "home" if req.home_failed else "have"
            if not member[t]:
                self.bench[req.node][t] = self.now + FAILED_PAUSE  # refused: benched, next source at once
                if not (redirected and req.targets):  # a holder we were sent to is gone: back to the home
                    req.targets = []
                if t == req.home:
                    req.home_failed = True
                continue
            holds = state[t][i] == 2
            if mode == "home":
                if holds:
                    if self.decide(t, req):
                        return
                    continue
                if i in self.live[t]:  # the server's _await_piece: streamed while it arrives (p2p/relay.py)
                    self.upload(t, req, home=t)
                    return
                if self.pulling(t):
                    self.ensure(t, req)
                    return
                if self.not_yet(req):
                    return
                continue
            if holds:  # have, held
                self.upload(t, req, home=t if mode == "held" else -1)
                return
            # a miss: the next target (after a redirect, the home in ``held`` mode), else the next source

    def to_origin(self, req: Req) -> None:
        """Every peer asked: the origin, through the node's origin gate if it is a home piece fetched ahead."""
        n = req.node
        if req.kind == AHEAD and not req.gated:
            gate = self.gates[n]
            assert gate is not None
            if req.piece in self.hurried[n]:
                self.gate_in[n] += 1
            elif self.gate_in[n] < max(1, gate.limit()):
                self.gate_in[n] += 1
            else:
                self._seq += 1
                heapq.heappush(self.gate_wait[n], (gate.position(DIGEST, req.piece) or 0, self._seq, req))
                return
            req.gated = True
        self.origin(req)

    def origin(self, req: Req) -> None:
        """An origin read begins: relayed to peers if it is a whole piece we are home for, with live peers."""
        n, i = req.node, req.piece
        if self.origin_fetches[i]:
            self.why(req)
        self.origin_fetches[i] += 1
        self.flow(ORIGIN, req)
        live = self.live[n]
        if req.got == 0 and self.members > 1 and self.ranking.top[i][0] == n and len(live) < self.relay_slots:
            req.relayed = True
            req.followers = []
            live[i] = req
            for w in self.waiters[n].pop(i, []):  # the requests waiting on us: streamed from now
                if self.waiting(w):
                    w.token += 1
                    self.upload(n, w, home=n)

    def why(self, req: Req) -> None:
        """A piece read from the origin again: record whether a peer held it or was reading it then (a read
        resumed at the byte reached counts the part of a piece it reads)."""
        i = req.piece
        held = any(self.state[m][i] == 2 and not self.gone[m] for m in range(self.cfg.nodes))
        reading = any(i in self.live[m] for m in range(self.cfg.nodes) if not self.gone[m])
        role = ("home" if self.ranking.top[i][0] == req.node else "other") + ("-ahead" if req.kind == AHEAD else
                                                                           "-job" if req.kind == JOB else "")
        key = f"{role}, {'held by a peer' if held else 'relayed by a peer' if reading else 'nowhere'}"
        if req.got:
            key = "resumed " + key
        self.again[key] = round(self.again.get(key, 0) + (self.lengths[i] - req.got) / self.piece, 2)

    def decide(self, home: int, req: Req) -> bool:
        """The home holds the piece: serve it (True) or send the requester to a holder (False, targets set)."""
        holder = self.holders[home].next_holder((DIGEST, req.piece * self.piece), self.urls[req.node])
        if holder is None:
            self.upload(home, req, home=home)
            return True
        self.redirects += 1
        req.targets = [(self.index[holder], "have"), (home, "held")]
        return False

    def pulling(self, t: int) -> bool:
        return self.done[t] == math.inf and self.arrived[t] <= self.now

    def not_yet(self, req: Req) -> bool:
        """The home does not hold it and is not fetching it in time: defer once (True), else the next source."""
        if req.defer and req.pos == 1 and req.got == 0 and not req.targets:
            self.deferred[req.node].add(req.piece)
            self.release(req)
            return True
        return False

    def ensure(self, home: int, req: Req) -> None:
        """``Engine.ensure_piece`` at the home: fetch the piece now (once) and make the requester wait for it;
        a home piece not begun yet is hurried past the gates after half the wait (the server's _await_piece)."""
        i = req.piece
        state = self.state[home]
        if state[i] == 0:
            state[i] = 1
            self.jobs[home].append(i)
        elif i not in self.hurried[home]:
            self.at(self.now + HOME_WAIT / 2, lambda: self.hurry(home, i))
        self.waiters[home].setdefault(i, []).append(req)
        if req.waits_on != home:
            req.since, req.waits_on = self.now, home
        req.token += 1
        token = req.token
        self.at(self.now + HOME_WAIT, lambda: self.home_timeout(home, req, token))
        if self.jobs[home]:
            self.jobs_fill(home)

    def waiting(self, req: Req) -> bool:
        """The request still wants its piece (its node did not leave)."""
        return req.live and not self.gone[req.node]

    def home_timeout(self, home: int, req: Req, token: int) -> None:
        """The home answers ``wait``: the first time the piece is deferred if it can be; after that the client's
        patient ask asks again (it stays a waiter) until its patience runs out, then the next source."""
        if not self.waiting(req) or req.token != token:
            return
        req.token += 1
        self.timeouts += 1
        waiting = self.waiters[home].get(req.piece)
        if self.now - req.since < PATIENCE and not (req.defer and req.pos == 1 and req.got == 0 and not req.targets):
            token = req.token
            self.at(self.now + HOME_WAIT, lambda: self.home_timeout(home, req, token))
            return
        if waiting and req in waiting:
            waiting.remove(req)
        if not self.not_yet(req):
            self.ask(req)

    def upload(self, src: int, req: Req, *, home: int = -1) -> None:
        """Bytes from peer ``src`` once it has an upload slot. Asked as a home (or the home in ``held`` mode),
        every slot busy, it answers ``wait`` within its wait and the requester asks the home again (which may
        send it to another holder now); any other request that waits past the read timeout fails."""
        if self.uploading[src] < UPLOADS:
            self.uploading[src] += 1
            self.flow(src, req)
            return
        req.token += 1
        token = req.token
        self.queue[src].append((req, token))
        if home >= 0:
            self.at(self.now + HOME_WAIT, lambda: self.ask_again(home, req, token))
        else:
            self.at(req.sent + READ_TIMEOUT, lambda: self.upload_timeout(src, req, token))

    def ask_again(self, home: int, req: Req, token: int) -> None:
        if not self.waiting(req) or req.token != token:
            return
        req.token += 1  # its place in the queue lapses
        req.targets = [(home, "home")]
        self.ask(req)

    def upload_timeout(self, src: int, req: Req, token: int) -> None:
        if not self.waiting(req) or req.token != token:
            return
        req.token += 1
        self.timeouts += 1
        self.failed(req, src, bench=False)  # a timeout is a strike, not a verdict (p2p/members.py)

    def pump(self, src: int) -> None:
        """An upload slot of ``src`` came free: the next queued request still waiting gets it."""
        queue = self.queue[src]
        while queue and self.uploading[src] < UPLOADS:
            req, token = queue.popleft()
            if not self.waiting(req) or req.token != token or self.now > req.sent + READ_TIMEOUT:
                continue
            req.token += 1
            if self.state[src][req.piece] != 2 and req.piece not in self.live[src]:
                req.targets = [(src, "home")]  # it was live and is no more: ask again
                self.ask(req)
                continue
            self.uploading[src] += 1
            self.flow(src, req)

    def failed(self, req: Req, peer: int, *, bench: bool = True) -> None:
        """A peer failed (left, or silent past the timeout): benched if it left, the next source asked at once
        (the fallback as the home if it was the home)."""
        if bench:
            self.bench[req.node][peer] = self.now + FAILED_PAUSE
        if peer == req.home or (req.home >= 0 and not self.member[req.home]):
            req.home_failed = True  # (a home that left is refused when the patient ask goes back to it)
        home = req.home
        # A holder the home sent us to failed: back to the home (the client's patient ask), which holds it.
        req.targets = [(home, "home")] if home >= 0 and not req.home_failed and self.member[home] else []
        self.ask(req)

    def release(self, req: Req) -> None:
        """The request is over without the piece (deferred): the slot takes other work."""
        n, i = req.node, req.piece
        req.live = False
        self.state[n][i] = 0
        self.todo[n].append(i)
        self.fail_waiters(n, i)
        self.free[n] += 1
        self.fill(n)

    def fail_waiters(self, n: int, i: int) -> None:
        for w in self.waiters[n].pop(i, []):
            if self.waiting(w):
                w.token += 1
                if not self.not_yet(w):
                    self.ask(w)

    # ---- flows --------------------------------------------------------------------------------------------

    def flow(self, src: int, req: Req) -> None:
        k = self.nf
        if k == len(self.f_req):
            for name in ("f_src", "f_dst", "f_rem", "f_len"):
                setattr(self, name, np.concatenate([getattr(self, name), np.zeros_like(getattr(self, name))]))
            self.f_req.extend([None] * len(self.f_req))
        left = self.lengths[req.piece] - req.got
        self.f_src[k] = src if src != ORIGIN else self.cfg.nodes
        self.f_dst[k] = req.node
        self.f_rem[k] = self.f_len[k] = left
        self.f_req[k] = req
        req.k = k
        req.src = src
        self.nf = k + 1
        if src == ORIGIN:
            self.streams += 1
            self.peak_streams = max(self.peak_streams, self.streams)
        if src >= 0 and self.state[src][req.piece] != 2:  # streamed while it arrives at its home
            up = self.live[src][req.piece]
            assert up.followers is not None
            up.followers.append(req)
            self.relayed_streams += 1
            req.up = up
            self.following.add(req)

    def remove_flow(self, k: int) -> None:
        last = self.nf - 1
        f_req = self.f_req
        gone = f_req[k]
        if self.f_src[k] == self.cfg.nodes:
            self.streams -= 1
        if k != last:
            self.f_src[k], self.f_dst[k] = self.f_src[last], self.f_dst[last]
            self.f_rem[k], self.f_len[k] = self.f_rem[last], self.f_len[last]
            moved = f_req[k] = f_req[last]
            assert moved is not None
            moved.k = k
        f_req[last] = None
        if gone is not None:
            gone.k = -1
        self.nf = last

    def unfollow(self, req: Req) -> None:
        """``req``'s flow ended: it no longer streams a piece in progress, nor is one streamed from it."""
        if req.up is not None:
            self.following.discard(req)
            req.up = None
        if req.followers is not None:
            for f in req.followers:
                f.up = None
                self.following.discard(f)
            req.followers = None
        if req.relayed:
            req.relayed = False
            self.live[req.node].pop(req.piece, None)

    def account(self, src: int, moved: int) -> None:
        if src == self.cfg.nodes or src == ORIGIN:
            self.origin_bytes += moved
        else:
            self.uploaded[src] += moved
            self.from_peers += moved

    def finished(self, req: Req, src: int, length: int) -> None:
        self.account(src, length)
        n, i = req.node, req.piece
        self.unfollow(req)
        if src != self.cfg.nodes:
            self.uploading[src] -= 1
            self.holders[src].served((DIGEST, i * self.piece), self.urls[n])
            if self.queue[src]:
                self.pump(src)
        req.live = False
        self.state[n][i] = 2
        self.held[n] += 1
        if self.held[n] == self.P:
            self.done[n] = self.now
        waiters = self.waiters[n].pop(i, None)
        if waiters:
            for w in waiters:  # peers that asked us as the piece's home
                if self.waiting(w):
                    w.token += 1
                    if not self.decide(n, w):
                        self.ask(w)
        kind = req.kind
        if kind == WORKER:
            self.free[n] += 1
            self.fill(n)
        elif kind == JOB:
            self.pfree[n] += 1
            self.jobs_fill(n)
        else:
            gate = self.gates[n]
            assert gate is not None
            self.pace_in[n] -= 1
            self.hurried[n].discard(i)
            gate.passed(DIGEST)
            if req.gated:
                self.gate_in[n] -= 1
                self.wake_gate(n)
            self.pace(n)

    def rates(self) -> np.ndarray:
        """Max-min fair rates by progressive filling over the flows' upload and download caps; a request
        streaming a piece still arriving at its home goes no faster than the home receives it once caught up."""
        nf = self.nf
        rate = self._fill(None)
        if self.following:
            caps = np.full(nf, math.inf)
            rem, length = self.f_rem, self.f_len
            capped = False
            for f in self.following:
                up = f.up
                assert up is not None
                if f.got + length[f.k] - rem[f.k] >= up.got + length[up.k] - rem[up.k] - 1e-6 * self.piece:
                    caps[f.k] = rate[up.k]
                    capped = True
            if capped:
                rate = self._fill(caps)
        return rate

    def _fill(self, caps: np.ndarray | None) -> np.ndarray:
        nf = self.nf
        src, dst = self.f_src[:nf], self.f_dst[:nf]
        m = self.cfg.nodes + 1
        up, down = self.capu.copy(), self.capd.copy()
        rate = np.zeros(nf)
        live = np.ones(nf, dtype=bool)
        for _ in range(3):
            s, d = src[live], dst[live]
            nu = np.bincount(s, minlength=m)
            nd = np.bincount(d, minlength=m)
            with np.errstate(divide="ignore", invalid="ignore"):
                share = np.minimum(up[s] / nu[s], down[d] / nd[d])
            if caps is not None:
                share = np.minimum(share, caps[live] - rate[live])
            rate[live] += share
            up -= np.bincount(s, weights=share, minlength=m)
            down -= np.bincount(d, weights=share, minlength=m)
            live &= (up[src] > 1e-6 * self.cfg.up) & (down[dst] > 1e-6 * self.cfg.down)
            if caps is not None:
                live &= rate < caps - 1e-9 * self.cfg.up
            if not live.any():
                break
        return rate

    def run(self) -> Result:
        started = time.monotonic()
        gc.disable()  # millions of small objects and no cycles that matter: the collector's scans cost half the time
        try:
            return self._run(started)
        finally:
            gc.enable()

    def _run(self, started: float) -> Result:
        q = self.cfg.quantum * self.piece / self.cfg.down
        timers = self.timers
        while True:
            while timers and timers[0][0] <= self.now:
                _, _, call = heapq.heappop(timers)
                call()
                self.events += 1
            if self.nf == 0:
                if not timers:
                    break
                self.now = timers[0][0]
                continue
            rate = self.rates()
            rem = self.f_rem[:self.nf]
            with np.errstate(divide="ignore"):
                eta = float(np.min(rem / rate))
            step = max(eta, q)
            if timers:
                step = min(step, max(0.0, timers[0][0] - self.now))
            self.now += step
            rem -= rate * step
            if self.following:  # never ahead of the bytes its home has
                length = self.f_len
                for f in self.following:
                    up = f.up
                    assert up is not None
                    allowed = up.got + length[up.k] - rem[up.k] - f.got
                    if length[f.k] - rem[f.k] > allowed:
                        rem[f.k] = length[f.k] - allowed
            ended = np.flatnonzero(rem <= 1e-3 * self.piece)
            if ended.size:
                srcs, lengths = self.f_src[ended].tolist(), self.f_len[ended].tolist()
                keys = ended.tolist()
                reqs = [self.f_req[k] for k in keys]
                for k in reversed(keys):
                    self.remove_flow(k)
                for req, src, length in zip(reqs, srcs, lengths, strict=True):
                    assert req is not None
                    self.finished(req, src, int(length))
                self.events += len(keys)
        members = [n for n in range(self.cfg.nodes) if not self.gone[n]]
        missing = [n for n in members if self.done[n] == math.inf]
        if missing:
            raise RuntimeError(f"{len(missing)} nodes never finished")
        durations = [self.done[n] - self.arrived[n] for n in members]
        return Result(self.cfg, self.origin_bytes, durations, list(self.uploaded),
                      max(self.done[n] for n in members), self.events, time.monotonic() - started,
                      from_peers=self.from_peers, timeouts=self.timeouts, redirects=self.redirects,
                      extra={"relayed": self.relayed_streams / max(1, self.P * len(members)),
                             "peak origin streams": self.peak_streams, **{
                          f"again: {k}": v for k, v in sorted(self.again.items())}})


def simulate(cfg: Config, ranking: Ranking | None = None) -> Result:
    """Run one pull (``ranking`` may be shared between runs over the same nodes and model)."""
    return Sim(cfg, ranking).run()


SCENARIOS: dict[str, dict[str, float]] = {
    "all at once": {},
    "10% leave mid-pull": {"leave": 0.10},
    "arrive in 4 waves": {"waves": 4},
}


def row(name: str, r: Result) -> dict[str, object]:
    """One line of the table: the scenario, the node count, the figures and how long the simulation took."""
    return {"scenario": name, "nodes": r.config.nodes, "model": r.config.model, **r.ratios(), "wall": r.wall,
            "cpu": r.extra.get("cpu", 0.0), "order": r.config.order,
            "why": {k[len("again: "):]: v for k, v in r.extra.items() if k.startswith("again: ")}}


def table(rows: list[dict]) -> list[str]:
    out = [f"{'scenario':<20} {'nodes':>5}  {'origin/model':>12}  {'slowest/solo':>12}  {'p50':>5}  {'p99':>5}  "
           f"{'max/mean upload':>15}  {'wall s':>6}  {'cpu s':>6}"]
    for f in rows:
        out.append(f"{f['scenario']:<20} {f['nodes']:>5}  {f['origin']:>12.3f}  {f['slowest']:>12.2f}  "
                   f"{f['p50']:>5.2f}  {f['p99']:>5.2f}  {f['upload']:>15.2f}  {f['wall']:>6.0f}  "
                   f"{f.get('cpu', 0.0):>6.0f}")
    return out


def plot(rows: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(plot skipped: matplotlib is not installed; pip install -e '.[bench]')")
        return False
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = (("origin", "origin egress / model size", 1.05), ("slowest", "slowest node's pull / solo pull", 1.5),
              ("upload", "largest upload / mean upload", None))
    for ax, (key, label, goal) in zip(axes, panels, strict=True):
        for name in SCENARIOS:
            points = sorted((f["nodes"], f[key]) for f in rows if f["scenario"] == name)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        if key == "slowest":
            ax.plot([f["nodes"] for f in rows if f["scenario"] == "all at once"],
                    [f["p50"] for f in rows if f["scenario"] == "all at once"], linestyle=":", marker=".",
                    label="all at once, p50")
            ax.axhline(1.8, linestyle="-.", color="lightgrey", label="Kraken's published 1.8")
        if goal:
            ax.axhline(goal, linestyle="--", color="grey", label=f"goal {goal}")
        ax.set_xscale("log")
        ax.set_xlabel("nodes")
        ax.set_ylabel(label)
        ax.set_ylim(0, max(ax.get_ylim()[1], 2.0 if key != "origin" else 1.3))
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 and 100 nodes, a 10 GB model")
    parser.add_argument("--nodes", type=int, nargs="*", help="node counts (default 10 100 1000 5000)")
    parser.add_argument("--model-gb", type=float, help="model size in GB (default 100, --quick 10)")
    parser.add_argument("--node-gbit", type=float, default=10.0, help="each node's upload and download cap")
    parser.add_argument("--origin-gbit", type=float, default=40.0, help="the origin's cap")
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS), help="only these (repeatable)")
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks" / "sim-p2p.png")
    parser.add_argument("--save", type=Path, help="append each result to this file (JSON lines) as it comes")
    parser.add_argument("--load", type=Path, nargs="+", help="print and plot results saved with --save instead")
    parser.add_argument("--order", choices=["rounds", "walk"], default="rounds",
                        help="the workers' order: router.rounds (the daemon's) or the earlier router.walk")
    parser.add_argument("--why", action="store_true", help="say why pieces were read from the origin again")
    args = parser.parse_args()

    nodes = args.nodes or ([10, 100] if args.quick else [10, 100, 1000, 5000])
    model = int((args.model_gb or (10 if args.quick else 100)) * GB)
    node_cap, origin_cap = args.node_gbit * GB / 8, args.origin_gbit * GB / 8
    chosen = args.scenario or list(SCENARIOS)
    piece = piece_size(model)
    print(f"model {model / GB:g} GB in {piece_count(model, piece)} pieces of {piece >> 20} MiB; nodes "
          f"{args.node_gbit:g} Gbit/s up and down, origin {args.origin_gbit:g} Gbit/s; solo pull "
          f"{model / min(node_cap, origin_cap):.1f} s; {TransferConfig().concurrency} fetches and {UPLOADS} uploads "
          f"per node at once", flush=True)
    rows: list[dict] = []
    if args.load:
        rows = [json.loads(line) for path in args.load for line in path.read_text().splitlines() if line.strip()]
    for n in [] if args.load else nodes:
        ranking = None
        for name in chosen:
            cfg = Config(n, model=model, up=node_cap, down=node_cap, origin=origin_cap, order=args.order,
                         **SCENARIOS[name])  # type: ignore[arg-type]
            cpu = time.process_time()
            sim = Sim(cfg, ranking)
            ranking = sim.ranking
            result = sim.run()
            result.extra["cpu"] = time.process_time() - cpu  # the first scenario's includes the ranking's weights
            rows.append(row(name, result))
            print(table(rows[-1:])[-1], flush=True)
            if args.why:
                print("    read from the origin again:", rows[-1]["why"] or "none", flush=True)
            if args.save:
                with args.save.open("a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
    rows.sort(key=lambda f: (f["nodes"], list(SCENARIOS).index(f["scenario"])))
    print()
    print("\n".join(table(rows)))
    model = int(rows[0]["model"]) if rows else model
    drawn = plot(rows, args.plot, f"{model / GB:g} GB to N nodes through peers (nodes {args.node_gbit:g} Gbit/s, "
                                  f"origin {args.origin_gbit:g} Gbit/s)")
    if drawn:
        print(f"wrote {args.plot}")
    for f in rows:  # for tools/bench_report.py
        record("sim", **f, plot=str(args.plot) if drawn else "")


if __name__ == "__main__":
    main()
