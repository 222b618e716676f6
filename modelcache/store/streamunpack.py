"""Unpacking a tar layer (plain, gzip or zstd) while it downloads: one stream, no second copy read later.

Issue 13: a layer used to be fetched whole, then unpacked in a thread, then
dropped. Here one sequential stream per layer comes from the origin (a range
from the first byte not yet durable), and two things happen as it arrives:

- the compressed bytes go into the layer's ingest (``ingest/<hex>/``, chunk
  by chunk, each made durable and recorded as for any blob), hashed in order
  on the way, so the layer digest is checked over exactly the bytes unpacked;
- a thread reads the same bytes back (from the page cache) as soon as they
  are written, inflates them and parses the tar, writing each regular file
  straight into its own blob (:func:`~.unpack.unpack_stream`: the same
  safety rules and size limit as unpacking a stored layer).

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
import io
import logging
import os
import threading
from collections.abc import Sequence
from typing import IO, cast

from ..errors import DigestMismatch
from ..model import Archive
from ..sources.base import ByteSource
from ..transfer.engine import Engine, Progress, TransferStats
from .roles import Ingest
from .store import Store, unpack_limit
from .unpack import Row, unpack_stream

log = logging.getLogger(__name__)

ROUNDS = 2  # a layer whose digest fails is streamed once more; twice wrong, the error stands


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
    with _Tail(path, followed) as raw:
        return unpack_stream(store.content, cast(IO[bytes], raw), archive.compression, name=archive.blob.digest,
                             leases=leases, limit=unpack_limit(archive))


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
    """

    def __init__(self, ingest: Ingest) -> None:
        self._ingest = ingest
        self.blob = ingest.blob
        self.chunks = ingest.chunks
        self.committed_as = ingest.committed_as
        self._cond = threading.Condition()
        self._stopped = False
        self.end = 0
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
        self._ingest.write(offset, data)
        n = len(data) if isinstance(data, bytes | bytearray | memoryview) else sum(len(d) for d in data)
        with self._cond:
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

    def complete(self) -> bool:
        return self._ingest.complete()

    def commit(self, leases: Sequence[str] = ()) -> None:
        self._ingest.commit(leases)
        self.committed_as = self._ingest.committed_as

    def close(self) -> None:
        self._ingest.close()


class _Tail(io.RawIOBase):
    """A file reading an ingest's data from byte 0 as it is written (see :class:`_Followed`); blocks."""

    def __init__(self, path: os.PathLike[str], followed: _Followed) -> None:
        super().__init__()
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._followed = followed
        self._size = followed.blob.size
        self._at = 0

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        """Fill ``buffer`` with the next bytes written (at least one; 0 at the blob's end)."""
        if self._at >= self._size or not len(buffer):
            return 0
        end = self._followed.wait(self._at)
        view = memoryview(buffer).cast("B")[: end - self._at]
        n = os.preadv(self._fd, [view], self._at)
        if not n:
            raise _Stopped(f"ingest data of {self._followed.blob.digest[:19]} shorter than written")
        self._at += n
        return n
