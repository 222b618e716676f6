"""Scrub: re-check committed blobs, and take corrupt ones out of service.

One check of one blob (:func:`check_blob`) reads it once:

- by default with xxh3-128, against the checksum recorded at commit (taken
  in the same pass as the sha256, :mod:`.content`): fast, and enough to
  notice bit rot in bytes that were verified when they arrived;
- with sha256 (the blob's name) when asked, or when no xxh3 was recorded
  (blobs committed before there was one). That pass computes the xxh3 too
  and records it, so the next check of that blob is fast.

An xxh3 mismatch is confirmed by a sha256 pass before anything is deleted:
a wrong row must never cost a good blob (a good sha256 corrects the row).
A blob that vanishes while it is checked (gc, another verify beside us) is
gone, not corrupt; one replaced under us (deleted and committed again) is
judged by the file now there, never deleted for the bytes of the old one.

A corrupt blob is taken out of service (:func:`take_out_of_service`): each
view made of it goes, its rows first and its tree renamed away in the same
index transaction (:meth:`.Store.drop_view`); a view a mount lease holds is
renamed aside to ``views/.corrupt-*`` instead (the pod's bind mount follows
the directory; gc removes it once unmounted). Then the blob is deleted and
uncounted, so the next pull fetches it again. The views go too because their
files are the blob's own inode: kept, a re-pull would hand back the same
corrupt tree under the same name.

``modelcache verify`` runs :func:`verify` over every blob; the daemon runs a
:class:`Scrubber` pass after pass, at a bounded rate, in its task group.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import xxhash

from .crash import crash_point
from .store import Store

log = logging.getLogger(__name__)

BLOCK = 4 << 20  # bytes read per step (the most a paced scrub reads between two sleeps)
_MIN_BLOCK = 64 << 10


@dataclass(slots=True)
class Verdict:
    """What one check of a blob found."""

    blob: str
    state: str  # "ok" | "corrupt" | "gone"
    algorithm: str = ""  # "xxh3" | "sha256": the check that decided
    actual: str = ""  # for a corrupt blob: what its bytes hash to (sha256:...)
    size: int = 0  # bytes read
    inode: tuple[int, int, int] | None = None  # (st_dev, st_ino, st_ctime_ns) of the file read


@dataclass(slots=True)
class Corrupt:
    """A corrupt blob and what became of it."""

    blob: str
    actual: str
    views: list[str]
    deleted: bool
    moved_aside: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        """As ``verify --json`` prints it."""
        return {"blob": self.blob, "actual": self.actual, "views": self.views, "deleted": self.deleted,
                "moved_aside": self.moved_aside}


Scan = Generator[int, None, Verdict]


def _read(path: os.PathLike[str] | str, hashes: list, block: int,
          inode: list[tuple[int, int, int]]) -> Generator[int, None, int]:
    """Feed the file's bytes to ``hashes``, yielding after each block; return the size read."""
    with open(path, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        inode.append((st.st_dev, st.st_ino, st.st_ctime_ns))  # ctime too: a new file may reuse the inode
        size = 0
        while piece := f.read(block):
            for h in hashes:
                h.update(piece)
            size += len(piece)
            yield len(piece)
        return size


def scan(store: Store, digest: str, *, sha256: bool = False, block: int = BLOCK) -> Scan:
    """Check one blob, yielding the bytes read after each block; return the :class:`Verdict`.

    A generator, so a paced caller can sleep (or be cancelled) between blocks
    without holding a thread; :func:`check_blob` runs it through.
    """
    path = store.content.path(digest)
    recorded = None if sha256 else store.index.blob_xxh3(digest)
    inode: list[tuple[int, int, int]] = []
    try:
        if recorded is not None:
            fast = xxhash.xxh3_128()
            size = yield from _read(path, [fast], block, inode)
            if fast.hexdigest() == recorded:
                return Verdict(digest, "ok", "xxh3", size=size, inode=inode[0])
            # A mismatch: confirmed (or overruled) by the blob's name before anything is deleted.
            log.warning("blob %s: xxh3 differs from the one recorded at commit; checking its sha256", digest)
        slow, fast = hashlib.sha256(), xxhash.xxh3_128()
        size = yield from _read(path, [slow, fast], block, inode)
    except FileNotFoundError:  # removed beside us (gc, another verify): gone, not corrupt
        return Verdict(digest, "gone")
    actual = "sha256:" + slow.hexdigest()
    if actual != digest:
        return Verdict(digest, "corrupt", "sha256", actual=actual, size=size, inode=inode[-1])
    if store.index.blob_xxh3(digest) != fast.hexdigest():  # none yet, or a wrong one: now known good
        store.index.set_blob_xxh3(digest, fast.hexdigest())
    return Verdict(digest, "ok", "sha256", size=size, inode=inode[-1])


def check_blob(store: Store, digest: str, *, sha256: bool = False) -> Verdict:
    """Check one blob at full speed (blocks: run it in a thread from async code)."""
    gen = scan(store, digest, sha256=sha256)
    while True:
        try:
            next(gen)
        except StopIteration as done:
            return done.value


def take_out_of_service(store: Store, verdict: Verdict) -> Corrupt | None:
    """Drop (or move aside, if mounted) the views made of a corrupt blob, then delete the blob.

    None (nothing done) if the file now at the blob's path is not the one
    found corrupt: it was deleted and fetched again meanwhile.
    """
    crash_point("verify-found")
    path = store.content.path(verdict.blob)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None and (st.st_dev, st.st_ino, st.st_ctime_ns) != verdict.inode:
        return None
    mounted = {view for lease in store.index.leases("mount") for view in lease.views}
    corrupt = Corrupt(verdict.blob, verdict.actual, store.index.blob_users(verdict.blob), deleted=True)
    for view in corrupt.views:
        _, aside = store.drop_view(view, unless_held=False, aside=view in mounted)
        if aside is not None:
            corrupt.moved_aside.append(str(aside))
    store.content.delete(verdict.blob)
    return corrupt


def verify(store: Store, digest: str, *, sha256: bool = False, delete: bool = False) -> Corrupt | None:
    """``modelcache verify`` of one blob: the corrupt finding (taken out of service with ``delete``), or None."""
    verdict = check_blob(store, digest, sha256=sha256)
    if verdict.state != "corrupt":
        return None
    if delete:
        return take_out_of_service(store, verdict)
    return Corrupt(digest, verdict.actual, store.index.blob_users(digest), deleted=False)


class Pacer:
    """Keeps reads at most ``rate`` bytes per second, counted from the start of a pass.

    It sleeps *after* each block until the bytes read so far are due, so
    reading N bytes takes at least N / rate seconds, whatever the block size.
    """

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.done = 0

    async def account(self, n: int) -> None:
        """Count ``n`` bytes read; sleep until they are due."""
        self.done += n
        delay = self.start + self.done / self.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


def _step(gen: Scan) -> tuple[int, Verdict | None]:
    # StopIteration cannot cross a Future: turn the generator's end into a value.
    try:
        return next(gen), None
    except StopIteration as done:
        return 0, done.value


@dataclass
class Scrubber:
    """The daemon's background check: every committed blob, pass after pass, at most ``rate`` bytes/s.

    Each block is read in a thread and every sleep is on the event loop, so a
    scrub never blocks the loop and cancelling it (at drain) waits for one
    block at most. ``on_verdict`` and ``on_corrupt`` feed the metrics.
    """

    store: Store
    rate: int
    interval: float
    on_verdict: Callable[[Verdict], None] = lambda verdict: None
    on_corrupt: Callable[[Corrupt], None] = lambda corrupt: None

    async def run(self) -> None:
        """Scrub forever (until cancelled): a pass, then ``interval`` seconds of rest."""
        while True:
            try:
                await self.scrub_pass()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a scrub that fails once must not stop the daemon; next pass retries
                log.warning("scrub of %s failed: %s", self.store.root, e)
            await asyncio.sleep(self.interval)

    async def scrub_pass(self) -> list[Corrupt]:
        """Check every blob committed now, once; take the corrupt ones out of service."""
        digests = await asyncio.to_thread(lambda: list(self.store.content.digests()))
        pacer = Pacer(self.rate)
        block = min(BLOCK, max(_MIN_BLOCK, self.rate // 8))
        found: list[Corrupt] = []
        for digest in digests:
            # Not closed on cancel: a block may still be read in its thread; the file closes with the generator.
            gen = scan(self.store, digest, block=block)
            while True:
                n, verdict = await asyncio.to_thread(_step, gen)
                if verdict is not None:
                    break
                await pacer.account(n)
            self.on_verdict(verdict)
            if verdict.state == "corrupt":
                corrupt = await asyncio.to_thread(take_out_of_service, self.store, verdict)
                if corrupt is not None:
                    log.warning("scrub: blob %s is corrupt (its bytes hash to %s): deleted; views dropped: %d, "
                                "moved aside (mounted): %d", digest, verdict.actual, len(corrupt.views),
                                len(corrupt.moved_aside))
                    found.append(corrupt)
                    self.on_corrupt(corrupt)
        return found
