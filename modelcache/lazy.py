"""Packages whose public names load their modules on first use (PEP 562).

Why: ``from modelcache.store.index import Index`` runs ``modelcache/store/__init__.py``
first, and a package that imports all of its modules there makes every
command pay for all of them (issue 13: a warm pull loaded the unpacker, the
zstd and ISA-L bindings and the transfer engine it never used). A package
lists its names here instead; each is imported the first time it is asked
for, and then cached in the package like any other attribute.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def exports(namespace: dict[str, Any], where: Mapping[str, str]) -> Callable[[str], object]:
    """The ``__getattr__`` of the package whose ``globals()`` is ``namespace``:
    ``where`` maps each public name to the submodule (relative) that defines it."""
    package = namespace["__name__"]

    def __getattr__(name: str) -> object:
        module = where.get(name)
        if module is None:  # also how ``from package import submodule`` finds its way to the submodule
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    return __getattr__
