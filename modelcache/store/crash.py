"""Crash points for the fault tests: ``MODELCACHE_TEST_CRASH_AT=<name>[@<n>]`` SIGKILLs the process there.

Only tests set the variable; it names the one step after which the process
dies as if the power went (at its ``n``-th pass there, default the first), so
a test can show that the store is left in its old state or in one gc
finishes. Each point is a one-line ``crash_point("name")`` call in the code;
:data:`POINTS` lists them all, so the crash suite can be checked to cover
every one. The variable is read once at import: unset, a point costs one
comparison with None.
"""

from __future__ import annotations

import os
import signal
import threading

# Every crash point, by the step it follows (the crash suite parametrizes over these).
POINTS = (
    "pull-leased",            # pull: its lease is taken, nothing resolved yet
    "resolved",               # pull: the model is resolved, nothing held or fetched
    "blobs-held",             # pull: the blobs it needs are held, nothing fetched
    "chunk-recorded",         # ingest: a chunk is durable and marked done
    "commit-verified",        # commit: the digest checked, not yet fsync'd or linked
    "blob-counted",           # commit: counted and held in the index, not yet linked into blobs/
    "blob-linked",            # commit: linked into blobs/, the directory not yet fsync'd, ingest not cleaned
    "unpack-file-written",    # unpack: one file of a layer written to ingest/tmp-*, not yet named
    "layer-recorded",         # unpack: the layer's listing recorded, its archive blob not yet dropped
    "view-linked",            # view build: the tree is linked under views/.tmp-*, not yet renamed
    "view-built",             # view build: renamed into place, not yet recorded
    "view-recorded",          # record: the view and its ref are recorded, the pull's lease still held
    "gc-leases-expired",      # gc: dead processes' leases dropped, nothing removed yet
    "gc-leftovers-removed",   # gc: temp and trash trees removed, nothing evicted yet
    "view-forgotten",         # gc / verify / scrub: a view's rows are gone and its tree renamed, not deleted
    "gc-blob-unlinked",       # gc: a blob unlinked inside its transaction, the row not yet deleted
    "gc-evicted",             # gc: views evicted, their blobs not yet swept
    "verify-found",           # verify / scrub: a corrupt blob found, nothing taken out of service yet
    "blob-deleted",           # verify / scrub (and unpack dropping its archive): a blob unlinked, not yet uncounted
    "mount-handed-over",      # daemon: a pull job leased its view for the waiting volumes, its own lease still held
    "mount-leased",           # daemon: a volume's mount lease taken, not yet bind-mounted
)

_AT = os.environ.get("MODELCACHE_TEST_CRASH_AT") or None
_NAME, _, _NTH = (_AT or "").partition("@")
_left = int(_NTH or 1)
_lock = threading.Lock()


def crash_point(name: str) -> None:
    """Die at once (SIGKILL, no cleanup) if the tests asked for a crash at ``name`` (this pass of it)."""
    if _AT is None or name != _NAME:
        return
    global _left
    with _lock:
        _left -= 1
        if _left > 0:
            return
    os.kill(os.getpid(), signal.SIGKILL)
