"""Sources: turn a reference into a :class:`~modelcache.model.Model` and serve its bytes.

Every source implements :class:`Source`; :func:`open_source` picks one for a
parsed reference.
"""

from .base import ByteSource, Probe, Source, SourceOptions, open_source
from .credentials import SourceCredentials

__all__ = ["ByteSource", "Probe", "Source", "SourceCredentials", "SourceOptions", "open_source"]
