"""Plain tar layers placed by range: each file straight from the network into its blob (issue 13).

An uncompressed image layer (umoci, skopeo, ``docker build``, KitOps,
modctl) is not fetched whole and then unpacked, which writes every byte
twice. Instead:

1. its header chain is walked at the origin with small range reads
   (:mod:`.sources.tarindex`), small members read along with the headers;
2. each bigger regular file is fetched by range out of the layer into its
   own blob by the transfer engine, in parallel chunks, resumable, through
   the pull's router, exactly as annotated single-file layers are. Its
   sha256 is not known before, so its blob is unverified: a stand-in digest
   named after (layer digest, offset, size) names the download, and the
   engine learns the real sha256 at commit; that is remembered in the
   index at once, so a pull interrupted after some files does not fetch
   them again;
3. the layer's own digest is checked over its bytes in order: the bytes the
   walk read, and each file's bytes read back (page cache, read-only, in a
   thread) as its chunks become durable, so the check runs beside the
   download instead of after it; the bytes read back must have the xxh3 the
   file's blob was committed with, else the layer is read back again from
   the committed blobs. On a mismatch nothing is recorded, what was learnt
   for the layer's files is forgotten, and the pull fails with
   :class:`DigestMismatch`;
4. only then are its rows made, by the same :class:`Listing` that
   unpacking uses (the same refusals and size limit), small files written
   from memory, and the listing recorded, so a warm pull skips the layer.

A layer the walk does not take (:class:`Unwalkable`: too many members or
reads for its size, sparse files, anything unusual, an origin that ignores
ranges) is read as one stream instead: :func:`place` returns None.

Peers: file blobs go through the pull's router like any other; having no
sha256 before download, a peer router sends them to the origin.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import io
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import xxhash

from .errors import DigestMismatch, NotFound, RangeIgnored
from .model import Archive, Blob, Compression
from .sources.base import ByteSource
from .sources.tarindex import Entry, TarIndex, Unwalkable, walk
from .store import Store
from .store.crash import crash_point
from .store.direct import anonymous_buffer, pread_into
from .store.store import UNPACK_FLOOR, UNPACK_RATIO
from .store.unpack import Listing, Row
from .transfer import ChunkRouter, Engine, OriginOnly, TransferStats
from .transfer.stats import Progress

log = logging.getLogger(__name__)

RANGED_MIN = 1 << 20  # a smaller layer comes in one request; a walk would only add round trips
_READ_BLOCK = 4 << 20
_FOLLOW_STEP = 64 << 20  # bytes hashed per trip to a thread while following a file in
_FOLLOW_POLL = 0.05  # seconds between looks at a file's durable chunks when none was new


def by_range(archive: Archive) -> bool:
    """Whether ``archive`` is tried by range: a plain tar of at least :data:`RANGED_MIN` bytes."""
    return archive.compression is Compression.NONE and archive.blob.size >= RANGED_MIN


async def place(store: Store, engine: Engine, archive: Archive, router: ChunkRouter, stats: TransferStats,
                leases: Sequence[str], progress: Progress | None = None) -> list[Row] | None:
    """Place the layer's files by range, check its digest, record its listing; None: read it as one stream.

    The caller holds the layer's unpack lock and found no listing recorded.
    """
    layer = archive.blob
    index = await _walk(engine, layer, router, stats)
    if index is None:
        return None
    ranged = index.ranged()
    keys = {e.offset: f"tar:{layer.digest}@{e.offset}+{e.member.size}" for e in ranged}
    digests = await asyncio.to_thread(_already_here, store, keys, leases)
    files = WithinLayer(router)
    todo = []
    for entry in ranged:
        if entry.offset not in digests:
            standin = "sha256:" + hashlib.sha256(keys[entry.offset].encode()).hexdigest()
            blob = Blob(standin, entry.member.size, verified=False)
            files.add(blob, layer, entry.offset)
            todo.append((entry.offset, blob))
    committed = {e.offset: asyncio.Event() for e in ranged}  # set once a file's blob is here
    for offset in digests:
        committed[offset].set()

    async def fetch(offset: int, blob: Blob) -> None:
        await engine.fetch([blob], files, stats=stats, progress=progress, leases=leases)
        digest = stats.learned.get(blob.digest) or engine.learned[blob.digest]
        # Learnt now (a pull killed before the layer is checked skips this file next time); the check
        # below still reads it back, and forgets it if the layer does not add up.
        await asyncio.to_thread(store.index.learn_digest, keys[offset], digest, blob.size)
        digests[offset] = digest
        committed[offset].set()

    tasks = [asyncio.create_task(fetch(offset, blob)) for offset, blob in todo]
    follower = asyncio.create_task(_follow(store, layer, index, dict(todo), digests, committed,
                                           direct=files.bypass_cache))
    try:
        await asyncio.gather(*tasks)
        actual = await follower
    except BaseException:
        for task in [*tasks, follower]:
            task.cancel()
        await asyncio.gather(*tasks, follower, return_exceptions=True)
        raise
    if actual is None:  # what the follower read cannot be vouched for: read the layer back whole
        actual = await asyncio.to_thread(_layer_digest, store, index, digests)
    if actual != layer.digest:
        await asyncio.to_thread(store.index.forget_learned, keys.values())
        raise DigestMismatch(f"layer {layer.digest} read by range arrived as {actual}: refusing it")
    rows = await asyncio.to_thread(_record, store, archive, index, digests, leases)
    log.info("layer %s: %d files by range, %d with its %d header reads", layer.digest[:19], len(ranged),
             sum(1 for e in index.entries if e.inline and e.member.isreg()), index.requests)
    return rows


async def _walk(engine: Engine, layer: Blob, router: ChunkRouter, stats: TransferStats) -> TarIndex | None:
    """The layer's index, read at the origin (the router's last source); None when it is not walked."""
    origin = router.sources(layer, 0)[-1]
    walker = walk(layer.size)

    async def read(offset: int, length: int) -> bytes:
        async def once() -> bytes:
            out = bytearray()
            try:
                async for piece in origin.read(layer, offset, length):
                    out += piece
            except RangeIgnored as e:
                raise Unwalkable(str(e)) from e
            return bytes(out)

        data = await engine.retry(f"reading the headers of {layer.digest[:19]}", once)
        stats.bytes_total += len(data)
        stats.bytes_done += len(data)
        stats.bytes_fetched += len(data)
        stats.fetched_by_source[origin.name] = stats.fetched_by_source.get(origin.name, 0) + len(data)
        return data

    try:
        want = next(walker)
        while True:
            want = walker.send(await read(*want))
    except StopIteration as done:
        index: TarIndex = done.value
        return index
    except Unwalkable as e:
        log.info("layer %s is read as one stream: %s", layer.digest[:19], e)
        return None


def _already_here(store: Store, keys: dict[int, str], leases: Sequence[str]) -> dict[int, str]:
    """Files of the layer learnt by an earlier pull and still here, held by ``leases`` (checked once held)."""
    known = {offset: d for offset, key in keys.items() if (d := store.index.learned_digest(key))}
    for lease in leases:
        store.index.hold(lease, blobs=list(known.values()))
    return {offset: d for offset, d in known.items() if store.content.has(d)}


async def _follow(store: Store, layer: Blob, index: TarIndex, fetching: dict[int, Blob],
                  digests: dict[int, str], committed: dict[int, asyncio.Event], *, direct: bool = False) -> str | None:
    """The layer's sha256 taken in order while its files arrive, so it costs no time after the last one.

    Each file's bytes are read (in a thread) from its ingest's chunks as they
    become durable (:meth:`ContentStore.read_durable_into`), the rest from its
    blob once committed: past the page cache with ``direct`` (the engine wrote
    them past it), else through it. The xxh3 of the bytes read must then
    be the one its blob was committed with, or the result is None (a fetch
    that started over, say) and the caller reads the layer back whole.
    """
    h = hashlib.sha256()
    for piece in index.pieces():
        if isinstance(piece, bytes):
            h.update(piece)
            continue
        x = xxhash.xxh3_128()
        position, size = 0, piece.member.size
        while position < size:
            digest = digests.get(piece.offset)
            if digest is not None:  # committed (or here before): the rest from its blob
                position += await asyncio.to_thread(_hash_blob, store, digest, position, h, x, direct)
                break
            got = await asyncio.to_thread(_hash_durable, store, fetching[piece.offset], position, h, x, direct)
            position += got
            if not got:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(committed[piece.offset].wait(), _FOLLOW_POLL)
        await committed[piece.offset].wait()  # read whole before its commit ended: it ends in a moment
        digest = digests[piece.offset]
        if position != size or await asyncio.to_thread(store.index.blob_xxh3, digest) != x.hexdigest():
            log.info("layer %s: the file at %d changed under the running hash; reading the layer back",
                     layer.digest[:19], piece.offset)
            return None
    return "sha256:" + h.hexdigest()


def _hash_durable(store: Store, blob: Blob, position: int, h: Any, x: Any, direct: bool) -> int:
    """Hash the durable bytes of ``blob``'s ingest from ``position`` (up to 64 MiB); return how many."""

    def read(offset: int, buffer: Any) -> int:
        n = min(_READ_BLOCK, blob.size - offset)
        if n <= 0:
            return 0
        try:
            got = store.content.read_durable_into(blob.digest, offset, n, buffer, direct=direct)
        except (NotFound, OSError):  # not durable yet, or just committed (the ingest is gone)
            return 0
        return n if got == n else 0  # a short read: not durable that far yet

    return _hash_reads(read, position, h, x, most=_FOLLOW_STEP)


