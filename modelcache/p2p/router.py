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
  for a byte some peer holds;
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

Each node walks its pieces in its own order: the pieces it is home for
first (it is their one origin fetcher), then the rest starting at an offset
of its own, so homes are loaded evenly and not in lockstep from piece 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..model import Blob
from ..sources.base import ByteSource
from .client import PeerClient, PeerSource
from .members import Members
from .pieces import piece_count, piece_size
from .ring import piece_key, rank, score

PROBES = 3  # candidates after the home asked whether they hold a piece


def plan(ranked: Sequence[str], me: str | None) -> list[tuple[str, str]]:
    """The peers to ask for a piece ranked ``ranked``, as (url, mode), the origin coming after them.

    Unless we are the piece's home: its home in ``home`` mode, its fallback (the next candidate, unless that
    is us) in ``fallback`` mode (asked as home only once the home failed). The rest, up to :data:`PROBES`
    after the home, in ``have`` mode; a home asks them all that way (asking as a home a peer that may itself
    be waiting on us would stall both).
    """
    fallback = bool(ranked) and ranked[0] != me
    return [(url, "home" if n == 0 else "fallback" if n == 1 and fallback else "have")
            for n, url in enumerate(ranked[:PROBES + 1]) if url != me]


def elected_first(asks: list[tuple[str, str]], elected: str | None, me: str | None) -> list[tuple[str, str]]:
    """``asks`` with the requester we elected to fetch the piece (if any, and not us) asked first as its home."""
    if elected is None or elected == me:
        return asks
    return [(elected, "home"), *[(url, mode) for url, mode in asks if url != elected]]


def walk(indexes: list[int], mine: Callable[[int], bool], seed: int) -> list[int]:
    """A node's order over ``indexes``: those ``mine`` says it is home for first, then the rest starting at
    an offset given by ``seed`` (each node's own), so homes are loaded evenly and not in lockstep."""
    if not indexes:
        return indexes
    first = [i for i in indexes if mine(i)]
    taken = set(first)
    rest = [i for i in indexes if i not in taken]
    shift = seed % len(rest) if rest else 0
    return first + rest[shift:] + rest[:shift]


class PeerRouter:
    """Routes each piece through peers before ``origin``."""

    def __init__(self, origin: ByteSource, members: Members, client: PeerClient, *, minimum: int,
                 on_report: Callable[[str, str], None] = lambda url, outcome: None,
                 elected: Callable[[str, int], str | None] = lambda digest, offset: None) -> None:
        self.origin, self.members, self.client, self.minimum = origin, members, client, minimum
        self._on_report = on_report
        self._elected = elected  # (digest, piece offset) -> the requester our peer server elected to fetch it

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
        """Our home pieces first, then the rest from an offset of our own."""
        me = self.members.me
        return walk(indexes, lambda i: me is not None and self.candidates(blob, i)[:1] == [me],
                    score(blob.digest, me or self.client.node_id))

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
            # A timeout is a strike, not a verdict: on a loaded machine the event loops lag (ours or the peer's)
            # and a live home misses the deadline; benched at once, it would stop being anyone's home here.
            self.members.report(source.url, "slow" if outcome == "failed" and source.slow else outcome)
            self._on_report(source.url, outcome)

    def trusted(self, blob: Blob) -> Sequence[ByteSource]:
        """The origin alone."""
        return [self.origin]
