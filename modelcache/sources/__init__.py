"""Sources: turn a reference into a :class:`~modelcache.model.Model` and serve its bytes.

Every source implements :class:`Source`; :func:`open_source` picks one for a
parsed reference.
"""

from .base import ByteSource, Probe, Source, SourceOptions
from .credentials import SourceCredentials
from .open import open_source

__all__ = ["ByteSource", "Probe", "Source", "SourceCredentials", "SourceOptions", "open_source"]
