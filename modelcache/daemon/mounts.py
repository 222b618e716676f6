"""Read-only bind mounts of views, and the leases that keep mounted views alive.

A published volume is a bind mount of a view at kubelet's target path,
remounted read-only (two mount(2) calls: a bind mount ignores MS_RDONLY until
remounted). Each mount holds a lease in the index under the volume id, so gc
never evicts a mounted model; the holder records the target path, which is
what restart recovery checks against ``/proc/self/mountinfo``.

All functions block (syscalls, sqlite); the daemon calls them in threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
from pathlib import Path

from ..store import Store

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def bind_read_only(source: Path, target: Path) -> None:
    """Bind-mount ``source`` at ``target`` and make that mount read-only."""
    src, tgt = str(source).encode(), str(target).encode()
    _check(_libc.mount(src, tgt, None, MS_BIND, None), f"bind mount {source} at {target}")
    try:
        _check(_libc.mount(None, tgt, None, MS_BIND | MS_REMOUNT | MS_RDONLY, None),
               f"remount {target} read-only")
    except OSError:
        _libc.umount2(tgt, MNT_DETACH)
        raise


def unmount(target: Path) -> bool:
    """Unmount ``target``; False when nothing was mounted there."""
    if _libc.umount2(str(target).encode(), 0) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    if err == errno.EBUSY:  # still in use: detach now, the kernel frees it when the last user goes
        _check(_libc.umount2(str(target).encode(), MNT_DETACH), f"unmount {target}")
        return True
    raise OSError(err, f"unmount {target}: {os.strerror(err)}")


def mount_points() -> dict[str, bool]:
    """Mount points of this mount namespace -> read-only, from /proc/self/mountinfo."""
    points: dict[str, bool] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            # fields[4] is the mount point (octal-escaped), fields[5] the per-mount options.
            point = fields[4].encode().decode("unicode_escape")
            points[point] = "ro" in fields[5].split(",")
    return points


class Mounts:
    """Publishes and unpublishes volumes, keeping leases in step."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def publish(self, volume_id: str, view: Path, target: Path, holder: dict[str, str]) -> bool:
        """Mount ``view`` read-only at ``target`` under a lease; False if it already was."""
        if mount_points().get(str(target)) is not None:
            self.store.index.add_lease(volume_id, "sha256:" + view.name, json.dumps({**holder, "target": str(target)}))
            return False
        target.mkdir(parents=True, exist_ok=True)
        self.store.index.add_lease(volume_id, "sha256:" + view.name, json.dumps({**holder, "target": str(target)}))
        try:
            bind_read_only(view, target)
        except OSError:
            self.store.index.drop_lease(volume_id)
            raise
        return True

    def unpublish(self, volume_id: str, target: Path) -> bool:
        """Unmount ``target`` and drop the lease; False if nothing was mounted."""
        was = unmount(target)
        self.store.index.drop_lease(volume_id)
        try:
            target.rmdir()  # the plugin removes what it created at the target path
        except (FileNotFoundError, OSError):
            pass
        return was

    def active(self) -> int:
        """Volumes currently published (leases whose target is mounted)."""
        points = mount_points()
        return sum(1 for _id, _view, holder in self.store.index.leases()
                   if json.loads(holder).get("target") in points)

    def recover(self) -> tuple[int, int]:
        """After a restart: keep leases whose target is still mounted, drop the rest.

        Returns (kept, dropped).
        """
        points = mount_points()
        kept = dropped = 0
        for lease_id, _view, holder in self.store.index.leases():
            try:
                target = json.loads(holder).get("target")
            except ValueError:
                target = None
            if target in points:
                kept += 1
            else:
                self.store.index.drop_lease(lease_id)
                dropped += 1
        return kept, dropped
