"""The disk budget: space is reserved for a pull before it starts, evicting to make room.

A budget is ``max_size`` (bytes of committed blobs) and/or ``min_free``
(bytes, or a fraction of the filesystem, to leave free); the tighter one is
the *high watermark*. A pull reserves the bytes it still has to fetch, in
the index under its lease (so reservations of every process on the store
count, and die with their process). When usage plus reservations would pass
the high watermark, least recently used models that no lease holds are
evicted (through :func:`.gc.evict`) down to the *low watermark*
(``low_water`` of the high one), so the next pulls do not evict one model
each. If nothing more can be evicted, the pull fails at once with
:class:`NoSpace`, naming the models that hold the space. Usage is the
index's count of committed blobs, never a stat of the store.
"""

from __future__ import annotations

import functools
import operator
import shutil
from dataclasses import dataclass

from ..errors import NoSpace
from .gc import GcReport, evict
from .store import Store


@dataclass(frozen=True, slots=True)
class Budget:
    """Limits on the store's disk use (None: no such limit)."""

    max_size: int | None = None
    min_free: int | None = None  # bytes to leave free on the store's filesystem
    min_free_ratio: float | None = None  # or this fraction of it
    low_water: float = 0.9

    def active(self) -> bool:
        """True when any limit is set."""
        return any(v is not None for v in (self.max_size, self.min_free, self.min_free_ratio))

    def high(self, store: Store, used: int) -> int | None:
        """The most bytes committed blobs may hold now (None: unlimited)."""
        limits = [] if self.max_size is None else [self.max_size]
        if self.min_free is not None or self.min_free_ratio is not None:
            disk = shutil.disk_usage(store.root)
            keep = max(self.min_free or 0, int((self.min_free_ratio or 0.0) * disk.total))
            limits.append(used + disk.free - keep)
        return min(limits) if limits else None


def reserve(store: Store, budget: Budget, lease_id: str, size: int) -> GcReport:
    """Reserve ``size`` bytes for the pull holding ``lease_id``, evicting LRU unleased models to make room."""
    report = GcReport()
    if not budget.active():
        return report
    report.leases_expired = store.index.expire_leases()
    for _ in range(8):  # each round evicts at least one model, or stops
        used = store.index.usage()
        high = budget.high(store, used)
        if high is None or store.index.reserve(lease_id, size, functools.partial(operator.ge, high)):
            return report
        others = store.index.reserved() - _reserved_by(store, lease_id)
        before = len(report.views_removed)
        evict(store, max(0, int(high * budget.low_water) - size - others), report)
        if len(report.views_removed) == before:
            break
    used = store.index.usage()
    high = budget.high(store, used) or 0
    raise NoSpace(f"store {store.root}: a pull needs {size} bytes, but {used} of the budget's {high} are held "
                  f"and nothing more can be evicted; held by: {describe_holders(store)}")


def enforce(store: Store, budget: Budget) -> GcReport:
    """Evict LRU unleased models while usage and reservations are above the high watermark."""
    report = GcReport()
    if not budget.active():
        return report
    used = store.index.usage()
    high = budget.high(store, used)
    if high is not None and used + store.index.reserved() > high:
        evict(store, max(0, int(high * budget.low_water) - store.index.reserved()), report)
    return report


def _reserved_by(store: Store, lease_id: str) -> int:
    return sum(lease.reserved for lease in store.index.leases() if lease.id == lease_id)


def describe_holders(store: Store) -> str:
    """The models holding space and why (pinned, mounted, being pulled), for an error message."""
    records = {r.view: r for r in store.index.records()}
    parts: list[str] = []
    seen: set[str] = set()
    for lease in store.index.leases():
        for view in lease.views:
            record = records.get(view)
            if record is None or view in seen:
                continue
            seen.add(view)
            parts.append(f"{record.ref} ({record.size} bytes, {lease.kind} by {lease.owner})")
        if lease.kind == "pull" and lease.reserved:
            parts.append(f"a pull in progress ({lease.reserved} bytes reserved, {lease.owner})")
    return "; ".join(parts) if parts else "nothing evictable (blobs of models in use)"
