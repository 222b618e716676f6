"""The PieceRouter a pull uses when peers are on: home first, other candidates, the origin last.

For piece ``i`` of a blob the candidates are the live members ranked by
rendezvous hashing of (blob digest, ``i``) (:mod:`.ring`):

- if another node is the home, it is asked in ``home`` mode (it fetches the
  piece from the origin once however many ask, or sends us to a holder);
- the next candidates, up to :data:`PROBES`, are asked in ``have`` mode
  (they hold it or say no at once): after a membership change they include
  the piece's earlier homes, so a node that joins never goes to the origin
  for a byte some peer holds;
- the origin last, with the engine's retries.

Blobs whose sha256 is not known before download (``Blob.verified`` false)
come from the origin alone: no check could catch a peer's wrong bytes.

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
    """The peers to ask for a piece ranked ``ranked``, as (url, mode): its home (unless it is us) in ``home``
    mode, then the next :data:`PROBES` candidates in ``have`` mode; the origin comes after them."""
    return [(url, "home" if n == 0 else "have") for n, url in enumerate(ranked[:PROBES + 1]) if url != me]


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
                 on_report: Callable[[str, str], None] = lambda url, outcome: None) -> None:
        self.origin, self.members, self.client, self.minimum = origin, members, client, minimum
        self._on_report = on_report

    def piece_size(self, blob: Blob) -> int:
        """A function of the blob's size alone (see :mod:`.pieces`)."""
        return piece_size(blob.size, self.minimum)

    def candidates(self, blob: Blob, index: int) -> list[str]:
        """Members best first for this piece (ourselves included when known)."""
        return rank(piece_key(blob.digest, index), self.members.ranking())

    def sources(self, blob: Blob, chunk: int) -> Sequence[ByteSource]:
        """Home (unless it is us), then holders to probe, then the origin."""
        if not blob.verified:
            # No sha256 known before the download (S3 objects, small Hub files): nothing could check a
            # peer's bytes (an MD5 is no check against a peer), so these come from the origin alone.
            return [self.origin]
        asks = plan(self.candidates(blob, chunk), self.members.me)
        return [*(self.client.source(url, mode) for url, mode in asks), self.origin]

    def order(self, blob: Blob, indexes: list[int]) -> list[int]:
        """Our home pieces first, then the rest from an offset of our own."""
        me = self.members.me
        return walk(indexes, lambda i: me is not None and self.candidates(blob, i)[:1] == [me],
                    score(blob.digest, me or self.client.node_id))

    async def piece_digests(self, blob: Blob) -> list[str] | None:
        """The piece list from the first candidate of piece 0 that has one (checked in length)."""
        count = piece_count(blob.size, self.piece_size(blob))
        for url in [u for u in self.candidates(blob, 0) if u != self.members.me][:PROBES]:
            digests = await self.client.digests(url, blob.digest)
            if digests is not None and len(digests) == count:
                return digests
        return None

    def report(self, source: ByteSource, blob: Blob, index: int, outcome: str) -> None:
        """A peer that failed or lied is benched (and counted); the origin's outcomes are the engine's."""
        if isinstance(source, PeerSource):
            self.members.report(source.url, outcome)
            self._on_report(source.url, outcome)

    def trusted(self, blob: Blob) -> Sequence[ByteSource]:
        """The origin alone."""
        return [self.origin]
