"""The transfer engine: blobs fetched as chunks, in parallel, verified, resumable."""

from typing import TYPE_CHECKING

from ..lazy import exports

if TYPE_CHECKING:
    from .config import TransferConfig
    from .engine import Engine
    from .routing import ChunkRouter, OriginOnly
    from .stats import TransferStats

# Each loaded when first asked for: the lean HTTP client needs .meter and .hangup, not the engine (issue 13).
__getattr__ = exports(globals(), {"Engine": "engine", "TransferConfig": "config", "TransferStats": "stats",
                                  "ChunkRouter": "routing", "OriginOnly": "routing"})

__all__ = ["ChunkRouter", "Engine", "OriginOnly", "TransferConfig", "TransferStats"]
