"""Views: a model's file tree made of hardlinks to committed blobs.

A view is named by :func:`view_digest` of its listing (path, kind, content),
so two references that resolve to the same tree share one view. It is built
in ``views/.tmp-<pid>.<start>-*`` and renamed into place whole; files are
the blobs' own inodes (0444) and directories are made 0555, so the tree is
read-only. A view that must go is first renamed to ``views/.del-*`` (inside
the index transaction that forgets it), then removed: a crash midway leaves
a tree nobody serves, which gc removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UnsafePath
from ..tree import check_links, safe_path
from . import liveness
from .crash import crash_point


@dataclass(frozen=True, slots=True)
class ViewEntry:
    """One node of a model tree: a file (``digest``), a symlink (``target``) or a dir."""

    path: str
    kind: str  # "file" | "symlink" | "dir"
    digest: str = ""
    size: int = 0
    target: str = ""


def view_digest(entries: Sequence[ViewEntry]) -> str:
    """The identity of a tree: sha256 over its sorted canonical listing."""
    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e.path):
        h.update(json.dumps([e.path, e.kind, e.digest, e.target], separators=(",", ":")).encode())
        h.update(b"\n")
    return "sha256:" + h.hexdigest()


def build_view(views_dir: Path, entries: Sequence[ViewEntry], blob_path: Callable[[str], Path]) -> Path:
    """Materialise ``entries`` under ``views_dir`` (idempotent); return its path."""
    final = views_dir / view_digest(entries).partition(":")[2]
    if final.is_dir():
        return final
    # Every source checks its paths; this is the last line: nothing is linked outside the tree.
    for e in entries:
        if safe_path(e.path, context=f"view {final.name[:12]}") != e.path:
            raise UnsafePath(f"view {final.name[:12]}: path {e.path!r} is not a clean relative path")
    # Never write through, or link out through, the tree's own symlinks.
    check_links({e.path: e.target for e in entries if e.kind == "symlink"}, (e.path for e in entries),
                context=f"view {final.name[:12]}")
    tmp = views_dir / f".tmp-{liveness.tmp_prefix()}{secrets.token_hex(8)}"
    tmp.mkdir(parents=True)
    dirs = {tmp}
    try:
        for e in sorted(entries, key=lambda e: e.path):
            dest = tmp / e.path
            parent = dest.parent
            if parent not in dirs:
                parent.mkdir(parents=True, exist_ok=True)
                dirs.update(p for p in [parent, *parent.parents] if p.is_relative_to(tmp))
            if e.kind == "file":
                os.link(blob_path(e.digest), dest)
            elif e.kind == "symlink":
                os.symlink(e.target, dest)
            elif e.kind == "dir":
                dest.mkdir(exist_ok=True)
                dirs.add(dest)
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            os.chmod(d, 0o555)
        crash_point("view-linked")
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            remove_tree(tmp)  # built concurrently by someone else: theirs is the same
        return final
    except BaseException:
        remove_tree(tmp)
        raise


def remove_tree(path: Path) -> None:
    """Delete a view tree, making its read-only directories writable first."""
    if not path.exists():
        return
    for dirpath, _dirnames, _files in os.walk(path):
        os.chmod(dirpath, 0o755)
    shutil.rmtree(path, ignore_errors=True)


_ASIDE = ".corrupt-"
TRASH = ".del-"
TMP = ".tmp-"


def detach(path: Path) -> Path | None:
    """Rename a view out of service to ``.del-<hex12>-<random>`` beside it; None if it was not there."""
    trash = path.parent / f"{TRASH}{path.name[:12]}-{secrets.token_hex(4)}"
    try:
        path.rename(trash)
    except FileNotFoundError:
        return None
    return trash


def move_aside(path: Path) -> Path | None:
    """Rename a view that must go but is still mounted to ``.corrupt-<hex12>-<random>`` beside it;
    None if it was not there (removed beside us)."""
    aside = path.parent / f"{_ASIDE}{path.name[:12]}-{secrets.token_hex(4)}"
    try:
        path.rename(aside)
    except FileNotFoundError:
        return None
    return aside


def aside_owner(name: str) -> str | None:
    """The first 12 hex digits of the view a moved-aside tree was, or None for any other name."""
    return name[len(_ASIDE):].split("-")[0] if name.startswith(_ASIDE) else None
