"""Blobs and blobs in progress: the content half of the store.

The roles follow containerd's content store: a reader of committed blobs
(:meth:`ContentStore.path`, :meth:`ContentStore.has`), a writer factory for a
blob of known digest (:meth:`ContentStore.open_ingest`, resumable, chunked) and
one for bytes whose digest is learnt while writing them
(:meth:`ContentStore.write_stream`, used to unpack layers; or in two steps,
:meth:`ContentStore.stage` then :meth:`ContentStore.commit_staged`, so the
small files of a layer are made durable together).

Every blob is counted by a *ledger* (the index) just before it is linked
into place, together with the leases that hold it from that moment, so gc
(which deletes only what no lease holds, inside the index's transaction)
can never take a blob between its commit and its first use.

Declared sizes are not trusted: nothing is preallocated (space is taken as
verified-size bytes arrive), a size larger than the store's filesystem is
refused before anything is opened, and ENOSPC becomes :class:`NoSpace`
naming the store and what was still needed, with the ingest kept for resume.

All methods here block (file I/O, fsync, hashing); async callers run them in
threads. The only async method waits for another process's lock without
holding a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import hashlib
import mmap
import os
import secrets
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import xxhash

from ..errors import Conflict, DigestMismatch, InvalidContent, NoSpace, NotFound
from ..model import Blob
from . import liveness
from .ahead import Ahead
from .crash import crash_point
from .direct import DirectWriter, GatheredWriter, pread_into
from .etag import MultipartEtag, S3Crc
from .roles import IngestStatus
from .unlinker import Unlinker

_RECORD_MAGIC = b"MCCHUNK1"
_RECORD_HEADER = struct.Struct("<8sQQ")  # magic, blob size, chunk size
# Beside the record: chunks of which only a prefix is durable (what an interrupt kept).
_PARTIAL_MAGIC = b"MCPART01"
_PARTIAL_ENTRY = struct.Struct("<QQ")  # chunk index, leading bytes durable
_HASH_BLOCK = 4 << 20
_GATHERED = 4 << 20  # a file unpacked from a layer this big or bigger is written past the page cache
_IOV_MAX = 1024
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_INGEST_FILES = ("data", "chunks", "partial", "partial.tmp")


class Ledger(Protocol):
    """Counts committed blobs and records who holds them (the store's index)."""

    def blob_added(self, digest: str, size: int, *, leases: Sequence[str] = (), xxh3: str | None = None) -> None:
        """``digest`` is about to be linked into place; ``leases`` hold it from now on; ``xxh3`` is the
        xxh3-128 of its bytes, taken in the same pass as the sha256 (for scrub)."""

    def blob_removed(self, digest: str) -> None:
        """``digest`` was deleted."""


class ContentStore:
    """Committed blobs under ``blobs/sha256`` and the ``ingest/`` area."""

    def __init__(self, root: Path, ledger: Ledger | None = None) -> None:
        self.root = root
        self.ledger = ledger
        self.blobs_dir = root / "blobs" / "sha256"
        self.ingest_dir = root / "ingest"
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        self.ingest_dir.mkdir(parents=True, exist_ok=True)
        self.unlinker = Unlinker()  # the bytes of blobs removed by delete_later

    def path(self, digest: str) -> Path:
        """Where the committed blob ``digest`` lives (it may not exist)."""
        algo, _, hex_ = digest.partition(":")
        if algo != "sha256" or len(hex_) != 64:
            raise InvalidContent(f"unsupported digest {digest!r}")
        return self.blobs_dir / hex_

    def has(self, digest: str) -> bool:
        """True when the blob is committed (and so verified)."""
        return self.path(digest).is_file()

    def digests(self) -> Iterator[str]:
        """Every committed blob's digest."""
        for entry in os.scandir(self.blobs_dir):
            if entry.is_file() and len(entry.name) == 64:
                yield "sha256:" + entry.name

    # -- Provider: committed blobs and durable chunks of ingests ----------------

    def read(self, digest: str, offset: int, length: int) -> bytes:
        """Bytes of a committed blob (fewer at its end); NotFound if it is not committed."""
        try:
            fd = os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not in the store") from None
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def _record(self, hex_: str) -> tuple[int, int, bytes] | None:
        """(size, chunk size, done flags) of the ingest of ``hex_``, or None."""
        try:
            raw = (self.ingest_dir / hex_ / "chunks").read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if len(raw) < _RECORD_HEADER.size:
            return None
        magic, size, chunk_size = _RECORD_HEADER.unpack_from(raw)
        flags = raw[_RECORD_HEADER.size:]
        if magic != _RECORD_MAGIC or chunk_size <= 0 or len(flags) != max(1, -(-size // chunk_size)):
            return None
        return size, chunk_size, flags

    def _partial(self, hex_: str, size: int, chunk_size: int) -> dict[int, int]:
        """Chunk index -> leading bytes durable, for chunks of the ingest of ``hex_`` kept in part."""
        return read_partial(self.ingest_dir / hex_, size, chunk_size)

    def read_durable(self, digest: str, offset: int, length: int) -> bytes:
        """Bytes of an ingest in progress, only from chunks already durable; NotFound otherwise."""
        end = self._durable_end(digest, offset, length)
        with open(self.ingest_dir / self.path(digest).name / "data", "rb") as f:
            return os.pread(f.fileno(), end - offset, offset)

    def read_durable_into(self, digest: str, offset: int, length: int, buffer: mmap.mmap, *,
                          direct: bool = False) -> int:
        """:meth:`read_durable` into ``buffer`` (page-aligned, reused); with ``direct``, past the page cache
        where it can be (:func:`.direct.pread_into`: for bytes an ingest wrote past it). Returns how many."""
        end = self._durable_end(digest, offset, length)
        return pread_into(self.ingest_dir / self.path(digest).name / "data", offset, buffer, end - offset,
                          direct=direct)

    def _durable_end(self, digest: str, offset: int, length: int) -> int:
        """Where ``[offset, offset + length)`` of an ingest in progress ends (cut at the blob's size);
        NotFound unless every chunk it touches is durable."""
        hex_ = self.path(digest).name
        record = self._record(hex_)
        if record is None:
            raise NotFound(f"no ingest of {digest} in progress")
        size, chunk_size, flags = record
        end = min(offset + length, size)
        if offset < 0 or any(flags[i] != 1 for i in range(offset // chunk_size, -(-end // chunk_size))):
            raise NotFound(f"bytes {offset}-{end} of {digest} are not durable yet")
        return end

    # -- IngestManager --------------------------------------------------------------

    def ingests(self) -> list[IngestStatus]:
        """Every ingest with durable state, by digest."""
        out = []
        for entry in sorted(os.scandir(self.ingest_dir), key=lambda e: e.name):
            record = self._record(entry.name) if entry.is_dir() and len(entry.name) == 64 else None
            if record is not None:
                size, chunk_size, flags = record
                done = sum(min(chunk_size, size - i * chunk_size) for i, f in enumerate(flags) if f == 1)
                done += sum(n for i, n in self._partial(entry.name, size, chunk_size).items() if flags[i] != 1)
                out.append(IngestStatus("sha256:" + entry.name, size, chunk_size, done))
        return out

    def abort(self, digest: str) -> bool:
        """Drop an ingest no writer holds; False if there was none; Conflict while a writer holds it."""
        hex_ = self.path(digest).name
        lock_path = self.ingest_dir / f"{hex_}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Conflict(f"the ingest of {digest} is being written") from None
            existed = (self.ingest_dir / hex_).is_dir()
            for name in _INGEST_FILES:
                (self.ingest_dir / hex_ / name).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                (self.ingest_dir / hex_).rmdir()
            lock_path.unlink(missing_ok=True)
            return existed
        finally:
            os.close(fd)

    # -- ContentManager ---------------------------------------------------------------

    def size(self, digest: str) -> int | None:
        """The size of a committed blob, or None."""
        try:
            return os.stat(self.path(digest)).st_size
        except FileNotFoundError:
            return None

    def delete(self, digest: str) -> None:
        """Remove a committed blob (views keep their own hardlinks)."""
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            pass
        self._removed(digest)

    def delete_later(self, digest: str) -> None:
        """Remove a committed blob from the store now, and unlink its bytes in the background (:mod:`.unlinker`:
        on a disk with online discard that unlink is slow); :meth:`delete_deferred` waits for them.

        For the layers a pull drops once they are unpacked. The blob leaves ``blobs/`` at once, renamed to a
        temp name of this process, which gc removes once the process is gone, should the unlink never come.
        """
        gone = self.ingest_dir / f"tmp-{liveness.tmp_prefix()}gone-{digest.partition(':')[2]}"
        try:
            os.rename(self.path(digest), gone)
        except FileNotFoundError:
            pass
        else:
            self.unlinker.add(gone)
        self._removed(digest)

    def _removed(self, digest: str) -> None:
        crash_point("blob-deleted")
        if self.ledger is not None:
            self.ledger.blob_removed(digest)

    def delete_deferred(self, *, detach: bool = False) -> None:
        """Until the bytes of the blobs :meth:`delete_later` removed are unlinked. ``detach``: hand those not
        yet unlinked to an ``rm`` that goes on once this process has exited (a command about to end)."""
        if detach:
            self.unlinker.hand_off()
        else:
            self.unlinker.finish()

    def check_size(self, blob: Blob) -> None:
        """Refuse a declared size no disk under this store could ever hold (InvalidContent, exit 5)."""
        st = os.statvfs(self.root)
        capacity = st.f_blocks * st.f_frsize
        if not 0 <= blob.size <= capacity:
            raise InvalidContent(f"{blob.digest[:19]} declares {blob.size} bytes, more than the filesystem of "
                                 f"the store {self.root} holds ({capacity} bytes): refusing it")

    def no_space(self, what: str, needed: int) -> NoSpace:
        """The error for ENOSPC while writing ``what``, which still needed ``needed`` bytes."""
        return NoSpace(f"store {self.root}: no space left on its disk writing {what} ({needed} more bytes "
                       "needed); the download is kept and resumes: free space or run `modelcache gc --max-size`")

    # -- ingest of a blob whose digest is known ------------------------------

    async def open_ingest(self, blob: Blob, chunk_size: int) -> BlobIngest | None:
        """Take the cross-process write lock for ``blob`` and open its ingest.

        Returns ``None`` when the blob is (or became, while waiting for another
        writer) committed.
        """
        self.check_size(blob)
        lock_path = self.ingest_dir / f"{blob.hex}.lock"
        fd = await self.lock(lock_path, unless=lambda: self.has(blob.digest))
        if fd is None:
            return None
        try:
            return await asyncio.to_thread(BlobIngest, self, blob, chunk_size, fd, lock_path)
        except BaseException:
            os.close(fd)
            raise

    async def lock(self, path: Path, *, unless: Callable[[], bool] = lambda: False,
                   poll: float = 0.1) -> int | None:
        """Take an exclusive flock on ``path``; return its fd (close it to release).

        Returns ``None``, holding nothing, as soon as ``unless()`` is true (the
        work the lock guards was done by someone else). The lock is polled
        rather than waited on in a thread, so many waiters cost no threads.
        """
        while True:
            if unless():
                return None
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                await asyncio.sleep(poll)
                continue
            # The holder before us may have unlinked the lock file after we
            # opened it; a lock on an unlinked inode guards nothing.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same and not unless():
                return fd
            os.close(fd)
            if same:
                return None

    # -- ingest of bytes whose digest is learnt while writing ---------------

    def write_stream(self, source: IO[bytes], *, expected_size: int | None = None,
                     leases: Sequence[str] = ()) -> tuple[str, int]:
        """Copy ``source`` into the store, hashing on the way; return (digest, size).

        The data lands in a unique temp file (named for this process, so gc
        removes it once the process is gone) and is linked into place only
        once fsync'd and named by its sha256, held by ``leases``.
        """
        staged = self.stage(source, expected_size=expected_size)
        self.commit_staged([staged], leases=leases)
        return staged.digest, staged.size

    def stage(self, source: IO[bytes], *, expected_size: int | None = None) -> Staged:
        """Copy ``source`` into a temp file, hashing on the way: not yet durable, not visible.

        :meth:`commit_staged` makes it a blob; until then (or if never) the
        temp file is named for this process, so gc removes it once we are gone.
        """
        return self.stage_blocks(iter(lambda: source.read(_HASH_BLOCK), b""), expected_size=expected_size)

    def stage_blocks(self, blocks: Iterable[bytes | memoryview], *, expected_size: int | None = None) -> Staged:
        """:meth:`stage` from blocks of bytes, in order (views are hashed and written as they are, no copy).

        A file of :data:`_GATHERED` bytes or more (as ``expected_size`` says) goes past the page cache
        (:class:`~.direct.GatheredWriter`): it is hashed here from memory and nobody reads it back soon."""
        tmp = self.ingest_dir / f"tmp-{liveness.tmp_prefix()}{secrets.token_hex(8)}"
        h, x = hashlib.sha256(), xxhash.xxh3_128()
        size = 0
        try:
            with open(tmp, "wb") as out:  # buffered: small files; big ones bypass it (and the page cache)
                gathered = GatheredWriter(out.fileno(), tmp) if (expected_size or 0) >= _GATHERED else None
                whole = False
                try:
                    write = out.write if gathered is None else gathered.write
                    for block in blocks:
                        h.update(block)
                        x.update(block)
                        write(block)
                        size += len(block)
                    whole = True
                finally:
                    if gathered is not None:
                        gathered.close(flush=whole)  # a file given up is not written further
            if expected_size is not None and size != expected_size:
                raise InvalidContent(f"stream ended after {size} bytes, expected {expected_size}")
            return Staged(tmp, "sha256:" + h.hexdigest(), size, x.hexdigest())
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError) and e.errno in _NO_SPACE:
                raise self.no_space("a file unpacked from a layer", max(0, (expected_size or 0) - size)) from e
            raise

    def commit_staged(self, staged: Sequence[Staged], *, leases: Sequence[str] = ()) -> None:
        """Make staged files durable and link each into place as its digest, held by ``leases``.

        Several files are fsync'd at once, in threads: the filesystem's journal
        commits them together (issue 13: a layer of 3000 tiny files spent 30 s
        in one fsync after another). One fsync of ``blobs/`` covers the links.
        """
        try:
            if len(staged) > 1:
                list(_fsync_pool().map(_fsync_path, [s.tmp for s in staged]))
            elif staged:
                _fsync_path(staged[0].tmp)
            for one in staged:
                crash_point("unpack-file-written")
                self._link_into_place(one.tmp, one.digest, one.size, leases, one.xxh3, sync=False)
            if staged:
                _fsync_dir(self.blobs_dir)
        except OSError as e:
            if e.errno in _NO_SPACE:
                raise self.no_space("files unpacked from a layer", 0) from e
            raise
        finally:
            for one in staged:
                one.tmp.unlink(missing_ok=True)

    def _link_into_place(self, tmp: Path, digest: str, size: int, leases: Sequence[str], xxh3: str | None, *,
                         sync: bool = True) -> None:
        os.chmod(tmp, 0o444)
        if self.ledger is not None:  # counted (and held) before it is visible: see the module docstring
            self.ledger.blob_added(digest, size, leases=leases, xxh3=xxh3)
        crash_point("blob-counted")
        try:
            os.link(tmp, self.path(digest))
        except FileExistsError:
            return  # same digest, same bytes: AlreadyExists is success
        crash_point("blob-linked")
        if sync:
            _fsync_dir(self.blobs_dir)


@dataclass(frozen=True, slots=True)
class Staged:
    """A file written and hashed into a temp file by :meth:`ContentStore.stage`, not yet a blob."""

    tmp: Path
    digest: str
    size: int
    xxh3: str


class BlobIngest:
    """A blob being written in fixed-size chunks, resumable across crashes.

    ``data`` is written as bytes arrive; ``chunks`` holds one byte per chunk,
    set only after that chunk's bytes were fdatasync'd, so after a crash (even
    a power loss) every chunk marked done really is on disk. ``partial``
    (replaced whole, atomically) lists chunks of which only a leading part is
    durable: what :meth:`keep` saved when a transfer was interrupted, so the
    next one resumes inside the chunk instead of at its start (issue 10). The sha256 is computed
    over the prefix as it grows: from memory for bytes written right where the
    hash stands (a blob fetched in order), by reading back from the page cache
    for bytes written ahead of it, unless they went past the page cache
    (:meth:`bypass_cache`), held meanwhile by :mod:`.ahead` (a bounded amount,
    never a whole file).
    Each byte is written once per ingest (retries resume after what was
    written), so hashing bytes not yet durable is safe: the hash dies with
    the process, and a new one starts from the durable chunks.
    """

    def __init__(self, store: ContentStore, blob: Blob, chunk_size: int, lock_fd: int, lock_path: Path) -> None:
        self.store = store
        self.blob = blob
        self.chunk_size = chunk_size
        self.chunks = max(1, -(-blob.size // chunk_size))
        self._lock_fd = lock_fd
        self._lock_path = lock_path
        self.dir = store.ingest_dir / blob.hex
        self.dir.mkdir(exist_ok=True)
        self.data_path = self.dir / "data"
        self.fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._record_fd = os.open(self.dir / "chunks", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.done = self._load_record()
        # Chunk index -> leading bytes durable, for chunks not done (a record from before this file: none).
        self.kept = {i: n for i, n in read_partial(self.dir, blob.size, chunk_size).items() if not self.done[i]}
        self._partial_lock = threading.Lock()
        self._hash = hashlib.sha256()
        self._md5 = hashlib.md5(usedforsecurity=False) if blob.md5 else None
        self._git = _git_hash(blob)
        self._parts = MultipartEtag(blob.md5_parts[0]) if blob.md5_parts else None
        self._crc = S3Crc(blob.crc) if blob.crc else None
        # The scrubber's local checksum, in the same pass as the sha256 (None: see no_local_checksum).
        self._xxh3: Any = xxhash.xxh3_128()
        self.committed_as = blob.digest  # the stored digest (learnt at commit for unverified blobs)
        self._hashed = 0  # bytes of the prefix fed to the hash
        # Per chunk: bytes written contiguously from its start (all of a done chunk, the kept part of another).
        self._written = [self.chunk_range(i)[1] if d else self.kept.get(i, 0) for i, d in enumerate(self.done)]
        self._hash_lock = threading.Lock()
        self._direct: DirectWriter | None = None  # see bypass_cache
        self._bypassing = False
        self._ahead = Ahead()  # with _direct: bytes written ahead of the hash, held for it
        self._closed = False

    def _load_record(self) -> bytearray:
        header = _RECORD_HEADER.pack(_RECORD_MAGIC, self.blob.size, self.chunk_size)
        raw = os.pread(self._record_fd, _RECORD_HEADER.size + self.chunks, 0)
        if raw[: _RECORD_HEADER.size] == header and len(raw) == _RECORD_HEADER.size + self.chunks:
            return bytearray(raw[_RECORD_HEADER.size :])
        # No record, or one from another chunk size: start over.
        for name in ("partial", "partial.tmp"):
            (self.dir / name).unlink(missing_ok=True)
        os.ftruncate(self._record_fd, 0)
        os.pwrite(self._record_fd, header + bytes(self.chunks), 0)
        # Nothing is preallocated: a declared size is a claim, and the space
        # is taken as the bytes arrive (issue 10).
        os.ftruncate(self.fd, 0)
        os.fsync(self._record_fd)
        return bytearray(self.chunks)

    def chunk_range(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk ``index``."""
        start = index * self.chunk_size
        return start, min(self.chunk_size, self.blob.size - start)

    def missing(self) -> list[int]:
        """Indexes of chunks not yet durable (whole)."""
        return [i for i, d in enumerate(self.done) if not d]

    def resume_at(self, index: int) -> int:
        """Leading bytes of chunk ``index`` already durable (all of it once done): where its fetch resumes."""
        return self.chunk_range(index)[1] if self.done[index] else self.kept.get(index, 0)

    @property
    def bytes_done(self) -> int:
        """Bytes already durable: whole chunks, and the kept parts of others."""
        return sum(self.chunk_range(i)[1] for i, d in enumerate(self.done) if d) + sum(self.kept.values())

    def write(self, offset: int, data: bytes | memoryview | Sequence[bytes | memoryview]) -> None:
        """Write ``data`` (one buffer or several, in order) at ``offset``; no seek, no copy.

        Then the hash moves on: over bytes written earlier (read back from the
        page cache) up to this write, and over this write's own bytes from
        memory when it lands right where the hash stands, which is the usual
        case for a blob fetched in order. After :meth:`bypass_cache`, bytes
        hashed from memory go past the page cache, and so do bytes ahead of
        the hash as long as :mod:`.ahead` can hold them until the hash gets there.
        """
        buffers = [memoryview(data)] if isinstance(data, bytes | bytearray | memoryview) else \
            [memoryview(b) for b in data]
        size = sum(len(b) for b in buffers)
        in_order = held = False
        writer = self._direct if self._bypassing else None
        if writer is not None:
            with self._hash_lock:
                in_order = offset == self._hashed
                held = offset > self._hashed and self._ahead.reserve(size)
        try:
            # Bytes hashed from memory (now, or once the hash reaches them) are never read back.
            direct = writer.write(offset, buffers) if writer is not None and (in_order or held) else 0
            self._write_all(offset + direct, _skip(buffers, direct))
        except BaseException as e:
            if held:
                with self._hash_lock:
                    self._ahead.release(size)
            if isinstance(e, OSError) and e.errno in _NO_SPACE:
                raise self._out_of_space() from e
            raise
        with self._hash_lock:
            if held:
                self._ahead.put(offset, buffers)
            # Contiguous with what its chunk holds: extend it (across chunk ends, for a sequential stream).
            position, n = offset, size
            while n and position < self.blob.size:
                index = position // self.chunk_size
                start, length = self.chunk_range(index)
                if position != start + self._written[index]:
                    break
                step = min(n, length - self._written[index])
                self._written[index] += step
                position += step
                n -= step
            self._catch_up(until=offset)
            if offset == self._hashed:
                if held:
                    self._ahead.take(offset, size)
                for buffer in buffers:
                    self._feed(buffer[: max(0, self.blob.size - self._hashed)])

    def no_local_checksum(self) -> None:
        """Take no xxh3 of this blob's bytes (call before the first write): for a blob dropped once read,
        such as a layer streamed into its files, which no scrub will ever check (issue 13: a pass over
        every compressed byte for nothing). Its index row then has no xxh3, as a blob from before
        there was one: a scrub that did meet it would check its sha256."""
        self._xxh3 = None

    def bypass_cache(self, on: bool = True) -> None:
        """From now on, write bytes hashed from memory past the page cache (:mod:`.direct`): for a blob
        whose bytes nobody reads while it arrives (no peer served from it, no follower of its chunks).
        ``on=False``: through the page cache again, for bytes a follower will read back from disk."""
        if on and self._direct is None:
            self._direct = DirectWriter(self.data_path)
        self._bypassing = on

    def _write_all(self, offset: int, buffers: list[memoryview]) -> None:
        while buffers:
            batch = buffers[:_IOV_MAX]
            n = os.pwritev(self.fd, batch, offset)
            offset += n
            # Drop what was written (empty buffers too, or this never ends);
            # keep the tail of a partial buffer.
            while buffers and n >= len(buffers[0]):
                n -= len(buffers.pop(0))
            if n:
                buffers[0] = buffers[0][n:]

    def _out_of_space(self) -> NoSpace:
        """Give back the space of chunks not yet durable (they are fetched again on resume); the error."""
        for index, done in enumerate(self.done):
            if not done:
                start, length = self.chunk_range(index)
                kept = self.kept.get(index, 0)
                _punch_hole(self.fd, start + kept, length - kept)
        return self.store.no_space(f"blob {self.blob.digest[:19]}", self.blob.size - self.bytes_done)

    def _sync(self) -> None:
        """fdatasync the data file; a full disk is named as :meth:`_out_of_space` says."""
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            if e.errno in _NO_SPACE:
                raise self._out_of_space() from e
            raise

    def mark_done(self, index: int) -> None:
        """Make chunk ``index`` durable and record it; then extend the hash."""
        self._sync()
        os.pwrite(self._record_fd, b"\x01", _RECORD_HEADER.size + index)
        self.done[index] = 1
        self.kept.pop(index, None)  # the done flag says more; a stale entry in ``partial`` is ignored
        crash_point("chunk-recorded")
        with self._hash_lock:
            self._written[index] = self.chunk_range(index)[1]
            self._catch_up()

    def keep(self, index: int, length: int) -> None:
        """Make the first ``length`` bytes of chunk ``index`` durable and record them.

        What an interrupted transfer calls for a chunk it got only part of, so
        the next pull resumes after those bytes. They were written contiguously
        from the chunk's start (the engine resumes a chunk where it stopped), so
        the hash over them stays valid: a new writer hashes them from disk.
        """
        if length >= self.chunk_range(index)[1]:
            self.mark_done(index)
            return
        if self.done[index] or length <= self.kept.get(index, 0):
            return
        self._sync()
        with self._partial_lock:
            self.kept[index] = length
            entries = sorted((i, n) for i, n in self.kept.items() if not self.done[i])
            body = _RECORD_HEADER.pack(_PARTIAL_MAGIC, self.blob.size, self.chunk_size)
            body += b"".join(_PARTIAL_ENTRY.pack(i, n) for i, n in entries)
            tmp = self.dir / "partial.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.dir / "partial")  # a reader sees the old list or the new, never half

    def rewind(self, index: int) -> None:
        """Forget the bytes written into chunk ``index`` (not durable): they failed a check.

        If the running hash already took them in, it starts over; it catches
        up again from the page cache over what is written (only after a peer
        lied, so the cost of reading the prefix back is rare).
        """
        start, length = self.chunk_range(index)
        with self._hash_lock:
            self._written[index] = 0
            self._ahead.drop(start, start + length)
            if self._hashed > start:
                self._hash = hashlib.sha256()
                self._xxh3 = xxhash.xxh3_128() if self._xxh3 is not None else None
                self._md5 = hashlib.md5(usedforsecurity=False) if self.blob.md5 else None
                self._git = _git_hash(self.blob)
                self._parts = MultipartEtag(self.blob.md5_parts[0]) if self.blob.md5_parts else None
                self._crc = S3Crc(self.blob.crc) if self.blob.crc else None
                self._hashed = 0
                self._catch_up(until=start)

    def _feed(self, piece: bytes | memoryview) -> None:
        self._hash.update(piece)
        if self._xxh3 is not None:
            self._xxh3.update(piece)
        if self._md5 is not None:
            self._md5.update(piece)
        if self._git is not None:
            self._git.update(piece)
        if self._parts is not None:
            self._parts.update(piece)
        if self._crc is not None:
            self._crc.update(piece)
        self._hashed += len(piece)

    def _catch_up(self, until: int | None = None) -> None:
        """Hash written bytes from the page cache, from where the hash stands to ``until``
        (or as far as they go). Called with the hash lock held."""
        limit = self.blob.size if until is None else min(until, self.blob.size)
        while self._hashed < limit:
            index = self._hashed // self.chunk_size
            start, length = self.chunk_range(index)
            end = min(start + self._written[index], limit)
            while self._hashed < end:
                held = self._ahead.take(self._hashed, end - self._hashed)
                if held is not None:  # written ahead and held: from memory
                    for buffer in held:
                        self._feed(buffer)
                    continue
                stop = self._ahead.next_after(self._hashed) or end  # a read back stops at what is held
                block = os.pread(self.fd, min(_HASH_BLOCK, min(end, stop) - self._hashed), self._hashed)
                if not block:
                    raise InvalidContent(f"{self.blob.digest}: ingest data shorter than its record")
                self._feed(block)
            if self._written[index] < length:
                return

    def complete(self) -> bool:
        """True when every chunk is durable."""
        return all(self.done)

    def commit(self, leases: Sequence[str] = ()) -> None:
        """Verify the digest and link the blob into ``blobs/``, held by ``leases``; then clean up.

        On a digest mismatch the partial data is discarded (so the next try
        starts clean) and :class:`DigestMismatch` is raised.
        """
        if not self.complete():
            raise InvalidContent(f"{self.blob.digest}: commit before every chunk is done")
        # The hash covers blob.size bytes only: a write past the end (a source
        # that sent more than asked) must not ride along into blobs/.
        size = os.fstat(self.fd).st_size
        if size != self.blob.size:
            self.discard()
            raise DigestMismatch(f"blob {self.blob.digest} arrived as {size} bytes, expected {self.blob.size}")
        with self._hash_lock:
            self._catch_up()
        actual = "sha256:" + self._hash.hexdigest()
        if self._md5 is not None and self._md5.hexdigest() != self.blob.md5:
            self.discard()
            raise DigestMismatch(f"{self.blob.digest}: MD5 {self._md5.hexdigest()} differs from the origin's "
                                 f"{self.blob.md5}: refusing it")
        if self._git is not None and self._git.hexdigest() != self.blob.git_sha1:
            self.discard()
            raise DigestMismatch(f"{self.blob.digest}: git blob id {self._git.hexdigest()} differs from the "
                                 f"origin's {self.blob.git_sha1}: refusing it")
        if self._parts is not None and self.blob.md5_parts and self._parts.hexdigest() != self.blob.md5_parts[1]:
            self.discard()
            raise DigestMismatch(f"{self.blob.digest}: ETag {self._parts.hexdigest()} differs from the origin's "
                                 f"{self.blob.md5_parts[1]}: refusing it")
        if self._crc is not None and self.blob.crc and self._crc.value() != self.blob.crc.value:
            self.discard()
            raise DigestMismatch(f"{self.blob.digest}: {self.blob.crc.algorithm.upper()} {self._crc.value()} "
                                 f"differs from the origin's {self.blob.crc.value}: refusing it")
        if self.blob.verified and actual != self.blob.digest:
            self.discard()
            raise DigestMismatch(f"blob {self.blob.digest} arrived as {actual}: refusing it")
        crash_point("commit-verified")
        os.fsync(self.fd)
        xxh3 = self._xxh3.hexdigest() if self._xxh3 is not None else None
        self.store._link_into_place(self.data_path, actual, self.blob.size, leases, xxh3)
        self.committed_as = actual
        self.discard()

    def discard(self) -> None:
        """Drop the partial data and record, and release the lock."""
        for name in _INGEST_FILES:
            (self.dir / name).unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:
            pass
        self._lock_path.unlink(missing_ok=True)
        self.close()

    def close(self) -> None:
        """Release the lock, keeping partial data for a later resume."""
        if self._closed:
            return
        self._closed = True
        self._ahead.clear()
        if self._direct is not None:
            with contextlib.suppress(OSError):
                self._direct.close()
        for fd in (self.fd, self._record_fd, self._lock_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def _skip(buffers: list[memoryview], n: int) -> list[memoryview]:
    """``buffers`` without their first ``n`` bytes."""
    out = list(buffers)
    while n and out:
        if n >= len(out[0]):
            n -= len(out.pop(0))
        else:
            out[0], n = out[0][n:], 0
    return out


def read_partial(ingest: Path, size: int, chunk_size: int) -> dict[int, int]:
    """Chunk index -> leading bytes durable, from ``<ingest>/partial`` (empty if absent, or not for this
    blob size and chunk size; entries past a chunk's length are dropped)."""
    try:
        raw = (ingest / "partial").read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return {}
    if len(raw) < _RECORD_HEADER.size or _RECORD_HEADER.unpack_from(raw) != (_PARTIAL_MAGIC, size, chunk_size):
        return {}
    chunks = max(1, -(-size // chunk_size))
    kept = {}
    for at in range(_RECORD_HEADER.size, len(raw) - _PARTIAL_ENTRY.size + 1, _PARTIAL_ENTRY.size):
        index, n = _PARTIAL_ENTRY.unpack_from(raw, at)
        if index < chunks and 0 < n < min(chunk_size, size - index * chunk_size):
            kept[index] = n
    return kept


def hash_file(path: Path) -> str:
    """The sha256 digest of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return "sha256:" + h.hexdigest()


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 1, 2


@functools.cache
def _libc():
    """libc's fallocate, loaded on first use: find_library runs ``ldconfig`` (15 ms a process)."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return libc


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the blocks of a byte range (fallocate(2) PUNCH_HOLE); best effort, where supported."""
    if length > 0:
        _libc().fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)


_SYNC_THREADS = 16
_sync_pool: ThreadPoolExecutor | None = None
_sync_pool_lock = threading.Lock()


def _fsync_pool() -> ThreadPoolExecutor:
    global _sync_pool
    with _sync_pool_lock:
        if _sync_pool is None:
            _sync_pool = ThreadPoolExecutor(max_workers=_SYNC_THREADS, thread_name_prefix="mc-fsync")
        return _sync_pool


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _git_hash(blob: Blob) -> Any:
    """A sha1 primed as git hashes a blob object (``"blob <size>\\0"``), when the origin gave its id."""
    if not blob.git_sha1:
        return None
    h = hashlib.sha1(usedforsecurity=False)
    h.update(b"blob %d\0" % blob.size)
    return h
