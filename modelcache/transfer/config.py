"""How the transfer engine is tuned: one frozen object, every field with a sane default.

Guarantees: the engine reads its tuning only from here, so a pull and the
daemon agree on chunk size, concurrency and the retry budget.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TransferConfig:
    """Tuning of the engine (every field has a sane default)."""

    chunk_size: int = 16 << 20
    concurrency: int = 8
    retries: int = 6
    backoff_base: float = 0.25
    backoff_max: float = 15.0
