"""The store: content, index and views of one root, behind one object."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..model import Archive
from ..tree import Node
from .content import ContentStore
from .index import Index
from .unpack import Row, unpack_layer
from .views import ViewEntry, build_view


class Store:
    """A modelcache store rooted at ``root`` (created if missing)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self.content = ContentStore(self.root)
        self.views_dir = self.root / "views"
        self.views_dir.mkdir(exist_ok=True)
        self.index = Index(self.root / "index.sqlite")

    def close(self) -> None:
        """Close the index."""
        self.index.close()

    def layer_rows(self, digest: str) -> list[Row] | None:
        """The recorded listing of an unpacked layer whose blobs are all still here."""
        rows = self.index.layer_entries(digest)
        if rows is None:
            return None
        if all(self.content.has(r[2]) for r in rows if r[0] == "f"):
            return rows
        self.index.forget_layer(digest)
        return None

    def unpack(self, archive: Archive) -> list[Row]:
        """Unpack a committed archive blob, record its listing, drop the archive blob.

        The compressed layer is not kept: its files are, and the listing lets a
        later pull of the same layer skip it entirely.
        """
        rows = unpack_layer(
            self.content, self.content.path(archive.blob.digest), archive.compression,
            name=archive.blob.digest,
        )
        self.index.put_layer(archive.blob.digest, rows)
        if not self.index.blob_users(archive.blob.digest):
            self.content.delete(archive.blob.digest)
        return rows

    def build_view(self, nodes: Sequence[Node]) -> Path:
        """Materialise a tree of nodes as a read-only view; return its path."""
        entries = [ViewEntry(n.path, n.kind, n.digest, n.size, n.target) for n in nodes]
        return build_view(self.views_dir, entries, self.content.path)

    def disk_usage(self) -> int:
        """Bytes held in committed blobs."""
        return sum(os.stat(self.content.path(d)).st_size for d in self.content.digests())
