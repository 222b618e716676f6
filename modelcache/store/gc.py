"""Collecting the store: what no lease holds goes, in an order a crash cannot break.

Leases are the only roots (see :mod:`modelcache.store`). One pass:

1. leases of processes that are gone expire;
2. what dead or interrupted work left is removed: ``views/.del-*`` (views
   already forgotten), ``views/.tmp-*`` and ``ingest/tmp-*`` whose writing
   process is gone, views built but never recorded that no lease holds, and
   ingests of blobs already committed that no writer holds (one killed
   between linking the blob and cleaning up: its data is a second link to
   the blob, which would pass for a view's for ever);
3. with a budget, least recently used views no lease holds are evicted until
   the blobs fit (a view's rows go first, its tree is renamed out of
   ``views/`` in the same transaction, then deleted);
4. moved-aside corrupt views (``views/.corrupt-*``) go once no mount lease
   holds a view of that name;
5. blobs that no view links (``st_nlink == 1``) and no lease holds are
   deleted, each decided and unlinked inside one index transaction, so a
   pull that leases a blob either sees it gone (and fetches it) or keeps it;
6. partial downloads under ``ingest/`` older than ``ingest_max_age`` go.

The daemon's budget (:mod:`.budget`) evicts through the same functions.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Conflict
from . import liveness
from .crash import crash_point
from .store import Store
from .views import TMP, TRASH, aside_owner, detach, remove_tree


@dataclass(slots=True)
class GcReport:
    """What a collection removed and what remains."""

    views_removed: list[str] = field(default_factory=list)
    corrupt_views_removed: list[str] = field(default_factory=list)
    orphans_removed: list[str] = field(default_factory=list)
    leases_expired: list[str] = field(default_factory=list)
    blobs_removed: int = 0
    bytes_freed: int = 0
    ingests_removed: int = 0
    bytes_kept: int = 0


def collect(store: Store, *, max_bytes: int | None = None, ingest_max_age: float | None = None) -> GcReport:
    """Evict LRU views until blobs fit in ``max_bytes`` (all unleased ones if 0); remove what nothing holds.

    With ``max_bytes=None`` no recorded view is evicted; only what no view and
    no lease holds is removed.
    """
    report = GcReport()
    report.leases_expired = store.index.expire_leases()
    crash_point("gc-leases-expired")
    remove_leftovers(store, report)
    crash_point("gc-leftovers-removed")
    if max_bytes is not None:
        evict(store, max_bytes, report)
    _remove_unmounted_corrupt_views(store, report)
    sweep_blobs(store, report)
    if ingest_max_age is not None:
        cutoff = time.time() - ingest_max_age
        for entry in os.scandir(store.content.ingest_dir):
            if entry.is_dir() and entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry.path, ignore_errors=True)
                report.ingests_removed += 1
    report.bytes_kept = store.index.usage()
    return report


def evict(store: Store, max_bytes: int, report: GcReport) -> None:
    """Drop least recently used views no lease holds until committed blobs fit in ``max_bytes``, then sweep.

    What a view frees is the bytes of blobs only it holds: a blob shared with
    a kept model (or held by a pull) stays, and is not counted as freed.
    """
    used = store.index.usage()
    while used > max_bytes:
        candidates = store.index.eviction_candidates()
        if not candidates:
            break
        view, frees, _last = candidates[0]
        dropped, _ = store.drop_view(view, unless_held=True)
        if dropped:
            report.views_removed.append(view)
            used -= frees
    if report.views_removed:
        crash_point("gc-evicted")
        sweep_blobs(store, report)


def sweep_blobs(store: Store, report: GcReport) -> None:
    """Delete blobs no view links and no lease holds; make the index's count match the disk."""
    on_disk: dict[str, int] = {}
    for digest in list(store.content.digests()):
        path = store.content.path(digest)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        if st.st_nlink > 1:
            on_disk[digest] = st.st_size
            continue

        def unlink(path=path) -> int | None:
            # Decided again under the index's write lock: a view may have linked it meanwhile.
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return 0
            if st.st_nlink > 1:
                return None
            path.unlink()
            crash_point("gc-blob-unlinked")  # the row goes when the transaction commits
            return st.st_size

        freed = store.index.remove_blob_unless_held(digest, unlink)
        if freed is None:
            on_disk[digest] = st.st_size
        else:
            report.blobs_removed += 1
            report.bytes_freed += freed
    store.index.reconcile_blobs(on_disk, store.content.has)


def remove_leftovers(store: Store, report: GcReport) -> None:
    """Remove what crashed or killed work left behind (step 2 of the module docstring)."""
    recorded = store.index.views()
    for entry in os.scandir(store.views_dir):
        name = entry.name
        if name.startswith(TRASH) or (name.startswith(TMP) and not liveness.tmp_owner_alive(name[len(TMP):])):
            remove_tree(store.views_dir / name)
            report.orphans_removed.append(name)
        elif len(name) == 64 and "sha256:" + name not in recorded:
            # Built, never recorded (its pull died, or gc dropped its row and died): gone once no lease holds it.
            moved = _Detach(store.views_dir / name)
            if store.index.unheld_orphan("sha256:" + name, moved):
                if moved.trash is not None:
                    remove_tree(moved.trash)
                report.orphans_removed.append(name)
    for entry in os.scandir(store.content.ingest_dir):
        if entry.name.startswith("tmp-") and not liveness.tmp_owner_alive(entry.name[4:]):
            os.unlink(entry.path)
            report.orphans_removed.append("ingest/" + entry.name)
        elif len(entry.name) == 64 and entry.is_dir() and store.content.has("sha256:" + entry.name):
            # Committed, its writer killed before cleaning up (step 2 above); skipped while one holds it.
            try:
                store.content.abort("sha256:" + entry.name)
            except Conflict:
                continue
            report.orphans_removed.append("ingest/" + entry.name)


class _Detach:
    """Move a view out of ``views/`` when called (inside an index transaction); remember where to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.trash: Path | None = None

    def __call__(self) -> None:
        self.trash = detach(self.path)


def _remove_unmounted_corrupt_views(store: Store, report: GcReport) -> None:
    """Drop ``views/.corrupt-<hex12>-<random>`` trees no lease needs any more.

    A lease names the view, not the aside directory, so any lease on a view
    with the same name prefix keeps it: cautious, never a tree under a pod.
    """
    leased = {view.partition(":")[2][:12] for lease in store.index.leases() for view in lease.views}
    for entry in os.scandir(store.views_dir):
        owner = aside_owner(entry.name)
        if owner is not None and owner not in leased and entry.is_dir(follow_symlinks=False):
            remove_tree(store.views_dir / entry.name)
            report.corrupt_views_removed.append(entry.name)
