"""Model trees: safe relative paths, include/exclude globs, and layer overlay.

Pure functions, no I/O. Paths in a model are POSIX, relative, normalised and
never escape the model's root: this module is the one place that decides it.
"""

from __future__ import annotations

import fnmatch
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .errors import InvalidReference, UnsafePath

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"


def _climbs_out(path: str) -> bool:
    """True when walking ``path`` from the root goes above it at some point.

    ``normpath("/a/../../b")`` is ``"/b"``, which hides the escape: count the
    components ourselves.
    """
    depth = 0
    for part in path.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def safe_path(raw: str, *, context: str) -> str:
    """Normalise a path from a layer or manifest; refuse one that escapes the root.

    Leading ``/`` and ``./`` are dropped, as tar and image layers use them for
    the layer's own root; ``..`` that climbs above the root is refused.
    """
    if "\x00" in raw:
        raise UnsafePath(f"{context}: path {raw!r} contains NUL")
    if _climbs_out(raw):
        raise UnsafePath(f"{context}: path {raw!r} escapes the model directory")
    rel = posixpath.normpath("/" + raw.lstrip("/")).lstrip("/")
    if not rel:
        raise UnsafePath(f"{context}: empty path {raw!r}")
    # Linux's NAME_MAX and PATH_MAX (bytes): past them a view cannot be built, so the content is refused
    # as it arrives rather than failing as an OSError deep in the store.
    _check_length(rel, context=context, what="path")
    return rel


def _check_length(path: str, *, context: str, what: str) -> None:
    encoded = path.encode("utf-8", "surrogateescape")
    if len(encoded) >= 4096 or any(len(part) > 255 for part in encoded.split(b"/")):
        raise UnsafePath(f"{context}: {what} {_short(path)} is too long (255 bytes a name, 4095 a path)")


def _short(path: str) -> str:
    return repr(path if len(path) <= 80 else path[:60] + "…" + path[-16:])


def utf8_name(rel: str, *, context: str) -> str:
    """``rel`` (a name read from the file system), refused unless it is valid UTF-8.

    Model paths travel as UTF-8 (tar PAX headers, JSON annotations, the
    index); a name made of other bytes reaches Python as lone surrogates
    that none of those can carry, so it is named here, as bytes, instead.
    """
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        shown = repr(rel.encode("utf-8", "surrogateescape"))[2:-1]
        raise UnsafePath(f"{context}: file name '{shown}' is not valid UTF-8; rename it") from None
    return rel


def safe_link_target(link_path: str, target: str, *, context: str) -> str:
    """A symlink target that stays inside the root, as a relative path.

    Absolute targets mean the image's own root, so they are rewritten relative
    to the link; targets that climb out of the root are refused.
    """
    if not target:
        raise UnsafePath(f"{context}: symlink {link_path!r} has an empty target")
    base = posixpath.dirname(link_path)
    joined = target.lstrip("/") if target.startswith("/") else posixpath.join(base, target)
    if _climbs_out(joined):
        raise UnsafePath(f"{context}: symlink {link_path!r} -> {target!r} points outside the model")
    # A target no lookup can follow (ENAMETOOLONG) is refused like an overlong name.
    _check_length(target, context=context, what=f"symlink {link_path!r} target")
    if not target.startswith("/"):
        return target
    return posixpath.relpath(posixpath.normpath("/" + joined), "/" + base if base else "/")


def check_links(links: Mapping[str, str], paths: Iterable[str], *, context: str) -> None:
    """Refuse a tree that leads outside its root through its own symlinks.

    :func:`safe_link_target` judges one target by its text; only the whole
    tree shows that ``x -> a/l/../..`` climbs out when ``a/l -> ..``, or that
    an entry below a symlink would be written wherever that symlink points.
    ``links`` maps each symlink's path to its target; ``paths`` is every entry.
    """
    for path in paths:
        parent = posixpath.dirname(path)
        while parent:
            if parent in links:
                raise UnsafePath(f"{context}: {path!r} lies below the symlink {parent!r}")
            parent = posixpath.dirname(parent)
    for path, target in links.items():
        _resolve_inside(links, path, target, context=context)


