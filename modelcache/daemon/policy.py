"""Which model references the daemon takes from the network and from pods.

Guarantees:

- Remote references (``oci://``, ``s3://``, ``hf://``) are taken; a host
  path (``file://``, ``oci-layout://`` or a plain path) is taken only when
  it lies under a directory the operator allowed (``serve --allow-local``).
  With no allowed directory, every host path is refused.
- "Remote or local" is decided from the text alone, before
  :func:`modelcache.refs.parse` looks at the filesystem, so a refused path
  gets the same answer whether or not it exists.
- "Under" compares real paths (symlinks resolved, ``..`` applied) component
  by component: ``/srv/models-evil`` is not under ``/srv/models``, and a
  symlink inside an allowed directory that leads out of it is refused. The
  parsed reference is rewritten to its real path, so the pull reads the
  directory that was checked.

The CLI, run by a user as themselves, does not use this policy.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote

from ..errors import Forbidden
from ..refs import DirRef, HfRef, LayoutRef, OciRef, Ref, S3Ref, parse

REMOTE_SCHEMES = frozenset({"oci", "s3", "hf"})
LOCAL_SCHEMES = frozenset({"file", "oci-layout"})
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class RefPolicy:
    """Admits references for the daemon (blocking when a local path must be checked)."""

    def __init__(self, allow_local: Iterable[str | os.PathLike[str]] = ()) -> None:
        # Kept as given (made absolute) and resolved at each check, so a prefix
        # created after the daemon started, or a mount moved under it, is judged as it is now.
        self.allow_local = tuple(Path(os.path.abspath(p)) for p in allow_local)

    def admit(self, text: str) -> Ref:
        """The parsed reference if the daemon may pull it; :class:`Forbidden` otherwise."""
        text = text.strip()
        scheme = _SCHEME.match(text)
        kind = scheme.group(1).lower() if scheme else None
        if kind is not None and kind not in LOCAL_SCHEMES:
            # Remote, or a scheme parse refuses as unsupported: neither touches the filesystem.
            ref = parse(text)
            if not isinstance(ref, OciRef | S3Ref | HfRef):  # parse learnt a new local form: still refuse
                raise self._refused(text)
            return ref
        if not self.allow_local or not any(self._under(p) for p in _candidates(text, kind)):
            raise self._refused(text)
        ref = parse(text)
        if not isinstance(ref, DirRef | LayoutRef):
            raise self._refused(text)
        real = Path(os.path.realpath(ref.path))
        if not self._under(real):  # e.g. DIR:TAG where DIR is a symlink leading out
            raise self._refused(text)
        return dataclasses.replace(ref, path=real)

    def _under(self, path: Path | str) -> bool:
        real = Path(os.path.realpath(path))
        return any(real.is_relative_to(os.path.realpath(prefix)) for prefix in self.allow_local)

    def _refused(self, text: str) -> Forbidden:
        # One message whatever the path is, exists or not: nothing about the host leaks.
        where = ("is not under a directory allowed with `modelcache serve --allow-local`" if self.allow_local
                 else "is refused: the daemon takes only oci://, s3:// and hf:// references unless the operator "
                      "allows directories with `modelcache serve --allow-local PATH`")
        return Forbidden(f"local path {_short(text)!r} {where}")


def _candidates(text: str, kind: str | None) -> list[str]:
    """The path a local reference names, and the path without a ``:TAG`` / ``@DIGEST`` suffix."""
    path = unquote(text.split("://", 1)[1]) if kind else text
    paths = [path]
    for sep in ("@", ":"):
        head, found, _ = path.rpartition(sep)
        if found and head:
            paths.append(head)
    # Relative paths mean nothing to a daemon (its working directory is not the caller's).
    return [p for p in paths if os.path.isabs(p)]


def _short(text: str) -> str:
    return text if len(text) <= 200 else text[:200] + "…"
