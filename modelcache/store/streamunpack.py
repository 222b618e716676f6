"""Unpacking a tar layer (plain, gzip or zstd) while it downloads: one stream, no second copy read later.

Issue 13: a layer used to be fetched whole, then unpacked in a thread, then
dropped. Here one sequential stream per layer comes from the origin (a range
from the first byte not yet durable), and two things happen as it arrives:

- the compressed bytes go into the layer's ingest (``ingest/<hex>/``, chunk
  by chunk, each made durable and recorded as for any blob), hashed in order
  on the way, so the layer digest is checked over exactly the bytes unpacked;
- a thread takes the same bytes as soon as they are written, inflates them
  and parses the tar, writing each regular file straight into its own blob
  (:func:`~.unpack.unpack_stream`: the same safety rules and size limit as
  unpacking a stored layer). It takes them from the network's own buffers
  while they are still in memory (:data:`WINDOW` bytes at most per layer, no
  copy): the stream waits for it rather than run further ahead (up to
  :data:`STALL` seconds per write). It reads them back from the ingest only
  where it stalled longer than that, or for the durable prefix of a resumed
  pull. Bytes that fit the window are written past the page cache
  (:mod:`.direct`: nobody reads them back, and a buffered write cost about
  1 CPU s per GiB); bytes beyond it, through it, where the reader finds them.

The listing is recorded (so a warm pull skips the layer) only after the
layer's digest matched; a mismatch discards the ingest and records nothing
(the files already stored are named by their own sha256 and held only by the
pull's lease, so gc takes them), and the layer is streamed once more, as the
engine fetches a blob once more. An error in the tar (unsafe path, too big)
is reported only once the digest is known to be right, so a byte damaged in
transit is a retry, not a verdict on the layer.

Resume: a pull killed midway leaves the durable chunks of the compressed
layer in its ingest; the next one inflates that prefix again from disk and
asks the origin only for the rest. Files committed before the kill are found
again by digest (stored once). The compressed blob is dropped once its
listing is recorded, as :meth:`~.store.Store.unpack` drops it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence

from ..errors import DigestMismatch
from ..model import Archive
from ..sources.base import ByteSource
from ..transfer.engine import Engine
from ..transfer.stats import Progress, TransferStats
from .inflate import READ_SIZE
from .roles import Ingest
from .store import Store, unpack_limit
from .unpack import Row, unpack_stream

log = logging.getLogger(__name__)

ROUNDS = 2  # a layer whose digest fails is streamed once more; twice wrong, the error stands
# Bytes written and not yet unpacked, kept in memory for the unpacking thread (the network's
# buffers, by reference): reading them back from the page cache cost 0.2 CPU s/GiB (measured), in
# the thread that is the pull's critical path, and writing them through it 0.5 more.
WINDOW = 16 << 20
# How long a write waits for the reader to make room in the window before it goes on without it
# (through the page cache, read back later). The reader is the slower side whenever the CPU is the
# limit, so without the wait the window overflowed at once and stayed overflowed: every compressed
# byte was written through the cache and read back (measured: 1.2 of 4.7 CPU s per GiB). Waiting
# holds the stream to the reader's pace (the origin is paced by TCP); the bound keeps a reader
# that stalls (its files' commit on a slow disk) from holding the stream for long. A reader behind
# the window (the durable prefix of a resumed pull, read back) is not waited for at all: the
# stream goes on beside it, as the network may well be the slower side then.
STALL = 2.0


async def stream_layer(store: Store, engine: Engine, archive: Archive, origin: ByteSource,
                       stats: TransferStats, leases: Sequence[str] = (), progress: Progress | None = None) -> list[Row]:
    """Stream ``archive`` from ``origin`` into its files, record its listing, drop its bytes; return its rows.

    The caller holds the layer's unpack lock and found no listing for it.
    """
    stats.bytes_total += archive.blob.size
    for round_ in range(1, ROUNDS + 1):
        ingest = await store.content.open_ingest(archive.blob, engine.config.chunk_size)
        if ingest is None:  # committed whole already (fetched as a file, or a crash before it was dropped)
            stats.bytes_done += archive.blob.size
            stats.bytes_reused += archive.blob.size
            return await asyncio.to_thread(store.unpack, archive, leases=tuple(leases))
        ingest.no_local_checksum()  # the layer's bytes are dropped once unpacked: no scrub will check them
        try:
            rows = await _stream_once(store, engine, archive, origin, ingest, stats, leases, progress)
        except DigestMismatch as e:
            stats.bytes_done -= archive.blob.size  # the ingest was discarded: none of it counts any more
            if round_ == ROUNDS:
                raise DigestMismatch(f"{e} (fetched twice)") from e
            log.info("%s; streaming it again", e)
            continue
        finally:
            ingest.close()
        return await asyncio.to_thread(store.record_layer, archive, rows)
    raise AssertionError("unreachable")


async def _stream_once(store: Store, engine: Engine, archive: Archive, origin: ByteSource, ingest: Ingest,
                       stats: TransferStats, leases: Sequence[str], progress: Progress | None) -> list[Row]:
    """One pass: the network into the ingest, the ingest into files; commit (digest check) at the end."""
    followed = _Followed(ingest)
    resumed = ingest.bytes_done
    stats.bytes_done += resumed
    stats.bytes_reused += resumed
    path = store.content.ingest_dir / archive.blob.hex / "data"
    unpacked = _in_thread(lambda: _unpack_following(store, archive, path, followed, leases))
    try:
        await engine.stream(followed, origin, stats, progress)
    except BaseException:
        followed.stop()
        await asyncio.wait([unpacked])  # its error, if any, is only the stop's echo
        if not unpacked.cancelled():
            unpacked.exception()
        raise
    followed.stop()  # every byte is written: the reader runs to the end of what it needs, then stops
    await asyncio.wait([unpacked])
    try:
        # The digest first: damaged bytes explain any error in the tar, and are fetched again.
        await asyncio.to_thread(ingest.commit, tuple(leases))
    except BaseException:
        if not unpacked.cancelled():
            unpacked.exception()  # retrieved: the digest's verdict is the one that stands
        raise
    return unpacked.result()


def _unpack_following(store: Store, archive: Archive, path: os.PathLike[str], followed: _Followed,
                      leases: Sequence[str]) -> list[Row]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        followed.forget()  # a writer waiting for room goes on
        raise
    try:
        return unpack_stream(store.content, followed.read_along(fd), archive.compression, name=archive.blob.digest,
                             leases=leases, limit=unpack_limit(archive))
    finally:
        followed.forget()  # the network's buffers go back to their pool
        os.close(fd)


def _in_thread(fn) -> asyncio.Future[list[Row]]:
    """``fn()`` in a thread of its own (it runs as long as the layer streams: never in a shared pool)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[list[Row]] = loop.create_future()

    def settle(result: list[Row] | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result or [])

    def run() -> None:
        try:
            result = fn()
        except BaseException as e:  # handed to the loop, raised where the future is awaited
            loop.call_soon_threadsafe(settle, None, e)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name="mc-unpack", daemon=True).start()
    return future


