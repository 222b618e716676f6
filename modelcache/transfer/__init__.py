"""The transfer engine: blobs fetched as chunks, in parallel, verified, resumable."""

from .engine import Engine, TransferConfig, TransferStats
from .routing import ChunkRouter, OriginOnly

__all__ = ["ChunkRouter", "Engine", "OriginOnly", "TransferConfig", "TransferStats"]
