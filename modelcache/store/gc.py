"""Evicting cached models: least recently used first, never pinned or mounted ones.

A view is a tree of hardlinks to blobs, so a blob's link count says whether
any view still uses it: a committed blob with ``st_nlink == 1`` belongs to no
view and can go. Blobs are deleted only after the views that used them, so a
reader of a surviving view never loses a file. Partial downloads under
``ingest/`` are kept (they resume) unless older than ``ingest_max_age``.
Views that ``verify --delete`` moved aside (``views/.corrupt-*``, because a
pod had them mounted) are removed once no lease holds a view of that name.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field

from .store import Store
from .views import aside_owner, remove_tree


@dataclass(slots=True)
class GcReport:
    """What a collection removed and what remains."""

    views_removed: list[str] = field(default_factory=list)
    corrupt_views_removed: list[str] = field(default_factory=list)
    blobs_removed: int = 0
    bytes_freed: int = 0
    ingests_removed: int = 0
    bytes_kept: int = 0


def collect(store: Store, *, max_bytes: int | None = None, ingest_max_age: float | None = None) -> GcReport:
    """Evict LRU views until blobs fit in ``max_bytes`` (all unprotected ones if 0).

    With ``max_bytes=None`` no view is evicted; only blobs no view uses (left
    by evictions, failed builds or unpacked layers) are removed.
    """
    report = GcReport()
    used = store.disk_usage()
    if max_bytes is not None and used > max_bytes:
        for view, _size, _last in store.index.eviction_candidates():
            if used <= max_bytes:
                break
            hex_ = view.partition(":")[2]
            used -= _exclusive_bytes(store, hex_)
            remove_tree(store.views_dir / hex_)
            store.index.forget_view(view)
            report.views_removed.append(view)
    _remove_unmounted_corrupt_views(store, report)
    for digest in list(store.content.digests()):
        path = store.content.path(digest)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        if st.st_nlink == 1:
            store.content.delete(digest)
            report.blobs_removed += 1
            report.bytes_freed += st.st_size
    if ingest_max_age is not None:
        cutoff = time.time() - ingest_max_age
        for entry in os.scandir(store.content.ingest_dir):
            if entry.is_dir() and entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry.path, ignore_errors=True)
                report.ingests_removed += 1
    report.bytes_kept = store.disk_usage()
    return report


def _remove_unmounted_corrupt_views(store: Store, report: GcReport) -> None:
    """Drop ``views/.corrupt-<hex12>-<random>`` trees no lease needs any more.

    A lease names the view, not the aside directory, so any lease on a view
    with the same name prefix keeps it: cautious, never a tree under a pod.
    """
    leased = {view.partition(":")[2][:12] for _id, view, _holder in store.index.leases()}
    for entry in os.scandir(store.views_dir):
        owner = aside_owner(entry.name)
        if owner is not None and owner not in leased and entry.is_dir(follow_symlinks=False):
            remove_tree(store.views_dir / entry.name)
            report.corrupt_views_removed.append(entry.name)


def _exclusive_bytes(store: Store, view_hex: str) -> int:
    """Bytes that removing this view would free: blobs linked only from it."""
    total = 0
    seen: set[int] = set()
    for dirpath, _dirs, files in os.walk(store.views_dir / view_hex):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_ino not in seen and st.st_nlink == 2:  # the blob itself + this view
                seen.add(st.st_ino)
                total += st.st_size
    return total