def _resolve_inside(links: Mapping[str, str], path: str, target: str, *, context: str) -> None:
    # Walk the target as the kernel would, following the tree's own links.
    if target.startswith("/"):
        raise UnsafePath(f"{context}: symlink {path!r} -> {target!r} is absolute; it would leave the model")
    where = path.split("/")[:-1]
    pending = target.split("/")[::-1]
    hops = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not where:
                raise UnsafePath(f"{context}: symlink {path!r} -> {target!r} leads outside the model")
            where.pop()
            continue
        where.append(part)
        step = links.get("/".join(where))
        if step is None:
            continue
        hops += 1
        if hops > 40 or step.startswith("/"):  # 40: the kernel's own limit before ELOOP
            raise UnsafePath(f"{context}: symlink {path!r} -> {target!r} loops or leaves the model")
        where.pop()
        pending.extend(step.split("/")[::-1])


@dataclass(frozen=True, slots=True)
class Filters:
    """Include/exclude globs (fnmatch, ``*`` also matches ``/``)."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @classmethod
    def of(cls, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> Filters:
        """Build from user input, refusing empty patterns."""
        inc, exc = tuple(include), tuple(exclude)
        for pattern in inc + exc:
            if not pattern.strip():
                raise InvalidReference("empty --include/--exclude pattern")
        return cls(inc, exc)

    def match(self, path: str) -> bool:
        """True when ``path`` is selected."""
        if self.include and not any(_glob(path, p) for p in self.include):
            return False
        return not any(_glob(path, p) for p in self.exclude)

    def key(self) -> str:
        """A stable text form, part of the index key of a pulled ref."""
        if not self.include and not self.exclude:
            return ""

        def joined(patterns: tuple[str, ...] | list[str]) -> str:
            # Escaped, so a pattern holding "," or ";" never reads as two patterns.
            return ",".join(p.replace("\\", "\\\\").replace(",", "\\,").replace(";", "\\;")
                            for p in sorted(patterns))

        return f"inc={joined(self.include)};exc={joined(self.exclude)}"


def _glob(path: str, pattern: str) -> bool:
    pattern = pattern.lstrip("/")
    if fnmatch.fnmatchcase(path, pattern):
        return True
    # "dir/" or "dir" selects everything below it, as people expect of a directory.
    return path.startswith(pattern.rstrip("/") + "/")


@dataclass(frozen=True, slots=True)
class Node:
    """One entry of a composed tree (``kind``: file, symlink, dir)."""

    path: str
    kind: str
    digest: str = ""
    size: int = 0
    target: str = ""


def overlay(layers: Sequence[Sequence[Node | tuple[str, str]]]) -> dict[str, Node]:
    """Apply layers in order, honouring OCI whiteouts; return path -> node.

    A layer is a sequence of nodes and of ``("whiteout", path)`` /
    ``("opaque", dir)`` markers, as recorded when the layer was unpacked.
    Linear in the entries: what lies below a path is found through an index
    of each directory's children, never by scanning the tree (a layer of ten
    thousand files used to cost a hundred million prefix tests on every pull).
    """
    tree: dict[str, Node] = {}
    below: dict[str, set[str]] = {}  # directory ("" the root) -> paths directly under it, present or once added
    for layer in layers:
        # Whiteouts hide what lower layers put there, never the layer's own entries.
        for item in layer:
            if isinstance(item, tuple):
                marker, path = item
                if marker == "whiteout":
                    tree.pop(path, None)
                _drop_below(tree, below, path)
        for item in layer:
            if isinstance(item, Node):
                if item.kind != "dir":
                    _drop_below(tree, below, item.path)  # a file replaces a directory
                parent = posixpath.dirname(item.path)
                while parent:  # and a directory replaces a file (or link) in its way
                    if parent in tree and tree[parent].kind != "dir":
                        del tree[parent]
                    parent = posixpath.dirname(parent)
                tree[item.path] = item
                _register(below, item.path)
    return tree


def _register(below: dict[str, set[str]], path: str) -> None:
    """Record ``path`` under its parent, and each ancestor under its own, up to one already recorded."""
    while path:
        parent = posixpath.dirname(path)
        children = below.setdefault(parent, set())
        if path in children:
            return
        children.add(path)
        path = parent


def _drop_below(tree: dict[str, Node], below: dict[str, set[str]], path: str) -> None:
    """Remove every entry under ``path`` (everything, for the root ``""``), not ``path`` itself."""
    pending = [path.rstrip("/")]
    while pending:
        for child in below.pop(pending.pop(), ()):
            tree.pop(child, None)
            pending.append(child)
