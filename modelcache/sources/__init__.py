"""Sources: turn a reference into a :class:`~modelcache.model.Model` and serve its bytes.

Every source implements :class:`Source`; :func:`open_source` picks one for a
parsed reference.
"""

from .base import ByteSource, Source, SourceOptions, open_source

__all__ = ["ByteSource", "Source", "SourceOptions", "open_source"]
