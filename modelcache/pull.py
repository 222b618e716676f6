"""Pulling a model: resolve, fetch missing blobs, unpack layers, build the view.

This is the one place that strings sources, the transfer engine and the store
together; the CLI and the daemon both call :func:`pull`.

A pull holds a lease (kind ``pull``, tied to this process) from before it
resolves until its view is recorded: the blobs it needs are held before it
looks whether they are present, blobs it commits or unpacks are held from
the moment they are linked, and its view is held before its tree is built,
so no gc, budget or ``verify --delete`` beside it can take them. A caller
may bring its own lease instead and drop it itself: that lease still holds
the view when :func:`pull` returns (a warm hit's view too), so the daemon
can lease it for the mounts waiting on the pull before letting go.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from .errors import NotFound
from .model import Archive, FileEntry, Model
from .refs import S3Ref, parse
from .sources import SourceOptions, open_source
from .sources.base import ByteSource
from .store import Store, liveness
from .store.crash import crash_point
from .transfer import ChunkRouter, Engine, OriginOnly, TransferStats
from .transfer.routing import WithinOrigin
from .transfer.stats import Progress
from .tree import Filters, Node, overlay

if TYPE_CHECKING:  # the rest is imported where a pull fetches or unpacks: a warm hit needs none of it
    from .store.budget import Budget
    from .store.unpack import Row

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PullResult:
    """What a pull produced."""

    ref: str
    model_digest: str
    path: Path
    files: int
    size: int
    stats: TransferStats
    seconds: float


@dataclass(slots=True)
class EarlyStart:
    """Blobs handed to the engine while the listing was still coming in (issue 13), and their fetches."""

    stats: TransferStats = field(default_factory=TransferStats)
    digests: set[str] = field(default_factory=set)
    tasks: list[asyncio.Future[TransferStats]] = field(default_factory=list)
    reserved: int = 0  # bytes reserved for them so far (the budget's reservation grows page by page)

    async def stop(self) -> None:
        """Cancel the fetches still running (each keeps what arrived) and wait for them."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class _Lister(Protocol):
    """A source whose resolve hands over the files of each listing page as it arrives (S3)."""

    async def resolve(self, *, early: Callable[[list[FileEntry]], Awaitable[None]] | None = None) -> Model: ...


async def pull(store: Store, engine: Engine, ref_text: str, *, filters: Filters | None = None,
               options: SourceOptions | None = None, progress: Progress | None = None,
               tag: str | None = None, owner: str = "cli", budget: Budget | None = None,
               routing: Callable[[ByteSource], ChunkRouter] | None = None, lease: str | None = None,
               drops_later: bool = False) -> PullResult:
    """Pull ``ref_text`` into ``store``; return where its read-only tree is.

    ``tag`` picks an image in an OCI layout held in an S3 prefix. ``owner``
    names the pull's lease; ``budget`` reserves its space before it fetches.
    ``lease``: one the caller took (kind ``pull``, its process) and drops
    itself, which still holds the view when this returns; default: the
    pull's own, dropped before it returns.
    ``routing`` wraps the origin in a router (peers first); default: the origin only.
    The layers it drops once unpacked are unlinked in the background, and
    waited for before it returns; with ``drops_later`` the caller decides
    (:meth:`ContentStore.delete_deferred`).
    The manifest is always resolved at the origin first, with this pull's own
    credentials: peers are asked only for blobs of a model we were given.

    A warm hit (issue 13) ends there: when this reference and filters were
    last recorded as a view of this very manifest (the model digest just
    resolved) and the view's tree is in place, that view is marked used and
    returned; nothing is fetched or rebuilt (:meth:`Index.use_view`), and only
    a caller's ``lease`` holds it (taken in the same transaction).
    """
    started = time.monotonic()
    ref = parse(ref_text)
    if tag and isinstance(ref, S3Ref):
        ref = dataclasses.replace(ref, tag=tag)
    source = open_source(ref, options or SourceOptions(), learned=store.index.learned_digest)
    own = lease is None
    if lease is None:  # (not ``own``: the type checker narrows on the lease itself)
        lease = f"pull:{owner}:{secrets.token_hex(8)}"
        await asyncio.to_thread(store.index.add_lease, lease, kind="pull", owner=owner, process=liveness.me())
    chosen = filters or Filters()
    resolve: Callable[[], Awaitable[Model]] = source.resolve
    early: EarlyStart | None = None
    router: ChunkRouter | None = None
    if isinstance(ref, S3Ref):
        # A bucket's listing comes a page (1000 keys) at a time: each page's files start fetching
        # at once, instead of after the last page (issue 13). The router is the origin's, as below.
        router = routing(source) if routing is not None else OriginOnly(source)
        early = EarlyStart()
        start = functools.partial(_fetch_early, store, engine, early, router, chosen, lease, budget, progress)
        lister: _Lister = source  # type: ignore[assignment]  # S3Source, opened for an S3Ref
        resolve = functools.partial(lister.resolve, early=start)
    try:
        crash_point("pull-leased")
        with engine.resolving():  # peers asking us for its pieces wait a moment instead of being sent away
            model = await engine.retry(f"resolving {ref}", resolve)
            crash_point("resolved")
            # Private or not, as this pull found it (KEP-2535: warm mounts of private models are checked).
            needed = bool(getattr(source, "needed_credentials", False))
            # Looked up while still resolving(): past it nothing awaits until wanting() below, so a peer
            # asking for this model's pieces is never sent away in between.
            hit = await asyncio.to_thread(store.index.use_view, model.ref, chosen.key(),
                                          lambda view: store.view_path(view).is_dir(), model_digest=model.digest,
                                          needed_credentials=needed, lease=None if own else lease)
        if hit is not None:
            view, size, files = hit
            return PullResult(ref=model.ref, model_digest=model.digest, path=store.view_path(view), files=files,
                              size=size, stats=TransferStats(), seconds=time.monotonic() - started)
        spans = {p.blob.digest: (p.origin, p.offset) for p in model.parts
                 if isinstance(p, FileEntry) and p.origin is not None}
        if router is None or spans:
            origin = WithinOrigin(source, spans) if spans else source
            router = routing(origin) if routing is not None else OriginOnly(origin)
        with engine.wanting(p.blob.digest for p in model.parts if isinstance(p, Archive) or chosen.match(p.path)):
            result = await materialize(store, engine, model, router, filters=chosen,
                                       progress=progress, started=started, lease=lease, budget=budget, early=early)
        await asyncio.to_thread(store.index.record_origin_access, model.ref, needed)
        return result
    finally:
        if early is not None:
            await early.stop()  # after a failure (done ones are untouched): what arrived is kept
        if own:
            await asyncio.to_thread(store.index.drop_lease, lease)
        await source.close()
        if not drops_later:
            await asyncio.to_thread(store.content.delete_deferred)


