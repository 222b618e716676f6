"""The PieceRouter a pull uses when peers are on: home first, other candidates, the origin last.

For piece ``i`` of a blob the candidates are the live members ranked by
rendezvous hashing of (blob digest, ``i``) (:mod:`.ring`):

- if another node is the home, it is asked in ``home`` mode (it fetches the
  piece from the origin once however many ask, or sends us to a holder), and
  waited on while it answers that it fetches the piece (see :mod:`.client`);
- the next candidate, the fallback, in ``fallback`` mode: asked as the
  piece's home if the home failed (gone, refused, silent), so the requesters
  of a departed home converge on one fetch there; else whether it holds it;
- the next candidates, up to :data:`PROBES`, are asked in ``have`` mode
  (they hold it or say no at once): after a membership change they include
  the piece's earlier homes, so a node that joins never goes to the origin
  for a byte some peer holds. A node that is the piece's home asks more of
  them, up to :data:`HOME_PROBES`: when nodes join in numbers (an autoscaler
  doubling a pool), the piece's earlier home is ranked below several new
  nodes, past the third candidate about one time in eight, and the home's
  fetch goes to the origin where a probe would have found it;
- the origin last, with the engine's retries.

A node that is a piece's home but elected another to fetch it (its peer
server was asked before this node pulled the blob, :mod:`.holders`) asks
that one as the piece's home first (:func:`elected_first`), so the piece
still leaves the origin once.

Blobs whose sha256 is not known before download (``Blob.verified`` false:
S3 objects, small Hub files) are keyed by their stand-in digest, a hash of
the origin's stable name for the bytes (bucket, key and ETag; repository,
commit and path), which every node derives alike. They go through peers
only when the origin gave a check of the whole blob that the store applies
at commit (``Blob.origin_checked``: a plain S3 ETag's MD5, a multipart
ETag with its part size, the Hub's git blob id); otherwise they come from the origin alone, since nothing could
catch a peer's wrong bytes.

Each node fetches the pieces it is home for ahead (:meth:`PeerRouter.ahead`):
all at once in tasks of their own, through the node's origin gate
(:mod:`.gate`: the cluster opens about as many origin streams as one node),
in index order, so they complete one after another from the start and are
served on while the origin sends the next. It walks the other pieces in
step with their homes (:func:`rounds`): every home's first piece, then every
home's second, and so on, so it asks a home for the piece the home is
fetching just then, not one far down its queue (issue 11: the peer
exchange overlaps the origin phase instead of following it). In a cluster
of more than :data:`~.gate.ORIGIN_STREAMS` members only the first round is
walked in step; each node walks the rest from an offset of its own
(:func:`in_step`), so the tail is not every node wanting the same few pieces.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext

from ..model import Blob
from ..sources.base import ByteSource
from . import trace
from .client import PeerClient, PeerSource
from .gate import ORIGIN_STREAMS, Gate
from .members import Members
from .pieces import piece_count, piece_size
from .ring import piece_key, rank, score

PROBES = 3  # candidates after the home asked whether they hold a piece
# Candidates a piece's home asks before the origin: its earlier home is among them unless this many nodes that
# joined since all outrank it (about 2**-8 of the pieces that moved when a pool doubles; the cluster simulator's
# four waves went from 1.075x the model at the origin to ~1.00x with 8 instead of 3).
HOME_PROBES = 8


def plan(ranked: Sequence[str], me: str | None) -> list[tuple[str, str]]:
    """The peers to ask for a piece ranked ``ranked``, as (url, mode), the origin coming after them.

    Unless we are the piece's home: its home in ``home`` mode, its fallback (the next candidate, unless that
    is us) in ``fallback`` mode (asked as home only once the home failed). The rest, up to :data:`PROBES`
    after the home, in ``have`` mode; a home asks them all that way (asking as a home a peer that may itself
    be waiting on us would stall both), up to :data:`HOME_PROBES` of them.
    """
    fallback = bool(ranked) and ranked[0] != me
    depth = PROBES + 1 if fallback or not ranked else HOME_PROBES + 1
    return [(url, "home" if n == 0 else "fallback" if n == 1 and fallback else "have")
            for n, url in enumerate(ranked[:depth]) if url != me]


def elected_first(asks: list[tuple[str, str]], elected: str | None, me: str | None) -> list[tuple[str, str]]:
    """``asks`` with the requester we elected to fetch the piece (if any, and not us) asked first as its home."""
    if elected is None or elected == me:
        return asks
    return [(elected, "home"), *[(url, mode) for url, mode in asks if url != elected]]


def walk(indexes: list[int], mine: Callable[[int], bool], seed: int) -> list[int]:
    """The earlier order over ``indexes`` (the cluster simulator's ``--order walk``, to compare): those ``mine``
    says it is home for first, then the rest from an offset given by ``seed``. The daemon walks :func:`rounds`."""
    if not indexes:
        return indexes
    first = [i for i in indexes if mine(i)]
    taken = set(first)
    rest = [i for i in indexes if i not in taken]
    shift = seed % len(rest) if rest else 0
    return first + rest[shift:] + rest[:shift]


def rounds(indexes: list[int], home: Callable[[int], str], me: str, seed: Callable[[str], int],
           in_step: int | None = None) -> list[int]:
    """A node's order over ``indexes`` in step with the homes: round ``k`` is every home's ``k``-th piece
    (in index order), homes within a round ordered by ``seed(home)`` (each node's own), so the requesters
    of a round do not all start at the same home. Our own pieces are in it too (fetched ahead anyway).

    Only the first ``in_step`` rounds when given (see :func:`in_step`): the pieces after them follow in index
    order from an offset of this node's own (``seed(me)``), so nodes hold different pieces and trade them."""
    seen: dict[str, int] = {}
    keyed = []
    rest = []
    for i in indexes:
        owner = home(i)
        position = seen[owner] = seen.get(owner, -1) + 1
        if in_step is not None and position >= in_step:
            rest.append(i)
        else:
            keyed.append(((position, owner != me, seed(owner)), i))
    shift = seed(me) % len(rest) if rest else 0
    return [i for _, i in sorted(keyed)] + rest[shift:] + rest[:shift]


def in_step(members: int) -> int | None:
    """How many rounds of :func:`rounds` a node walks in step with the homes when ``members`` share a blob:
    all of them up to :data:`~.gate.ORIGIN_STREAMS` members, else the first.

    In step, every requester wants the pieces of the same round at once. While the homes fetch them from the
    origin that is the point (each is relayed to its requesters as it arrives); past the first round in a
    large cluster it is a bottleneck: the last rounds are the pieces of the few homes with the most, which
    all requesters then want from them and their few holders at once, while the rest of the cluster's
    upload sits idle (the cluster simulator, 100 GB: 100 nodes took 3.4x a solo pull with every round in
    step, 1.5x with the first; 1000 nodes 1.76x and 1.40x). From an offset of its own each node holds
    pieces its peers lack. Up to :data:`~.gate.ORIGIN_STREAMS` members the cluster's origin phase (about one
    node's streams) lasts most of the pull, and every round stays in step.
    """
    return None if members <= ORIGIN_STREAMS else 1


class PeerRouter:
    """Routes each piece through peers before ``origin``."""

    def __init__(self, origin: ByteSource, members: Members, client: PeerClient, *, minimum: int,
                 on_report: Callable[[str, str], None] = lambda url, outcome: None,
                 elected: Callable[[str, int], str | None] = lambda digest, offset: None,
                 gate: Gate | None = None, lookahead: Gate | None = None) -> None:
        self.origin, self.members, self.client, self.minimum = origin, members, client, minimum
        self._on_report = on_report
        self._elected = elected  # (digest, piece offset) -> the requester our peer server elected to fetch it
        self._gate, self._lookahead = gate, lookahead

    def piece_size(self, blob: Blob) -> int:
        """A function of the blob's size alone (see :mod:`.pieces`)."""
        return piece_size(blob.size, self.minimum)

    def candidates(self, blob: Blob, index: int) -> list[str]:
        """Members best first for this piece (ourselves included when known)."""
        return rank(piece_key(blob.digest, index), self.members.ranking())

    def sources(self, blob: Blob, chunk: int) -> Sequence[ByteSource]:
        """Home (unless it is us), then holders to probe, then the origin."""
        if not blob.origin_checked:
            # No sha256 nor any other whole-blob check from the origin (an object in parts the server
            # would not describe): nothing could catch a peer's wrong bytes, so the origin alone.
            return [self.origin]
        me = self.members.me
        ranked = self.candidates(blob, chunk)
        asks = plan(ranked, me)
        if ranked[:1] == [me]:
            asks = elected_first(asks, self._elected(blob.digest, chunk * self.piece_size(blob)), me)
        return [*self.client.asks(asks), self.origin]

    def order(self, blob: Blob, indexes: list[int]) -> list[int]:
        """In step with the homes (:func:`rounds`): every home's first piece, then every home's second...
        (in a large cluster only the first round, :func:`in_step`)."""
        me = self.members.me or self.client.node_id
        return rounds(indexes, lambda i: (self.candidates(blob, i) or [me])[0], me,
                      lambda home: score(f"{blob.digest}|{home}", me), in_step(len(self.members.ranking())))

    def ahead(self, blob: Blob, indexes: list[int]) -> list[int]:
        """The pieces of ``indexes`` we are home for, in index order, when peers share the blob with us: the
        engine fetches them at once in tasks of their own, each in :meth:`pace` (peers ask us for them and
        wait), while its workers walk the others. None without peers, or for a blob peers never serve."""
        me = self.members.me
        if not blob.origin_checked or me is None or not self.members.peers():
            return []
        mine = [i for i in indexes if self.candidates(blob, i)[:1] == [me]]
        if self._gate is not None:
            piece = self.piece_size(blob)
            self._gate.plan(blob.digest, mine, piece_count(blob.size, piece), piece)
        return mine

    def relays(self, blob: Blob, offset: int, length: int) -> bool:
        """Whether an origin read is a whole piece we are home for (or its home gave us), with live peers: one
        to relay (:mod:`.relay`)."""
        piece = self.piece_size(blob)
        me = self.members.me
        return blob.origin_checked and me is not None and offset % piece == 0 \
            and length == min(piece, blob.size - offset) and bool(self.members.peers()) \
            and (self.candidates(blob, offset // piece)[:1] == [me]
                 or (self._gate is not None and self._gate.borrowed((blob.digest, offset // piece))))

    @asynccontextmanager
    async def pace(self, blob: Blob, index: int) -> AsyncIterator[None]:
        """Held while piece ``index`` of :meth:`ahead` is fetched (candidates asked, then the origin read in
        :meth:`gated`): a place among the pieces under way (:data:`~.gate.LOOKAHEAD` per stream)."""
        position = self._gate.position(blob.digest, index) if self._gate is not None else None
        try:
            async with self._lookahead.turn(position or 0, (blob.digest, index)) \
                    if self._lookahead is not None else nullcontext():
                yield
        finally:
            if self._gate is not None:
                self._gate.passed(blob.digest)

    def gated(self, blob: Blob, offset: int) -> AbstractAsyncContextManager[None]:
        """Around an origin read at ``offset``: a place in the node's origin gate if it is a piece fetched ahead."""
        index = offset // self.piece_size(blob)
        position = self._gate.position(blob.digest, index) if self._gate else None
        if self._gate is not None and self._gate.borrowed((blob.digest, index)):
            return self._borrowed((blob.digest, index))
        if position is None or self._gate is None:
            return nullcontext()
        return self._gate.turn(position, (blob.digest, index))

    @asynccontextmanager
    async def _borrowed(self, tag: tuple[str, int]) -> AsyncIterator[None]:
        """Around the origin read of a piece its home gave us: it holds one of our spare streams till it ends."""
        try:
            yield
        finally:
            if self._gate is not None:
                self._gate.returned(tag)

    async def piece_digests(self, blob: Blob) -> list[str] | None:
        """The origin's piece list when its manifest gave one cut as ours, else the first candidate's of
        piece 0 that has one (checked in length).

        The origin's comes with the digest this node resolved itself, so no
        peer is asked: a peer could only offer a list as good, or a false one
        that would blame honest holders. One cut with another piece length
        (a package made with another minimum) cannot check our pieces: ignored.
        """
        count = piece_count(blob.size, self.piece_size(blob))
        if blob.pieces is not None and blob.pieces.length == self.piece_size(blob) \
                and len(blob.pieces.digests) == count:
            return list(blob.pieces.digests)
        for url in [u for u in self.candidates(blob, 0) if u != self.members.me][:PROBES]:
            digests = await self.client.digests(url, blob.digest)
            if digests is not None and len(digests) == count:
                return digests
        return None

    def report(self, source: ByteSource, blob: Blob, index: int, outcome: str) -> None:
        """A peer that failed or lied is benched (and counted); the origin's outcomes are the engine's."""
        if isinstance(source, PeerSource):
            if outcome != "ok":
                trace.event("report-" + outcome, blob.digest, index, 0, source.url)
            # A timeout is a strike, not a verdict: on a loaded machine the event loops lag (ours or the peer's)
            # and a live home misses the deadline; benched at once, it would stop being anyone's home here.
            self.members.report(source.url, "slow" if outcome == "failed" and source.slow else outcome)
            self._on_report(source.url, outcome)

    def trusted(self, blob: Blob) -> Sequence[ByteSource]:
        """The origin alone."""
        return [self.origin]
