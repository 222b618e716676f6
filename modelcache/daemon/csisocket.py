"""The CSI unix socket path: claimed safely, and checked to be still ours.

Guarantees:

- :func:`claim` removes nothing but a stale socket: a socket file that
  refuses connections (left by a killed daemon). A live socket (another
  daemon serves it) and anything that is not a socket (a regular file, a
  directory) are refused with :class:`Conflict`, and left as they are.
  gRPC itself unlinks any socket at the path before it binds, so this check
  has to come first.
- Two daemons starting at once on one path cannot both pass the check: the
  claim holds an exclusive ``flock`` on ``PATH.lock`` for the daemon's life.
- :func:`alive` says whether the socket at the path is still the one we
  bound (same inode) and accepts a connection, within a short timeout; the
  daemon's readiness follows it, so a deleted or replaced socket shows.

Everything here blocks; the daemon calls it in threads.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import Conflict

CONNECT_TIMEOUT = 1.0


@dataclass(frozen=True)
class Claim:
    """A socket path we may bind, and the lock that keeps it ours until :meth:`release`."""

    path: Path
    lock_fd: int

    def release(self) -> None:
        """Drop the lock (the lock file stays: removing it would race a daemon taking it)."""
        os.close(self.lock_fd)


def claim(path: Path) -> Claim:
    """Make ``path`` free for our socket, or raise :class:`Conflict` saying why it is not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Conflict(f"--csi-socket {path}: another modelcache daemon holds {lock_path}; "
                           "stop it or choose another socket path") from None
        _clear(path)
    except BaseException:
        os.close(fd)
        raise
    return Claim(path, fd)


def _clear(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise Conflict(f"--csi-socket {path}: the path exists and is not a socket; "
                       "not removing it (remove it yourself or choose another path)")
    if _connects(path):
        raise Conflict(f"--csi-socket {path}: another process serves this socket; "
                       "stop it or choose another path")
    # Refused (or gone meanwhile): a stale socket from a daemon that was killed.
    path.unlink(missing_ok=True)


def _connects(path: Path) -> bool:
    """True if something accepts connections on the socket (a timeout counts as alive: it is busy)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(CONNECT_TIMEOUT)
        try:
            s.connect(os.fsencode(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except TimeoutError:
            return True
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            raise
        return True


def identity(path: Path) -> tuple[int, int]:
    """The (device, inode) of the socket we just bound."""
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def alive(path: Path, ident: tuple[int, int]) -> bool:
    """True while ``path`` is still the socket we bound and it accepts a connection."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) != ident or not stat.S_ISSOCK(st.st_mode):
            return False
        return _connects(path)
    except OSError:
        return False
