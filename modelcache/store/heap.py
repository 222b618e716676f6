"""Keeping freed megabyte blocks in the process for reuse, instead of giving them back to the kernel.

Unpacking a compressed layer makes a new block of up to a MiB for every MiB
inflated (:mod:`.inflate`), hands it to another thread (:mod:`.handoff`),
and frees it once hashed and written. Measured on a pull of one 512 MiB gzip
layer (issue 13), glibc's malloc gave those blocks back to the kernel and
took fresh pages for the next ones: one page fault per 4 KiB inflated
(137,000 faults, on the inflate thread that bounds the pull), against 7,000
with the thresholds below, at the same peak memory; the pull's kernel time
went from 1.5 to 0.6 s. :func:`keep_freed_blocks` sets them once per process:

- blocks up to :data:`MMAP_THRESHOLD` come from the heap, not from a
  mapping of their own that is unmapped when freed;
- free memory at the top of a heap is given back only beyond
  :data:`TRIM_THRESHOLD`, so the few MiB in flight are reused as they are.

Only glibc has these knobs (``mallopt``, M_TRIM_THRESHOLD and
M_MMAP_THRESHOLD); elsewhere this does nothing. An operator's own choice in
the environment (``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``,
``GLIBC_TUNABLES``) is left as it is.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 4 << 20
TRIM_THRESHOLD = 16 << 20
_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_OPERATOR = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


@functools.cache
def keep_freed_blocks() -> bool:
    """Set the thresholds of the module docstring (once); whether they were set."""
    if any(name in os.environ for name in _OPERATOR):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):  # "glibc 2.36"; musl and others: not known
            return False
    except (ValueError, OSError):
        return False
    try:
        libc = ctypes.CDLL(None)
        done = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
            bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):  # no mallopt in this libc after all
        return False
    if not done:
        log.debug("mallopt refused the unpacking's thresholds")
    return done