async def _fetch_early(store: Store, engine: Engine, early: EarlyStart, router: ChunkRouter, filters: Filters,
                       lease: str, budget: Budget | None, progress: Progress | None, entries: list[FileEntry]) -> None:
    """Start fetching the files of one listing page that ``filters`` keep, as :func:`materialize` would
    (sizes checked, held by ``lease``, space reserved), in ``early``'s stats."""
    from .store.budget import reserve
    blobs = {e.blob.digest: e.blob for e in entries if filters.match(e.path) and e.blob.digest not in early.digests}
    if not blobs:
        return
    for blob in {max(blobs.values(), key=lambda b: b.size), min(blobs.values(), key=lambda b: b.size)}:
        store.content.check_size(blob)
    await asyncio.to_thread(store.index.hold, lease, blobs=list(blobs))
    if budget is not None:
        early.reserved += sum(b.size for b in blobs.values() if not store.content.has(b.digest))
        await asyncio.to_thread(reserve, store, budget, lease, early.reserved)
    early.digests.update(blobs)
    early.tasks.append(asyncio.ensure_future(
        engine.fetch(list(blobs.values()), router, stats=early.stats, progress=progress, leases=(lease,))))


async def materialize(store: Store, engine: Engine, model: Model, router: ChunkRouter, *,
                      filters: Filters, progress: Progress | None = None,
                      started: float | None = None, lease: str | None = None,
                      budget: Budget | None = None, early: EarlyStart | None = None) -> PullResult:
    """Fetch what ``model`` needs through ``router`` and build its view, holding all of it by ``lease``.

    ``early``: blobs whose fetch started while the model was resolving; waited for here, not fetched again.
    """
    from .store.budget import reserve
    from .store.unpack import rows_to_layer
    from .tarplace import by_range
    started = time.monotonic() if started is None else started
    leases = (lease,) if lease else ()
    files = [p for p in model.parts if isinstance(p, FileEntry) and filters.match(p.path)]
    archives = [p for p in model.parts if isinstance(p, Archive)]
    declared = [f.blob for f in files] + [a.blob for a in archives]
    for blob in {max(declared, key=lambda b: b.size), min(declared, key=lambda b: b.size)} if declared else ():
        store.content.check_size(blob)  # a size no disk holds is refused before anything is reserved
    known = {a.blob.digest: await asyncio.to_thread(_known_layer, store, a.blob.digest, lease)
             for a in archives}
    needed = [f.blob for f in files] + [a.blob for a in archives if known[a.blob.digest] is None]
    if lease:
        # Held before looking whether they are here: gc either removed them already (we fetch them)
        # or sees our lease and keeps them.
        await asyncio.to_thread(store.index.hold, lease, blobs=[b.digest for b in needed])
        crash_point("blobs-held")
        if budget is not None:
            missing = {b.digest: b.size for b in needed if not store.content.has(b.digest)}
            await asyncio.to_thread(reserve, store, budget, lease, sum(missing.values()))
    rows = dict(known)
    pending = {a.blob.digest: a for a in archives if known[a.blob.digest] is None}
    # From the origin alone, layers stream into their files as they download (issue 13); with peers they
    # are fetched whole through the router first (pieces from peers), then unpacked.
    origin = router.sources(archives[0].blob, 0)[0] if archives and isinstance(router, OriginOnly) else None
    stats = early.stats if early is not None else TransferStats()
    started_early = early.digests if early is not None else set()
    # Plain tar layers of big files are not fetched whole either: their files come by range (tarplace).
    later = {d for d, a in pending.items() if origin is not None or by_range(a)}
    fetching: Awaitable[object] = engine.fetch(
        [b for b in needed if b.digest not in later and b.digest not in started_early], router,
        stats=stats, progress=progress, leases=leases)
    if early is not None and early.tasks:
        fetching = _all(fetching, early.tasks)
    # Bounded like the engine's open ingests: each unpack holds a lock and two files open.
    gate = asyncio.Semaphore(engine.config.concurrency)

    async def unpack(archive: Archive) -> list[Row]:
        async with gate:
            return await _unpack(store, engine, archive, router, stats, leases, origin=origin, progress=progress)

    if origin is None:
        await fetching
        unpacked = await asyncio.gather(*(unpack(a) for a in pending.values()))
    else:
        unpacked = await _all(fetching, [unpack(a) for a in pending.values()])
    rows.update(zip(pending, unpacked, strict=True))

    layers: list[Sequence[Node | tuple[str, str]]] = []
    for part in model.parts:
        if isinstance(part, FileEntry):
            digest = part.blob.digest
            if not part.blob.verified and filters.match(part.path):
                # Stored under the sha256 learnt on the way in; remember it for next time.
                digest = stats.learned.get(digest) or engine.learned[digest]
                if part.source_key:
                    await asyncio.to_thread(store.index.learn_digest, part.source_key, digest, part.blob.size)
            layers.append([Node(part.path, "file", digest=digest, size=part.blob.size)])
        else:
            layer_rows = rows[part.blob.digest]
            assert layer_rows is not None
            layers.append(rows_to_layer(layer_rows, part.prefix))
    tree = overlay(layers)
    selected = [n for n in tree.values() if filters.match(n.path) and (n.kind != "dir" or not filters.key())]
    if not any(n.kind != "dir" for n in selected):
        hint = " match --include/--exclude" if filters.key() else " in it"
        raise NotFound(f"{model.ref}: no files{hint}")
    path = await asyncio.to_thread(functools.partial(store.build_view, selected, lease=lease))
    size = sum(n.size for n in selected if n.kind == "file")
    count = sum(1 for n in selected if n.kind == "file")
    await asyncio.to_thread(
        store.index.record_view, ref=model.ref, filters=filters.key(), model_digest=model.digest,
        view="sha256:" + path.name, size=size, files=count,
        blobs=[n.digest for n in selected if n.kind == "file"],
    )
    crash_point("view-recorded")
    return PullResult(ref=model.ref, model_digest=model.digest, path=path, files=count, size=size,
                      stats=stats, seconds=time.monotonic() - started)


