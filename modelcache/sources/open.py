"""The factory: which source serves a parsed reference.

Kept apart from :mod:`.base`, which every concrete source imports: base names
no source, so nothing imports back into itself. Each source is imported only
when a reference asks for it (an S3 pull never loads the registry's HTTP client).
"""

from __future__ import annotations

from collections.abc import Callable

from ..refs import DirRef, HfRef, LayoutRef, OciRef, Ref, S3Ref
from .base import Source, SourceOptions


def open_source(ref: Ref, options: SourceOptions, *,
                learned: Callable[[str], str | None] | None = None) -> Source:
    """The source that serves ``ref``; ``learned`` maps an origin's key to a sha256 already known."""
    if isinstance(ref, OciRef):
        from .registry import RegistrySource

        return RegistrySource(ref, options)
    if isinstance(ref, LayoutRef):
        from .layout import LayoutSource

        return LayoutSource(ref)
    if isinstance(ref, HfRef):
        from .hf import HfSource

        return HfSource(ref, options, learned=learned)
    if isinstance(ref, S3Ref):
        from .s3 import S3Source

        return S3Source(ref, options, learned=learned)
    if isinstance(ref, DirRef):
        from .local import DirectorySource

        return DirectorySource(ref)
    raise TypeError(f"no source for {ref!r}")
