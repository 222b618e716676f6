"""The transfer engine: blobs fetched as chunks, in parallel, verified, resumable."""

from typing import TYPE_CHECKING

from ..lazy import exports

if TYPE_CHECKING:
    from .engine import Engine, TransferConfig, TransferStats
    from .routing import ChunkRouter, OriginOnly

# Each loaded when first asked for: the lean HTTP client needs .meter and .hangup, not the engine (issue 13).
__getattr__ = exports(globals(), {"Engine": "engine", "TransferConfig": "engine", "TransferStats": "engine",
                                  "ChunkRouter": "routing", "OriginOnly": "routing"})

__all__ = ["ChunkRouter", "Engine", "OriginOnly", "TransferConfig", "TransferStats"]