def _hash_blob(store: Store, digest: str, position: int, h: Any, x: Any, direct: bool) -> int:
    """Hash a committed blob from ``position`` to its end; return how many bytes."""
    path = store.content.path(digest)
    return _hash_reads(lambda offset, buffer: pread_into(path, offset, buffer, _READ_BLOCK, direct=direct),
                       position, h, x)


def _hash_reads(read: Callable[[int, Any], int], position: int, h: Any, x: Any, *, most: int | None = None) -> int:
    """Feed ``h`` and ``x`` what ``read(offset, buffer)`` puts in a page-aligned buffer (it returns how
    many bytes, 0 to stop), from ``position`` on, until it stops or ``most`` bytes were read; return how many."""
    buffer = anonymous_buffer(_READ_BLOCK)  # page-aligned, as reads past the page cache need
    view = memoryview(buffer)
    done = 0
    try:
        while most is None or done < most:
            n = read(position + done, buffer)
            if not n:
                break
            h.update(view[:n])
            x.update(view[:n])
            done += n
    finally:
        view.release()
        buffer.close()
    return done


def _layer_digest(store: Store, index: TarIndex, digests: dict[int, str]) -> str:
    """The sha256 of the layer as placed: the bytes read, and each file read back from its blob, in order."""
    h = hashlib.sha256()
    buffer = bytearray(_READ_BLOCK)
    view = memoryview(buffer)
    for piece in index.pieces():
        if isinstance(piece, bytes):
            h.update(piece)
            continue
        with open(store.content.path(digests[piece.offset]), "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                h.update(view[:n])
    return "sha256:" + h.hexdigest()


def _record(store: Store, archive: Archive, index: TarIndex, digests: dict[int, str],
            leases: Sequence[str]) -> list[Row]:
    """The layer's rows (small files written from memory now), recorded in the index."""
    layer = archive.blob
    listing = Listing(layer.digest, max(UNPACK_FLOOR, UNPACK_RATIO * layer.size))

    def write(entry: Entry) -> tuple[str, int]:
        if not entry.inline:  # fetched by range, the layer's digest checked over it
            return digests[entry.offset], entry.member.size
        data = index.data(entry)
        return store.content.write_stream(io.BytesIO(data), expected_size=len(data), leases=leases)

    for entry in index.entries:
        listing.add(entry.member, functools.partial(write, entry))
    store.index.put_layer(layer.digest, listing.rows)
    crash_point("layer-recorded")
    return listing.rows


class WithinLayer:
    """A router for files read by range out of a layer: each chunk goes where the pull's router sends it,
    translated into the layer's bytes."""

    def __init__(self, router: ChunkRouter) -> None:
        self._router = router
        self._spans: dict[str, tuple[Blob, int]] = {}
        # From the origin alone, the files may go past the page cache: the follower reads them back past it too.
        self.bypass_cache = isinstance(router, OriginOnly)

    def add(self, blob: Blob, layer: Blob, offset: int) -> None:
        """``blob``'s bytes start at ``offset`` in ``layer``."""
        self._spans[blob.digest] = (layer, offset)

    def sources(self, blob: Blob, chunk: int) -> Sequence[ByteSource]:
        """The pull's router's sources for the chunk, reading inside the layer."""
        inner = self._router.sources(blob, chunk)
        span = self._spans.get(blob.digest)
        return inner if span is None else [_InLayer(s, *span) for s in inner]


class _InLayer:
    """One source, reading a file's range at its offset inside the layer."""

    def __init__(self, source: ByteSource, layer: Blob, base: int) -> None:
        self.name = source.name
        self.trusted = getattr(source, "trusted", True)
        self.attempts = getattr(source, "attempts", None)
        self._source, self._layer, self._base = source, layer, base

    def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes | memoryview]:
        """Bytes ``[offset, offset + length)`` of the file, from the layer."""
        return self._source.read(self._layer, self._base + offset, length)
