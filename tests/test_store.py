"""Conformance suite for the content store, plus views and the index.

The suite is written against a factory so that any other ContentStore
implementation can be run through the same tests (STYLE.md: one conformance
suite for every implementation).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support import held_unlinks, make_tar

from modelcache.errors import DigestMismatch, UnsafePath
from modelcache.model import Archive, Blob, Compression
from modelcache.store import Store, liveness
from modelcache.store.content import ContentStore
from modelcache.store.views import ViewEntry, build_view, remove_tree, view_digest
from modelcache.tree import Node

CHUNK = 64 << 10
IMPLEMENTATIONS: dict[str, Callable[[Path], ContentStore]] = {"local": ContentStore}


def blob_of(data: bytes) -> Blob:
    return Blob("sha256:" + hashlib.sha256(data).hexdigest(), len(data))


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def content(request, tmp_path: Path) -> ContentStore:
    return IMPLEMENTATIONS[request.param](tmp_path / "store")


def ingest(content: ContentStore, blob: Blob):
    return asyncio.run(content.open_ingest(blob, CHUNK))


def write_all(ing, data: bytes, chunks=None) -> None:
    for i in chunks if chunks is not None else range(ing.chunks):
        start, length = ing.chunk_range(i)
        ing.write(start, data[start:start + length])
        ing.mark_done(i)


class TestContentStore:
    data = os.urandom(5 * CHUNK + 123)

    def test_round_trip(self, content: ContentStore) -> None:
        """Chunks written in any order commit to a read-only blob named by its digest."""
        blob = blob_of(self.data)
        ing = ingest(content, blob)
        write_all(ing, self.data, reversed(range(ing.chunks)))
        ing.commit()
        assert content.has(blob.digest)
        assert content.path(blob.digest).read_bytes() == self.data
        assert os.stat(content.path(blob.digest)).st_mode & 0o777 == 0o444
        assert not (content.ingest_dir / blob.hex).exists()

    def test_invisible_until_commit(self, content: ContentStore) -> None:
        """All chunks written but not committed: the blob does not exist for readers."""
        blob = blob_of(self.data)
        ing = ingest(content, blob)
        write_all(ing, self.data)
        assert not content.has(blob.digest) and not content.path(blob.digest).exists()
        ing.close()

    def test_digest_mismatch_leaves_nothing(self, content: ContentStore) -> None:
        """Wrong bytes: DigestMismatch, no blob, no ingest left behind."""
        blob = blob_of(self.data)
        ing = ingest(content, blob)
        write_all(ing, bytes(len(self.data)))
        with pytest.raises(DigestMismatch):
            ing.commit()
        assert not content.has(blob.digest)
        assert not (content.ingest_dir / blob.hex).exists()

    def test_resume_keeps_durable_chunks(self, content: ContentStore) -> None:
        """Reopening after close() knows which chunks are done; finishing them commits."""
        blob = blob_of(self.data)
        ing = ingest(content, blob)
        write_all(ing, self.data, [0, 2, 3])
        ing.close()
        again = ingest(content, blob)
        assert again.missing() == [1, 4, 5]
        assert again.bytes_done == 3 * CHUNK
        write_all(again, self.data, again.missing())
        again.commit()
        assert content.path(blob.digest).read_bytes() == self.data

    def test_other_chunk_size_restarts(self, content: ContentStore) -> None:
        """A record made with another chunk size is not trusted."""
        blob = blob_of(self.data)
        ing = ingest(content, blob)
        write_all(ing, self.data, [0])
        ing.close()
        other = asyncio.run(content.open_ingest(blob, CHUNK * 2))
        assert other.missing() == list(range(other.chunks))
        other.close()

    def test_committed_blob_needs_no_ingest(self, content: ContentStore) -> None:
        """open_ingest of a committed blob returns None; committing the same digest twice is fine."""
        blob = blob_of(self.data)
        ing = ingest(content, blob)
        write_all(ing, self.data)
        ing.commit()
        assert ingest(content, blob) is None
        digest, size = content.write_stream(io.BytesIO(self.data))
        assert (digest, size) == (blob.digest, blob.size)

    def test_write_stream_names_by_digest(self, content: ContentStore) -> None:
        """Streams are named by what they hash to, and a short stream is refused."""
        digest, size = content.write_stream(io.BytesIO(b"hello"))
        assert digest == blob_of(b"hello").digest and size == 5
        with pytest.raises(Exception, match="expected 10"):
            content.write_stream(io.BytesIO(b"short"), expected_size=10)
        assert not [p for p in content.ingest_dir.iterdir() if p.name.startswith("tmp-")]

    def test_second_writer_waits_then_finds_it_committed(self, content: ContentStore) -> None:
        """Two open_ingest calls for one blob: the second waits, then sees the commit."""
        blob = blob_of(self.data)

        async def race() -> object:
            first = await content.open_ingest(blob, CHUNK)
            waiter = asyncio.create_task(content.open_ingest(blob, CHUNK))
            await asyncio.sleep(0.3)
            assert not waiter.done()
            write_all(first, self.data)
            first.commit()
            return await asyncio.wait_for(waiter, 5)

        assert asyncio.run(race()) is None

    def test_commit_when_already_present_is_success(self, content: ContentStore) -> None:
        """The same bytes committed meanwhile by another writer: commit succeeds (AlreadyExists)."""
        blob = blob_of(self.data)
        ing = ingest(content, blob)
        write_all(ing, self.data)
        content.write_stream(io.BytesIO(self.data))
        inode = os.stat(content.path(blob.digest)).st_ino
        ing.commit()
        assert os.stat(content.path(blob.digest)).st_ino == inode
        assert content.path(blob.digest).read_bytes() == self.data
        assert not (content.ingest_dir / blob.hex).exists()

    def test_mismatch_leaves_blobs_empty(self, content: ContentStore) -> None:
        """A refused commit leaves no file of any name under blobs/, and the next try starts clean."""
        blob = blob_of(self.data)
        ing = ingest(content, blob)
        write_all(ing, self.data[::-1])
        with pytest.raises(DigestMismatch):
            ing.commit()
        assert list(content.blobs_dir.iterdir()) == [] and list(content.digests()) == []
        again = ingest(content, blob)
        assert again.missing() == list(range(again.chunks))
        again.close()

    def test_restart_after_chunk_size_change_commits(self, content: ContentStore) -> None:
        """After a restart forced by another chunk size, writing every chunk again commits."""
        blob = blob_of(self.data)
        first = ingest(content, blob)
        write_all(first, bytes(len(self.data)), [0, 1])
        first.close()
        other = asyncio.run(content.open_ingest(blob, CHUNK * 2))
        assert other.bytes_done == 0
        write_all(other, self.data)
        other.commit()
        assert content.path(blob.digest).read_bytes() == self.data

    @pytest.mark.parametrize("size", [0, 1, CHUNK, CHUNK + 1])
    def test_edge_sizes(self, content: ContentStore, size: int) -> None:
        """Empty, tiny and chunk-boundary blobs commit with the right chunk count."""
        data = os.urandom(size)
        ing = ingest(content, blob_of(data))
        assert ing.chunks == max(1, -(-size // CHUNK))
        write_all(ing, data)
        ing.commit()
        assert content.path(blob_of(data).digest).read_bytes() == data


def test_views_are_read_only_shared_and_idempotent(tmp_path: Path) -> None:
    """A view hardlinks blobs, is 0555/0444, and the same listing gives the same directory."""
    store = Store(tmp_path / "s")
    digest, size = store.content.write_stream(io.BytesIO(b"weights"))
    entries = [ViewEntry("a/w.bin", "file", digest, size), ViewEntry("a/link", "symlink", target="w.bin"),
               ViewEntry("empty", "dir")]
    first = build_view(store.views_dir, entries, store.content.path)
    second = build_view(store.views_dir, list(reversed(entries)), store.content.path)
    assert first == second and first.name == view_digest(entries)[7:]
    assert os.stat(first / "a" / "w.bin").st_ino == os.stat(store.content.path(digest)).st_ino
    assert os.stat(first / "a").st_mode & 0o777 == 0o555
    assert (first / "a" / "link").read_bytes() == b"weights" and (first / "empty").is_dir()
    assert not [p for p in store.views_dir.iterdir() if p.name.startswith(".tmp-")]
    remove_tree(first)
    assert not first.exists()


def test_failed_view_build_leaves_no_temp(tmp_path: Path) -> None:
    """A view naming a missing blob fails whole, leaving no .tmp-* behind."""
    store = Store(tmp_path / "s")
    with pytest.raises(FileNotFoundError):
        store.build_view([Node("x", "file", "sha256:" + "0" * 64)])
    assert list(store.views_dir.iterdir()) == []


@pytest.mark.parametrize("compression", list(Compression))
def test_unpack_records_layer_and_drops_archive(tmp_path: Path, compression: Compression) -> None:
    """Unpacking stores files as blobs, records the listing, and forgets it if a blob vanishes."""
    import gzip

    import zstandard

    raw = make_tar([("d/a.txt", b"a", {}), ("d/.wh.gone", b"", {})])
    data = {Compression.NONE: raw, Compression.GZIP: gzip.compress(raw),
            Compression.ZSTD: zstandard.ZstdCompressor().compress(raw)}[compression]
    store = Store(tmp_path / "s")
    layer_digest, _ = store.content.write_stream(io.BytesIO(data))
    rows = store.unpack(Archive(Blob(layer_digest, len(data)), compression))
    a = blob_of(b"a").digest
    assert rows == [["f", "d/a.txt", a, 1], ["w", "d/gone"]]
    assert not store.content.has(layer_digest) and store.content.has(a)
    assert store.layer_rows(layer_digest) == rows
    store.content.delete(a)
    assert store.layer_rows(layer_digest) is None and store.index.layer_entries(layer_digest) is None


def _gone_files(store: Store) -> list[Path]:
    return [p for p in store.content.ingest_dir.iterdir() if p.name.startswith("tmp-") and "gone-" in p.name]


def _dropped_layer(store: Store, text: bytes) -> str:
    import gzip

    data = gzip.compress(make_tar([("a.txt", text, {})]), mtime=0)
    layer, _ = store.content.write_stream(io.BytesIO(data))
    store.unpack(Archive(Blob(layer, len(data)), Compression.GZIP))
    return layer


def test_a_dropped_layer_leaves_the_store_at_once_and_its_bytes_in_the_background(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer dropped once unpacked is out of ``blobs/`` and the index at once; its bytes are unlinked by a
    thread of the store's (on some disks unlinking a big file waits for its discard, issue 13), and
    delete_deferred waits until they are."""
    go_on = held_unlinks(monkeypatch)
    store = Store(tmp_path / "s")
    layers = [_dropped_layer(store, b"a"), _dropped_layer(store, b"b")]
    assert not any(store.content.has(d) for d in layers)
    assert not set(layers) & set(store.content.digests())
    assert len(_gone_files(store)) == 2  # the first being unlinked (held), the second waiting
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (store.content.delete_deferred(), done.set()))
    waiter.start()
    assert not done.wait(0.3)  # waits for the unlink in progress
    go_on.set()
    assert done.wait(30)
    waiter.join(30)
    assert not _gone_files(store)


