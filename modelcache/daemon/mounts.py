"""Read-only bind mounts of views, and the leases that keep mounted views alive.

Guarantees:

- A published volume is a bind mount of a view at kubelet's target path,
  remounted read-only (two mount(2) calls: a bind mount ignores MS_RDONLY
  until it is remounted), so nothing in a pod can write into the store.
- A lease under the volume id is recorded *before* the mount (the pull
  manager takes it when it hands out the view) and dropped *after* the
  unmount, so gc never evicts a view that is mounted somewhere;
  its holder records the target path, which restart recovery checks against
  ``/proc/self/mountinfo``.
- Publish and unpublish of one target never interleave (kubelet may retry a
  call whose deadline passed while our mount thread still runs).
- Publishing a volume already mounted with the same view is a no-op success;
  a target holding anything else is refused with :class:`Conflict` (CSI:
  ALREADY_EXISTS), never mounted over.

All methods block (syscalls, sqlite); the daemon calls them in threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import re
import threading
from pathlib import Path

from ..errors import Conflict
from ..store import Store
from ..store.crash import crash_point

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_OCTAL = re.compile(rb"\\([0-7]{3})")


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def bind_read_only(source: Path, target: Path) -> None:
    """Bind-mount ``source`` at ``target`` and make that mount read-only."""
    src, tgt = os.fsencode(source), os.fsencode(target)
    _check(_libc.mount(src, tgt, None, MS_BIND, None), f"bind mount {source} at {target}")
    try:
        _check(_libc.mount(None, tgt, None, MS_BIND | MS_REMOUNT | MS_RDONLY, None),
               f"remount {target} read-only")
    except OSError:
        _libc.umount2(tgt, MNT_DETACH)  # never leave a writable bind mount behind
        raise


def unmount(target: Path) -> bool:
    """Unmount the topmost mount at ``target``; False when nothing was mounted there."""
    path = os.fsencode(target)
    if _libc.umount2(path, 0) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    if err == errno.EBUSY:  # still in use: detach now, the kernel frees it when the last user goes
        _check(_libc.umount2(path, MNT_DETACH), f"unmount {target}")
        return True
    raise OSError(err, f"unmount {target}: {os.strerror(err)}")


def mount_points() -> dict[str, bool]:
    """Mount points of this mount namespace -> read-only, from /proc/self/mountinfo."""
    points: dict[str, bool] = {}
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            # proc(5): field 5 is the mount point with space, tab, newline and
            # backslash escaped as \ooo; field 6 the per-mount options.
            point = os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), fields[4]))
            points[point] = b"ro" in fields[5].split(b",")
    return points


class Mounts:
    """Publishes and unpublishes volumes, keeping leases in step."""

    def __init__(self, store: Store) -> None:
        self.store = store
        # Striped by target path: bounded memory, and unrelated targets rarely wait on each other.
        self._locks = [threading.Lock() for _ in range(64)]

    def _lock(self, target: Path) -> threading.Lock:
        return self._locks[hash(str(target)) % len(self._locks)]

    def publish(self, volume_id: str, view: Path, target: Path, holder: dict[str, str]) -> bool:
        """Mount ``view`` read-only at ``target`` under a lease; False if it already was."""
        lease_holder = json.dumps({**holder, "target": str(target)})
        view_digest = "sha256:" + view.name
        with self._lock(target):
            if str(target) in mount_points():
                if not _same_dir(target, view):
                    self._drop_if_unmounted(volume_id)  # the lease view_for took for this refused mount
                    raise Conflict(f"{target} is already a mount point of something else "
                                   f"(volume {volume_id} asks for view {view.name[:12]})")
                self._lease(volume_id, view_digest, lease_holder)
                return False
            target.mkdir(parents=True, exist_ok=True)
            self._lease(volume_id, view_digest, lease_holder)
            crash_point("mount-leased")
            try:
                bind_read_only(view, target)
            except OSError:
                self.store.index.drop_lease(volume_id)
                raise
            return True

    def abandon(self, volume_id: str) -> None:
        """Drop the lease a failed NodePublishVolume took for ``volume_id``, unless it was published.

        The lease of a volume never published has an empty holder (publish
        records the target in it); a published volume's stays, whatever
        became of kubelet's asking again.
        """
        self.store.index.drop_lease(volume_id, if_holder="")

    def _drop_if_unmounted(self, volume_id: str) -> None:
        points = mount_points()
        for lease in self.store.index.leases("mount"):
            if lease.id == volume_id and _target(lease.holder) not in points:
                self.store.index.drop_lease(volume_id)

    def _lease(self, volume_id: str, view: str, holder: str) -> None:
        # Owned by the daemon, not its process: it survives a restart, and recover() checks it.
        self.store.index.add_lease(volume_id, kind="mount", owner="daemon", holder=holder, views=[view])

    def unpublish(self, volume_id: str, target: Path) -> bool:
        """Unmount ``target``, drop the lease, remove the directory; False if nothing was mounted."""
        with self._lock(target):
            was = False
            for _ in range(16):  # a mount stacked by hand (or a crash mid-publish) goes too
                if not unmount(target):
                    break
                was = True
            self.store.index.drop_lease(volume_id)
            try:
                target.rmdir()  # CSI: the plugin removes what it created at the target path
            except OSError:
                pass  # already gone, or not an empty directory of ours: leave it to kubelet
            return was

    def active(self) -> int:
        """Volumes currently published (leases whose target is mounted)."""
        points = mount_points()
        return sum(1 for lease in self.store.index.leases("mount") if _target(lease.holder) in points)

    def recover(self) -> tuple[int, int]:
        """After a restart: keep leases whose target is still mounted, drop the rest.

        Returns (kept, dropped).
        """
        points = mount_points()
        kept = dropped = 0
        for lease in self.store.index.leases("mount"):
            if _target(lease.holder) in points:
                kept += 1
            else:
                self.store.index.drop_lease(lease.id)
                dropped += 1
        return kept, dropped


def _target(holder: str) -> str | None:
    try:
        target = json.loads(holder).get("target")
    except (ValueError, AttributeError):
        return None
    return target if isinstance(target, str) else None


def _same_dir(target: Path, view: Path) -> bool:
    """True when the mount at ``target`` shows ``view`` (a bind mount shares its root's inode)."""
    try:
        a, b = os.stat(target), os.stat(view)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
