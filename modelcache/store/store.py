"""The store: content, index and views of one root, behind one object."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InvalidContent
from ..model import Archive
from ..tree import Node
from .content import ContentStore
from .crash import crash_point
from .index import Index
from .views import ViewEntry, build_view, detach, move_aside, remove_tree, view_digest

if TYPE_CHECKING:  # the unpacker (tarfile, zstd, ISA-L) is loaded by the first unpack, not by a warm pull
    from .unpack import Row

# Unpacked size is bounded (issue 10: a 96 KiB zstd layer must not inflate to
# 3 GiB): a layer may unpack to this many times its own size, and always to
# UNPACK_FLOOR, which covers small layers of text that compress very well.
UNPACK_RATIO = 100
UNPACK_FLOOR = 64 << 20


def unpack_limit(archive: Archive) -> int:
    """The most bytes ``archive``'s files may add up to (see UNPACK_RATIO)."""
    return max(UNPACK_FLOOR, UNPACK_RATIO * archive.blob.size)


class Store:
    """A modelcache store rooted at ``root`` (created if missing)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self.index = Index(self.root / "index.sqlite")
        self.content = ContentStore(self.root, ledger=self.index)
        self.views_dir = self.root / "views"
        self.views_dir.mkdir(exist_ok=True)

    def close(self) -> None:
        """Close the index."""
        self.index.close()

    def view_path(self, view: str) -> Path:
        """Where the view ``sha256:<hex>`` lives (it may not exist)."""
        hex_ = view.partition(":")[2]
        if len(hex_) != 64 or not hex_.isalnum():
            raise InvalidContent(f"not a view digest: {view!r}")
        return self.views_dir / hex_

    def layer_rows(self, digest: str) -> list[Row] | None:
        """The recorded listing of an unpacked layer whose blobs are all still here."""
        rows = self.index.layer_entries(digest)
        if rows is None:
            return None
        if all(self.content.has(r[2]) for r in rows if r[0] == "f"):
            return rows
        self.index.forget_layer(digest)
        return None

    def unpack(self, archive: Archive, *, leases: Sequence[str] = ()) -> list[Row]:
        """Unpack a committed archive blob, record its listing, drop the archive blob.

        The compressed layer is not kept: its files are (held by ``leases``
        from the moment each is linked), and the listing lets a later pull of
        the same layer skip it entirely.
        """
        from .unpack import unpack_layer

        rows = unpack_layer(
            self.content, self.content.path(archive.blob.digest), archive.compression,
            name=archive.blob.digest, leases=leases, limit=unpack_limit(archive),
        )
        return self.record_layer(archive, rows)

    def record_layer(self, archive: Archive, rows: list[Row]) -> list[Row]:
        """Record the listing of a layer whose files are stored; drop its archive blob unless a model uses it
        (its bytes unlinked in the background: :meth:`ContentStore.delete_later`)."""
        self.index.put_layer(archive.blob.digest, rows)
        crash_point("layer-recorded")
        if not self.index.blob_users(archive.blob.digest):
            self.content.delete_later(archive.blob.digest)
        return rows

    def build_view(self, nodes: Sequence[Node], *, lease: str | None = None) -> Path:
        """Materialise a tree of nodes as a read-only view; return its path.

        With ``lease``, the view is held by it before its tree appears, so gc
        never takes a view built but not yet recorded from a live pull.
        """
        entries = [ViewEntry(n.path, n.kind, n.digest, n.size, n.target) for n in nodes]
        if lease is not None:
            self.index.hold(lease, views=[view_digest(entries)])
        path = build_view(self.views_dir, entries, self.content.path)
        crash_point("view-built")
        return path

    def drop_view(self, view: str, *, unless_held: bool = True, aside: bool = False) -> tuple[bool, Path | None]:
        """Take a view out of service: its rows first, then its tree; return (dropped, moved-aside path).

        Not dropped when a lease holds it and ``unless_held``. With ``aside``
        the tree is renamed to ``.corrupt-*`` (a pod may have it mounted)
        instead of deleted. The tree leaves ``views/<hex>`` inside the index
        transaction, so it is never served half deleted.
        """
        path = self.view_path(view)
        moved: list[Path | None] = []

        def take_away() -> None:
            if aside:
                moved.append(move_aside(path))
            else:
                moved.append(detach(path))

        if not self.index.forget_view(view, unless_held=unless_held, then=take_away):
            return False, None
        crash_point("view-forgotten")
        if aside:
            return True, moved[0]
        if moved[0] is not None:
            remove_tree(moved[0])
        return True, None

    def disk_usage(self) -> int:
        """Bytes held in committed blobs, as the index counts them (no stat of the store)."""
        return self.index.usage()
