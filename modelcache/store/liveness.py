"""Which process holds something, and whether it still lives.

A process is named by its pid *and* its start time (field 22 of
``/proc/<pid>/stat``, in clock ticks since boot), so a pid the kernel hands
to a new process after ours died does not keep our leases or temp files
alive. Both come from this process's pid namespace; processes sharing a
store share one namespace (one node's daemon and its CLI).
"""

from __future__ import annotations

import os
import re

_TMP = re.compile(r"^(\d+)\.(\d+)-")


def start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ")":
    # the fields after it start at the last ")".
    fields = stat[stat.rfind(b")") + 2:].split()
    return int(fields[19])  # field 22 overall; fields[0] here is field 3


def me() -> tuple[int, int]:
    """(pid, start time) of this process."""
    pid = os.getpid()
    start = start_time(pid)
    assert start is not None
    return pid, start


def alive(pid: int, start: int) -> bool:
    """True while the process that was ``pid`` started at ``start`` still runs (a zombie counts as gone)."""
    if start_time(pid) != start:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")


def tmp_prefix() -> str:
    """``<pid>.<start>-``: the head of a temp name, so gc can tell whether its writer still lives."""
    pid, start = me()
    return f"{pid}.{start}-"


def tmp_owner_alive(name: str) -> bool:
    """Whether the writer of a temp file named ``<prefix><tmp_prefix()>...`` still runs (False if unnamed)."""
    m = _TMP.match(name)
    return m is not None and alive(int(m.group(1)), int(m.group(2)))