def test_a_command_hands_what_still_waits_to_an_rm_that_outlives_it(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """delete_deferred(detach=True) gives the files not yet being unlinked to an ``rm`` of their own and
    returns at once; where no rm can start, it unlinks them itself."""
    import subprocess

    go_on = held_unlinks(monkeypatch)
    store = Store(tmp_path / "s")
    _dropped_layer(store, b"a")  # held in the thread
    _dropped_layer(store, b"b")  # waiting: handed to rm
    started = time.monotonic()
    store.content.delete_deferred(detach=True)
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 20
    while len(_gone_files(store)) > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(_gone_files(store)) == 1  # rm took the waiting one; the held one is still in progress
    go_on.set()
    store.content.delete_deferred()
    assert not _gone_files(store)

    def no_rm(*args, **kwargs):
        raise FileNotFoundError("rm")

    monkeypatch.setattr(subprocess, "Popen", no_rm)
    go_on.clear()
    _dropped_layer(store, b"c")
    _dropped_layer(store, b"d")
    go_on.set()
    store.content.delete_deferred(detach=True)
    store.content.delete_deferred()
    assert not _gone_files(store)


def test_one_unlink_that_fails_does_not_keep_the_others(tmp_path: Path) -> None:
    from modelcache.store.unlinker import Unlinker

    files = [tmp_path / f"f{i}" for i in range(3)]
    for f in files:
        f.write_bytes(b"x")
    (tmp_path / "d").mkdir()
    unlinker = Unlinker()
    for f in [files[0], tmp_path / "d", files[1], files[2]]:  # a directory: unlink fails (EISDIR)
        unlinker.add(f)
    unlinker.finish()
    assert not any(f.exists() for f in files)
    assert (tmp_path / "d").is_dir()


def test_gc_removes_the_dropped_bytes_a_dead_process_left(tmp_path: Path) -> None:
    """A pull killed before its deferred unlink (or whose rm never ran) leaves them named for itself: the next
    gc removes them once that process is gone, and never while it lives."""
    from modelcache.store.gc import collect

    store = Store(tmp_path / "s")
    dead = store.content.ingest_dir / f"tmp-999999999.1-gone-{'ab' * 32}"
    dead.write_bytes(b"x" * 1000)
    mine = store.content.ingest_dir / f"tmp-{liveness.tmp_prefix()}gone-{'cd' * 32}"
    mine.write_bytes(b"y")
    collect(store)
    assert not dead.exists() and mine.exists()


def test_unpack_refuses_unsafe_entries(tmp_path: Path) -> None:
    """A layer with a device file is refused with UnsafePath."""
    import tarfile

    data = make_tar([("dev/sda", None, {"type": tarfile.BLKTYPE})])
    store = Store(tmp_path / "s")
    digest, _ = store.content.write_stream(io.BytesIO(data))
    with pytest.raises(UnsafePath):
        store.unpack(Archive(Blob(digest, len(data)), Compression.NONE))


def test_index_round_trip(tmp_path: Path) -> None:
    """record_view / lookup / records / blob_users agree, per ref and filters, across reopening."""
    store = Store(tmp_path / "s")
    view = "sha256:" + "1" * 64
    store.index.record_view(ref="oci://r/m:v1", filters="", model_digest="sha256:" + "a" * 64,
                            view=view, size=30, blobs=["sha256:b1", "sha256:b2", "sha256:b1"], files=3)
    store.index.record_view(ref="oci://r/m:v1", filters="inc=*.json;exc=", model_digest="sha256:" + "a" * 64,
                            view="sha256:" + "2" * 64, size=5, blobs=["sha256:b1"], files=1)
    store.close()
    index = Store(tmp_path / "s").index
    assert index.lookup("oci://r/m:v1", "") == (view, "sha256:" + "a" * 64)
    assert index.lookup("oci://r/m:v1", "inc=*.json;exc=") == ("sha256:" + "2" * 64, "sha256:" + "a" * 64)
    assert index.lookup("oci://r/m:v2", "") is None
    records = {(r.filters, r.view): r for r in index.records()}
    assert set(records) == {("", view), ("inc=*.json;exc=", "sha256:" + "2" * 64)}
    full = records[("", view)]
    assert (full.ref, full.size, full.files, full.pinned, full.leases) == ("oci://r/m:v1", 30, 3, False, 0)
    assert sorted(index.blob_users("sha256:b1")) == sorted([view, "sha256:" + "2" * 64])
    assert index.blob_users("sha256:b2") == [view]
    index.forget_view(view)
    assert index.lookup("oci://r/m:v1", "") is None and index.blob_users("sha256:b2") == []


def test_index_layers(tmp_path: Path) -> None:
    """put_layer / layer_entries keep a listing verbatim; forget_layer drops it."""
    store = Store(tmp_path / "s")
    rows = [["d", "a"], ["f", "a/x", "sha256:" + "3" * 64, 7], ["l", "a/y", "x"], ["w", "b"], ["o", ""]]
    assert store.index.layer_entries("sha256:layer") is None
    store.index.put_layer("sha256:layer", rows)
    assert store.index.layer_entries("sha256:layer") == rows
    store.index.forget_layer("sha256:layer")
    assert store.index.layer_entries("sha256:layer") is None


def unpack_tar(tmp_path: Path, entries: list) -> list:
    """Store a plain tar of ``entries`` and unpack it; return its rows."""
    from modelcache.store.unpack import unpack_layer

    content = ContentStore(tmp_path / "store")
    data = make_tar(entries)
    digest, _ = content.write_stream(io.BytesIO(data))
    return unpack_layer(content, content.path(digest), Compression.NONE, name="L")


def test_unpack_listing(tmp_path: Path) -> None:
    """Every kind of entry becomes its row; the root entry is skipped; hardlinks become files."""
    import tarfile

    rows = unpack_tar(tmp_path, [
        ("./", None, {"type": tarfile.DIRTYPE}),
        ("./models/", None, {"type": tarfile.DIRTYPE}),
        ("./models/w.bin", b"weights", {}),
        ("/models/link", None, {"type": tarfile.SYMTYPE, "linkname": "w.bin"}),
        ("models/abs", None, {"type": tarfile.SYMTYPE, "linkname": "/models/w.bin"}),
        ("models/hard", None, {"type": tarfile.LNKTYPE, "linkname": "./models/w.bin"}),
        ("models/.wh.old", b"", {}),
        ("cfg/.wh..wh..opq", b"", {}),
        ("models/empty", b"", {}),
    ])
    w = blob_of(b"weights").digest
    assert rows == [
        ["d", "models"], ["f", "models/w.bin", w, 7], ["l", "models/link", "w.bin"],
        ["l", "models/abs", "w.bin"], ["f", "models/hard", w, 7], ["w", "models/old"], ["o", "cfg"],
        ["f", "models/empty", blob_of(b"").digest, 0],
    ]


@pytest.mark.parametrize("entries,message", [
    ([("dev/sda", None, {"type": "3"})], "device file or FIFO"),
    ([("dev/tty", None, {"type": "4"})], "device file or FIFO"),
    ([("fifo", None, {"type": "6"})], "device file or FIFO"),
    ([("../evil", b"x", {})], "escapes"),
    ([("a/../../evil", b"x", {})], "escapes"),
    ([("l", None, {"type": "2", "linkname": "../../etc/passwd"})], "points outside"),
    ([("a/l", None, {"type": "2", "linkname": "/../etc/passwd"})], "points outside"),
    ([("l", None, {"type": "2", "linkname": ""})], "empty target"),
    ([("h", None, {"type": "1", "linkname": "not-in-layer"})], "names no earlier file"),
    ([("h", None, {"type": "1", "linkname": "f"}), ("f", b"late", {})], "names no earlier file"),
    ([("h", None, {"type": "1", "linkname": "../../etc/shadow"})], "escapes"),
])
def test_unpack_refuses(tmp_path: Path, entries: list, message: str) -> None:
    """Device files, FIFOs, escaping paths and symlinks, and dangling hardlinks are UnsafePath."""
    import tarfile

    typed = [(n, d, {**f, "type": f["type"].encode()} if "type" in f else f) for n, d, f in entries]
    assert all(isinstance(f.get("type", tarfile.REGTYPE), bytes) for _, _, f in typed)
    with pytest.raises(UnsafePath, match=f"layer L: .*{message}"):
        unpack_tar(tmp_path, typed)


@pytest.mark.parametrize("entries", [
    [ViewEntry("a/l", "symlink", target=".."), ViewEntry("x", "symlink", target="a/l/../.."),
     ViewEntry("x/PWNED", "file", "")],
    [ViewEntry("x", "symlink", target="d"), ViewEntry("x/f", "file", "")],
    [ViewEntry("a/l", "symlink", target=".."), ViewEntry("peek", "symlink", target="a/l/../../..")],
    [ViewEntry("abs", "symlink", target="/etc")],
])
def test_view_never_leads_outside(tmp_path: Path, entries: list[ViewEntry]) -> None:
    """A listing that would write through, or link out through, its own symlinks is refused whole."""
    store = Store(tmp_path / "s")
    digest, size = store.content.write_stream(io.BytesIO(b"payload"))
    entries = [ViewEntry(e.path, e.kind, digest, size) if e.kind == "file" else e for e in entries]
    with pytest.raises(UnsafePath):
        build_view(store.views_dir, entries, store.content.path)
    assert list(store.views_dir.iterdir()) == []
    assert sorted(p.name for p in store.root.iterdir()) == ["blobs", "index.sqlite", "index.sqlite-shm",
                                                            "index.sqlite-wal", "ingest", "views"]


def test_layer_with_a_symlink_chain_cannot_write_outside(tmp_path: Path) -> None:
    """A tar whose links each look safe but chain out of the root writes nothing outside its view."""
    import tarfile

    from modelcache.store.unpack import rows_to_layer
    from modelcache.tree import overlay

    store = Store(tmp_path / "s")
    data = make_tar([("a/l", None, {"type": tarfile.SYMTYPE, "linkname": ".."}),
                     ("x", None, {"type": tarfile.SYMTYPE, "linkname": "a/l/../.."}),
                     ("x/PWNED", b"owned", {})])
    digest, _ = store.content.write_stream(io.BytesIO(data))
    rows = store.unpack(Archive(Blob(digest, len(data)), Compression.NONE))
    # The overlay turns "x" into the directory x/PWNED needs (a later entry wins),
    # so the escaping link is gone; a tree that still had it would be refused.
    view = store.build_view(list(overlay([rows_to_layer(rows)]).values()))
    assert (view / "x" / "PWNED").read_bytes() == b"owned" and not (view / "x").is_symlink()
    assert [p for p in tmp_path.rglob("PWNED") if not p.is_relative_to(view)] == []
    with pytest.raises(UnsafePath):
        store.build_view(list(overlay([rows_to_layer(rows[:2])]).values()) +
                         [Node("x/PWNED", "file", rows[2][2], rows[2][3])])


def test_bytes_written_in_order_are_hashed_from_memory(tmp_path: Path) -> None:
    """Writes at the hash's frontier feed the hash at once; a chunk ahead of it waits for its turn."""
    content = ContentStore(tmp_path / "store")
    data = os.urandom(3 * CHUNK)
    blob = blob_of(data)
    ing = ingest(content, blob)
    ing.write(2 * CHUNK, data[2 * CHUNK:])  # ahead of the frontier: not hashed yet
    ing.mark_done(2)
    assert ing._hashed == 0
    ing.write(0, [data[:100], data[100:CHUNK]])  # at the frontier: hashed as written
    assert ing._hashed == CHUNK
    ing.mark_done(0)
    ing.write(CHUNK, data[CHUNK:2 * CHUNK])
    ing.mark_done(1)  # and the done chunk ahead is caught up from disk
    assert ing._hashed == 3 * CHUNK
    ing.commit()
    assert content.path(blob.digest).read_bytes() == data


# The index schema of every release before versioning, verbatim (user_version 0).
_RELEASED_SCHEMA = """
CREATE TABLE IF NOT EXISTS refs (
  ref TEXT NOT NULL, filters TEXT NOT NULL, view TEXT NOT NULL,
  model_digest TEXT NOT NULL, updated REAL NOT NULL,
  PRIMARY KEY (ref, filters));
CREATE TABLE IF NOT EXISTS views (
  digest TEXT PRIMARY KEY, size INTEGER NOT NULL, files INTEGER NOT NULL,
  created REAL NOT NULL, last_used REAL NOT NULL);
CREATE TABLE IF NOT EXISTS view_blobs (
  view TEXT NOT NULL, blob TEXT NOT NULL, PRIMARY KEY (view, blob));
CREATE INDEX IF NOT EXISTS view_blobs_by_blob ON view_blobs (blob);
CREATE TABLE IF NOT EXISTS layers (
  digest TEXT PRIMARY KEY, entries TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS leases (
  id TEXT PRIMARY KEY, view TEXT NOT NULL, holder TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pins (
  view TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS learned_digests (
  source_key TEXT PRIMARY KEY, digest TEXT NOT NULL, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS remote_blobs (
  registry TEXT NOT NULL, digest TEXT NOT NULL, repository TEXT NOT NULL,
  PRIMARY KEY (registry, digest, repository));
"""


def test_a_store_from_before_schema_versions_opens_and_migrates(tmp_path: Path) -> None:
    """An index made by the last unversioned release: every row survives; mounts and pins become leases,
    blobs on disk are counted, and the version is the newest."""
    import sqlite3

    from modelcache.store.index import VERSION

    root = tmp_path / "s"
    (root / "blobs" / "sha256").mkdir(parents=True)
    blobs = {blob_of(d).digest: d for d in (b"weights" * 100, b"{}")}
    for digest, data in blobs.items():
        (root / "blobs" / "sha256" / digest[7:]).write_bytes(data)
    view, other = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    db = sqlite3.connect(root / "index.sqlite")
    db.executescript(_RELEASED_SCHEMA)
    with db:
        db.execute("INSERT INTO refs VALUES ('oci://r/m:v1', '', ?, 'sha256:mm', 1)", (view,))
        db.execute("INSERT INTO refs VALUES ('oci://r/o:v1', '', ?, 'sha256:oo', 1)", (other,))
        db.execute("INSERT INTO views VALUES (?, 702, 2, 1, 5)", (view,))
        db.execute("INSERT INTO views VALUES (?, 2, 1, 1, 4)", (other,))
        db.executemany("INSERT INTO view_blobs VALUES (?, ?)", [(view, d) for d in blobs])
        db.execute("INSERT INTO layers VALUES ('sha256:layer', '[[\"d\", \"a\"]]', 1)")
        db.execute("INSERT INTO leases VALUES ('vol-1', ?, '{\"target\": \"/t\"}', 1)", (view,))
        db.execute("INSERT INTO pins VALUES (?, 1)", (other,))
        db.execute("INSERT INTO learned_digests VALUES ('s3:b/k:etag', 'sha256:ll', 3)")
        db.execute("INSERT INTO remote_blobs VALUES ('reg', 'sha256:pp', 'repo')")
    db.close()

    for _ in range(2):  # and opening it again changes nothing
        store = Store(root)
        index = store.index
        assert index.version() == VERSION
        assert index.lookup("oci://r/m:v1", "") == (view, "sha256:mm")
        records = {r.view: r for r in index.records()}
        assert (records[view].leases, records[view].pinned) == (1, False)
        assert (records[other].leases, records[other].pinned) == (0, True)
        leases = {lease.id: lease for lease in index.leases()}
        assert leases["vol-1"].kind == "mount" and leases["vol-1"].views == (view,)
        assert leases["vol-1"].holder == '{"target": "/t"}' and leases["vol-1"].pid is None
        assert leases[f"pin:api:{other}"].owner == "api" and leases[f"pin:api:{other}"].views == (other,)
        assert index.layer_entries("sha256:layer") == [["d", "a"]]
        assert index.learned_digest("s3:b/k:etag") == "sha256:ll" and index.pushed_to("reg", "sha256:pp") == ["repo"]
        assert store.disk_usage() == sum(len(d) for d in blobs.values())
        assert all(index.blob_xxh3(d) is None for d in blobs)  # not known yet: scrub checks them by sha256
        assert sorted(index.blob_users(next(iter(blobs)))) == [view]
        store.close()


def test_an_index_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    """A store written by a newer modelcache is not opened (and not damaged) by an older one."""
    import sqlite3

    from modelcache.errors import ModelCacheError

    (tmp_path / "s").mkdir()
    db = sqlite3.connect(tmp_path / "s" / "index.sqlite")
    db.execute("PRAGMA user_version = 999")
    db.close()
    with pytest.raises(ModelCacheError, match="version 999, newer"):
        Store(tmp_path / "s")