class _Stopped(Exception):
    """The stream feeding a reader ended before the reader was done."""


class _Followed:
    """An :class:`Ingest` that tells a reader how far its bytes are written from byte 0 on.

    ``end`` is the length of the prefix written without gaps: it starts at
    what is durable from byte 0 (whole chunks, then the kept part of the
    next), moves with each write that lands on it, and jumps over chunks
    that were durable already. Readers wait on it in :meth:`wait`.

    The last :data:`WINDOW` bytes written at ``end`` are also kept in
    memory, as the writer's own buffers (a source never reuses a buffer
    still referenced, as the transfer engine relies on too), until the
    reader of :meth:`read_along` is past them: it takes them with no copy
    and no system call, and reads from disk only what fell out of the window.
    A write that finds the window full while the reader takes its bytes from
    it waits for the reader to make room (:data:`STALL` seconds at most).
    Bytes written while the window has room for them go past the page cache
    (the ingest's ``bypass_cache``); the others through it.
    """

    def __init__(self, ingest: Ingest) -> None:
        self._ingest = ingest
        self.blob = ingest.blob
        self.chunks = ingest.chunks
        self.committed_as = ingest.committed_as
        self._cond = threading.Condition()
        self._stopped = False
        self.end = 0
        self._window: deque[tuple[int, memoryview]] = deque()  # (offset, bytes written there), in order
        self._window_bytes = 0
        self._read_at = 0  # where the reader stands
        self._keeping = True  # until the reader is done (forget)
        # Optional (a store may always write through its cache): see write.
        self._bypass: Callable[[bool], None] | None = getattr(ingest, "bypass_cache", None)
        self._skip_done()

    def _skip_done(self) -> None:
        """Move ``end`` over bytes durable already (done chunks, kept prefixes) from where it stands."""
        chunk = max(1, self._ingest.chunk_range(0)[1])
        while self.end < self.blob.size:
            index = self.end // chunk
            durable = self._ingest.chunk_range(index)[0] + self._ingest.resume_at(index)
            if durable <= self.end:
                return
            self.end = durable

    def wait(self, position: int) -> int:
        """Block until bytes past ``position`` are written; return the end of the written prefix.
        Raises :class:`_Stopped` if the stream ended without them."""
        with self._cond:
            self._drop_before(position)  # the reader is past them: room for a writer waiting on it
            while self.end <= position and not self._stopped:
                self._cond.wait()
            if self.end <= position:
                raise _Stopped(f"the stream of {self.blob.digest[:19]} ended at byte {self.end}")
            return self.end

    def stop(self) -> None:
        """No more bytes will come: readers waiting past the end give up."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def read_along(self, fd: int) -> Iterator[bytes | memoryview]:
        """The blob's bytes from byte 0, as they are written (blocks): from memory while the window holds
        them, else read from ``fd`` (the ingest's data). Raises :class:`_Stopped` if the stream ends first."""
        at = 0
        while at < self.blob.size:
            end = self.wait(at)
            taken = self._take(at, min(READ_SIZE, end - at))
            got = os.pread(fd, taken, at) if isinstance(taken, int) else taken
            if not got:
                raise _Stopped(f"ingest data of {self.blob.digest[:19]} shorter than written")
            at += len(got)
            yield got

    def _take(self, position: int, most: int) -> memoryview | int:
        """Up to ``most`` bytes at ``position`` from the window; else how many to read from disk there
        (up to where the window starts). Drops what lies before ``position``: the reader is past it."""
        with self._cond:
            self._drop_before(position)
            if not self._window:
                return most
            start, view = self._window[0]
            if start > position:
                return min(most, start - position)
            return view[position - start: position - start + most]

    def _drop_before(self, position: int) -> None:
        """Let go of the window's bytes before ``position`` (the reader is past them); wake a writer
        waiting for room. The caller holds ``_cond``."""
        self._read_at = max(self._read_at, position)
        dropped = False
        while self._window and self._window[0][0] + len(self._window[0][1]) <= position:
            self._window_bytes -= len(self._window.popleft()[1])
            dropped = True
        if dropped:
            self._cond.notify_all()

    def _room(self, offset: int, n: int) -> bool:
        """Whether ``n`` bytes written at ``offset`` would be kept in the window. The caller holds ``_cond``."""
        return offset == self.end and self._keeping and (not self._window or self._window_bytes + n <= WINDOW)

    def forget(self) -> None:
        """The reader is done: keep nothing more in memory."""
        with self._cond:
            self._keeping = False
            self._window.clear()
            self._window_bytes = 0
            self._cond.notify_all()  # a writer waiting for room goes on

    # -- the Ingest protocol, passed through ------------------------------------------------

    @property
    def bytes_done(self) -> int:
        return self._ingest.bytes_done

    def chunk_range(self, index: int) -> tuple[int, int]:
        return self._ingest.chunk_range(index)

    def missing(self) -> list[int]:
        return self._ingest.missing()

    def resume_at(self, index: int) -> int:
        return self._ingest.resume_at(index)

    def write(self, offset: int, data: bytes | memoryview | Sequence[bytes | memoryview]) -> None:
        pieces = [data] if isinstance(data, bytes | bytearray | memoryview) else data
        n = sum(len(d) for d in pieces)
        owned = not any(isinstance(piece, bytearray) for piece in pieces)  # see the window, below
        with self._cond:
            following = bool(self._window) and self._read_at >= self._window[0][0]  # from memory, not disk
            if owned and following and not self._room(offset, n):
                # The reader is the slower side: wait for it rather than write bytes it must read back.
                self._cond.wait_for(lambda: self._room(offset, n) or not self._keeping or offset != self.end, STALL)
            # Bytes the reader will take from the window are never read back: past the page cache
            # with them. If it lags (the window full), bytes go through the cache, where it finds them.
            from_memory = owned and self._room(offset, n)
        if self._bypass is not None:
            self._bypass(from_memory)
        self._ingest.write(offset, data)
        with self._cond:
            if offset == self.end and self._keeping:
                at = offset
                for piece in pieces:
                    if isinstance(piece, bytearray):
                        break  # a buffer its owner may change: the rest is read back from disk
                    self._window.append((at, memoryview(piece)))
                    self._window_bytes += len(piece)
                    at += len(piece)
                while self._window_bytes > WINDOW:  # the reader fell behind: it reads these back from disk
                    self._window_bytes -= len(self._window.popleft()[1])
            if offset <= self.end < offset + n:
                self.end = offset + n
                self._skip_done()
                self._cond.notify_all()

    def mark_done(self, index: int) -> None:
        self._ingest.mark_done(index)

    def keep(self, index: int, length: int) -> None:
        self._ingest.keep(index, length)

    def rewind(self, index: int) -> None:
        self._ingest.rewind(index)
        with self._cond:  # those bytes failed a check: never hand them out from memory
            self._window.clear()
            self._window_bytes = 0

    def complete(self) -> bool:
        return self._ingest.complete()

    def commit(self, leases: Sequence[str] = ()) -> None:
        self._ingest.commit(leases)
        self.committed_as = self._ingest.committed_as

    def close(self) -> None:
        self._ingest.close()
