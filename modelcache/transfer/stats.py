"""What a transfer did: counters for progress lines and the closing summary.

Guarantees: ``bytes_done``/``bytes_fetched`` count bytes written into an
ingest (or found committed); bytes still in a reader's buffer are shown by
:meth:`TransferStats.bytes_seen` only, never counted twice (see meter.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .meter import Meter


@dataclass(slots=True)
class TransferStats:
    """What a transfer did, for progress lines and the closing summary."""

    bytes_total: int = 0
    bytes_done: int = 0
    bytes_fetched: int = 0
    bytes_reused: int = 0
    chunks_retried: int = 0
    fetched_by_source: dict[str, int] = field(default_factory=dict)
    learned: dict[str, str] = field(default_factory=dict)  # stand-in digest -> sha256 (unverified blobs)
    # Bytes in readers' buffers, not yet in the counts above: for progress only (see meter.py).
    receiving: Meter = field(default_factory=Meter, repr=False, compare=False)

    def bytes_seen(self) -> tuple[int, int]:
        """(done, fetched) including bytes still being received: what progress shows."""
        pending = self.receiving.pending()
        return self.bytes_done + pending, self.bytes_fetched + pending


Progress = Callable[[TransferStats], None]