def _known_layer(store: Store, digest: str, lease: str | None) -> list[Row] | None:
    """A layer unpacked before, its files held by ``lease`` (checked present after they are held)."""
    rows = store.index.layer_entries(digest)
    if rows is None:
        return None
    if lease:
        store.index.hold(lease, blobs=[r[2] for r in rows if r[0] == "f"])
    return store.layer_rows(digest)


async def _unpack(store: Store, engine: Engine, archive: Archive, router: ChunkRouter,
                  stats: TransferStats, leases: tuple[str, ...], *, origin: ByteSource | None = None,
                  progress: Progress | None = None) -> list[Row]:
    """Unpack one archive layer once, even with other processes doing the same.

    With ``origin``, the layer streams from it into its files (:mod:`.store.streamunpack`);
    without, it is fetched whole through ``router`` first.
    """
    from .store.streamunpack import stream_layer
    from .tarplace import by_range, place

    digest = archive.blob.digest
    lock = store.content.ingest_dir / f"{archive.blob.hex}.unpack.lock"
    fd = await store.content.lock(lock)
    assert fd is not None
    try:
        rows = await asyncio.to_thread(_known_layer, store, digest, leases[0] if leases else None)
        if rows is not None:
            return rows
        if by_range(archive) and not store.content.has(digest):
            # A plain tar layer of big enough files: each file by range into its blob (no copy of the tar).
            rows = await place(store, engine, archive, router, stats, leases, progress)
            if rows is not None:
                return rows
        if origin is not None:
            return await stream_layer(store, engine, archive, origin, stats, leases, progress)
        if not store.content.has(digest):  # unpacked and dropped by someone whose listing went stale
            await engine.fetch([archive.blob], router, stats=stats, leases=leases)
        return await asyncio.to_thread(functools.partial(store.unpack, archive, leases=leases))
    finally:
        os.close(fd)


async def _all(first: Awaitable[object], rest: Sequence[Awaitable[T]]) -> list[T]:
    """Run ``first`` and ``rest`` at once; return what ``rest`` gave. The first to fail stops the others
    (waited for), and its error stands."""
    head = asyncio.ensure_future(first)
    tasks = [asyncio.ensure_future(s) for s in rest]
    try:
        await asyncio.gather(head, *tasks)
        return [t.result() for t in tasks]
    except BaseException:
        for task in (head, *tasks):
            if not task.done():
                task.cancel()
        await asyncio.gather(head, *tasks, return_exceptions=True)
        raise
