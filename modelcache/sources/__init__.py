"""Sources: turn a reference into a :class:`~modelcache.model.Model` and serve its bytes.

Every source implements :class:`Source`; :func:`open_source` picks one for a
parsed reference.
"""

from typing import TYPE_CHECKING

from ..lazy import exports

if TYPE_CHECKING:
    from .base import ByteSource, Probe, Source, SourceOptions
    from .credentials import SourceCredentials
    from .open import open_source

# Each loaded when first asked for (issue 13: start-up costs only what the command uses).
__getattr__ = exports(globals(), {"ByteSource": "base", "Probe": "base", "Source": "base", "SourceOptions": "base",
                                  "SourceCredentials": "credentials", "open_source": "open"})

__all__ = ["ByteSource", "Probe", "Source", "SourceCredentials", "SourceOptions", "open_source"]
