"""The store's SQLite index: what the blobs and views mean, and who holds them.

Tables:

- ``refs``: a reference (with its include/exclude filters) -> the view it
  resolved to last, and the model digest it came from;
- ``views``: one row per built view: size, file count, created, last used;
- ``view_blobs``: which blobs a view holds (for gc and for ``ls``);
- ``blobs``: every committed blob, its size (so usage is a sum, not a stat
  of every file) and the xxh3-128 of its bytes taken at commit (for scrub);
- ``layers``: the listing of an archive layer already unpacked into blobs, so
  a later pull of the same layer fetches nothing;
- ``leases`` and ``lease_resources``: the only roots gc honours. A lease has
  an id, a kind (``pull``, ``mount``, ``pin``, ``upload``), an owner, the
  process that holds it (pid and start time; none for mounts and pins, which
  outlive processes), bytes reserved against the disk budget, and the views
  and blobs it holds;
- ``learned_digests``: the sha256 learnt for bytes an origin names its own
  way (an S3 object's bucket, key and ETag), so they are not fetched again;
- ``remote_blobs``: which repositories of a registry we pushed a blob to,
  so a push to another repository there can cross-mount it;
- ``origin_access``: whether a reference needed credentials at its origin
  when it was last pulled (a private model: warm mounts check the pod's).

The schema has a version (``PRAGMA user_version``) and moves forward through
:data:`MIGRATIONS`, an ordered list of steps, each run once in its own
transaction; a store made before versioning is version 0 and runs them all.

One connection per :class:`Index`, serialised by a lock; WAL mode and a busy
timeout let several processes share the file. Methods block; async callers
run them in a thread.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..errors import ModelCacheError
from . import liveness

# Version 1: the schema of every release before versioning (IF NOT EXISTS, so a
# store made by one of them passes through this step unchanged).
_SCHEMA_V1 = """
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

# Version 2: leases with kind, owner, process and resources (views and blobs);
# pins become owned leases; committed blobs are counted in the index.
_LEASES_V2 = """
CREATE TABLE leases_v2 (
  id TEXT PRIMARY KEY, kind TEXT NOT NULL, owner TEXT NOT NULL, holder TEXT NOT NULL DEFAULT '',
  pid INTEGER, pid_start INTEGER, reserved INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL);
CREATE TABLE lease_resources (
  lease TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL, PRIMARY KEY (lease, kind, name));
CREATE INDEX lease_resources_by_name ON lease_resources (kind, name);
INSERT INTO leases_v2 (id, kind, owner, holder, created) SELECT id, 'mount', 'daemon', holder, created FROM leases;
INSERT INTO lease_resources (lease, kind, name) SELECT id, 'view', view FROM leases;
INSERT INTO leases_v2 (id, kind, owner, created) SELECT 'pin:api:' || view, 'pin', 'api', created FROM pins;
INSERT INTO lease_resources (lease, kind, name) SELECT 'pin:api:' || view, 'view', view FROM pins;
DROP TABLE leases;
DROP TABLE pins;
ALTER TABLE leases_v2 RENAME TO leases;
CREATE TABLE blobs (digest TEXT PRIMARY KEY, size INTEGER NOT NULL);
"""


def _count_blobs(db: sqlite3.Connection, root: Path) -> None:
    """Fill ``blobs`` from the disk once, for a store made before the index counted them."""
    blobs_dir = root / "blobs" / "sha256"
    if not blobs_dir.is_dir():
        return
    for entry in os.scandir(blobs_dir):
        if len(entry.name) == 64:
            try:
                size = entry.stat().st_size
            except FileNotFoundError:
                continue
            db.execute("INSERT OR IGNORE INTO blobs (digest, size) VALUES (?, ?)", ("sha256:" + entry.name, size))


# Version 3: whether a ref needed credentials at its origin (0 or 1), for the mount gate of private
# models (daemon.access). A ref without a row was pulled before: it counts as private.
_ORIGIN_ACCESS_V3 = """
CREATE TABLE IF NOT EXISTS origin_access (
  ref TEXT PRIMARY KEY, needed_credentials INTEGER NOT NULL, updated REAL NOT NULL);
"""

# Version 4: the xxh3-128 of each blob, computed at commit in the same pass as its sha256 (NULL for
# blobs committed before): the scrubber's fast local check (store.scrub).
_BLOB_XXH3_V4 = """
ALTER TABLE blobs ADD COLUMN xxh3 TEXT;
"""

Step = str | Callable[[sqlite3.Connection, Path], None]

# The ordered migrations: MIGRATIONS[n] takes the index from version n to n + 1.
# Append new steps at the end (never edit a released one): a SQL script, or a
# function of (connection, store root) for what SQL alone cannot do.
MIGRATIONS: list[list[Step]] = [
    [_SCHEMA_V1],
    [_LEASES_V2, _count_blobs],
    [_ORIGIN_ACCESS_V3],
    [_BLOB_XXH3_V4],
]
VERSION = len(MIGRATIONS)

_T = TypeVar("_T")

LEASE_KINDS = ("pull", "mount", "pin", "upload")


@dataclass(frozen=True, slots=True)
class ViewRecord:
    """A cached model as ``ls`` shows it."""

    ref: str
    filters: str
    model_digest: str
    view: str
    size: int
    files: int
    last_used: float
    pinned: bool
    leases: int


@dataclass(frozen=True, slots=True)
class Lease:
    """Who holds which views and blobs (see the module docstring)."""

    id: str
    kind: str
    owner: str
    holder: str = ""
    pid: int | None = None
    pid_start: int | None = None
    reserved: int = 0
    views: tuple[str, ...] = ()
    blobs: tuple[str, ...] = ()

    def live(self) -> bool:
        """False once the process that took the lease is gone (leases without a process stay)."""
        return self.pid is None or self.pid_start is None or liveness.alive(self.pid, self.pid_start)


def _statements(script: str) -> list[str]:
    # Our scripts hold no ";" inside literals, so a split is a parse.
    return [s.strip() for s in script.split(";") if s.strip()]


class Index:
    """The SQLite index of one store."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        # Two processes opening a new store at once can get SQLITE_BUSY from the
        # journal-mode switch, which the busy timeout does not cover: retry it.
        for attempt in range(100):
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e) or attempt == 99:
                    raise
                time.sleep(0.05 + random.random() * 0.1)
        self._migrate(path.parent)

    def _migrate(self, root: Path) -> None:
        """Run the steps this index lacks, each version in one transaction (so a crash redoes it whole)."""
        # An index already current (every open but the first) is only read: no write lock taken.
        if self._db.execute("PRAGMA user_version").fetchone()[0] == VERSION:
            return
        while True:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    version = self._db.execute("PRAGMA user_version").fetchone()[0]
                    if version > VERSION:
                        raise ModelCacheError(f"store index {root}/index.sqlite is version {version}, newer than "
                                              f"this modelcache knows ({VERSION}): upgrade modelcache")
                    if version == VERSION:
                        self._db.execute("COMMIT")
                        return
                    for step in MIGRATIONS[version]:
                        if isinstance(step, str):
                            for statement in _statements(step):
                                self._db.execute(statement)
                        else:
                            step(self._db, root)
                    self._db.execute(f"PRAGMA user_version = {version + 1}")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")

    def version(self) -> int:
        """The schema version of the index."""
        return int(self._query("PRAGMA user_version")[0][0])

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    def _tx(self, statements: Iterable[tuple[str, Sequence[object]]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                # A run of one statement (a row per blob of a model) goes in one executemany: half the cost.
                for sql, run in itertools.groupby(statements, key=lambda statement: statement[0]):
                    self._db.executemany(sql, (args for _, args in run))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _atomic(self, body: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``body`` in one write transaction (its filesystem steps too, under the index's write lock)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = body(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result

    def _query(self, sql: str, args: Sequence[object] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- layers ---------------------------------------------------------------

    def layer_entries(self, digest: str) -> list[list] | None:
        """The listing recorded for an unpacked layer, or None."""
        rows = self._query("SELECT entries FROM layers WHERE digest = ?", (digest,))
        return json.loads(rows[0][0]) if rows else None

    def put_layer(self, digest: str, entries: list[list]) -> None:
        """Record the listing of a layer unpacked into blobs."""
        self._tx([(
            "INSERT OR REPLACE INTO layers (digest, entries, created) VALUES (?, ?, ?)",
            (digest, json.dumps(entries, separators=(",", ":")), time.time()),
        )])

    def forget_layer(self, digest: str) -> None:
        """Drop a layer listing (one of its blobs went missing)."""
        self._tx([("DELETE FROM layers WHERE digest = ?", (digest,))])

    # -- views and refs ---------------------------------------------------------

    def record_view(self, *, ref: str, filters: str, model_digest: str, view: str,
                    size: int, blobs: Iterable[str], files: int) -> None:
        """Record that ``ref`` (with ``filters``) is materialised as ``view``."""
        now = time.time()
        stmts: list[tuple[str, Sequence[object]]] = [
            ("INSERT INTO views (digest, size, files, created, last_used) VALUES (?, ?, ?, ?, ?) "
             "ON CONFLICT(digest) DO UPDATE SET last_used = excluded.last_used",
             (view, size, files, now, now)),
            ("INSERT OR REPLACE INTO refs (ref, filters, view, model_digest, updated) VALUES (?, ?, ?, ?, ?)",
             (ref, filters, view, model_digest, now)),
        ]
        stmts += [("INSERT OR IGNORE INTO view_blobs (view, blob) VALUES (?, ?)", (view, b)) for b in set(blobs)]
        self._tx(stmts)

    def lookup(self, ref: str, filters: str) -> tuple[str, str] | None:
        """(view, model digest) last recorded for a ref, or None."""
        rows = self._query("SELECT view, model_digest FROM refs WHERE ref = ? AND filters = ?", (ref, filters))
        return (rows[0][0], rows[0][1]) if rows else None

    def use_view(self, ref: str, filters: str, present: Callable[[str], bool], *, model_digest: str | None = None,
                 needed_credentials: bool | None = None, lease: str | None = None) -> tuple[str, int, int] | None:
        """A warm hit: the view ``ref`` (with ``filters``) was last recorded as, marked used now; or None.

        Found only if it was recorded from ``model_digest`` (when given: the
        manifest just resolved at the origin), its row is there and
        ``present(view)`` finds its tree. The lookup, the check of the tree and
        the mark are one write transaction, the lock under which gc and
        ``verify --delete`` take views away, so the view is whole when it is
        returned. ``needed_credentials`` (the origin was asked) is recorded as
        :meth:`record_origin_access` does. ``lease`` (one already taken) holds
        the view from the same transaction. Returns (view, bytes, files).
        """
        def body(db: sqlite3.Connection) -> tuple[str, int, int] | None:
            row = db.execute("SELECT r.view, r.model_digest, v.size, v.files FROM refs r "
                             "JOIN views v ON v.digest = r.view WHERE r.ref = ? AND r.filters = ?",
                             (ref, filters)).fetchone()
            if row is None or (model_digest is not None and row[1] != model_digest) or not present(row[0]):
                return None
            now = time.time()
            db.execute("UPDATE views SET last_used = ? WHERE digest = ?", (now, row[0]))
            db.execute("UPDATE refs SET updated = ? WHERE ref = ? AND filters = ?", (now, ref, filters))
            if lease is not None:
                db.execute("INSERT OR IGNORE INTO lease_resources (lease, kind, name) "
                           "SELECT id, 'view', ? FROM leases WHERE id = ?", (row[0], lease))
            if needed_credentials is not None:
                db.execute("INSERT OR REPLACE INTO origin_access (ref, needed_credentials, updated) VALUES (?, ?, ?)",
                           (ref, int(needed_credentials), now))
            return str(row[0]), int(row[2]), int(row[3])
        return self._atomic(body)

    def touch(self, view: str) -> None:
        """Mark a view as used now."""
        self._tx([("UPDATE views SET last_used = ? WHERE digest = ?", (time.time(), view))])

    def records(self) -> list[ViewRecord]:
        """Every ref with its view, newest use first (``leases`` counts mounts)."""
        rows = self._query(
            "SELECT r.ref, r.filters, r.model_digest, v.digest, v.size, v.files, v.last_used, "
            "EXISTS(SELECT 1 FROM lease_resources x JOIN leases l ON l.id = x.lease "
            "       WHERE x.kind = 'view' AND x.name = v.digest AND l.kind = 'pin'), "
            "(SELECT COUNT(*) FROM lease_resources x JOIN leases l ON l.id = x.lease "
            " WHERE x.kind = 'view' AND x.name = v.digest AND l.kind = 'mount') "
            "FROM refs r JOIN views v ON v.digest = r.view ORDER BY v.last_used DESC, r.ref"
        )
        return [ViewRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], bool(r[7]), r[8]) for r in rows]

    def blob_users(self, blob: str) -> list[str]:
        """Views that hold ``blob``."""
        return [r[0] for r in self._query("SELECT view FROM view_blobs WHERE blob = ?", (blob,))]

    def views(self) -> set[str]:
        """Every recorded view."""
        return {r[0] for r in self._query("SELECT digest FROM views")}

    def view_refs(self, view: str) -> list[str]:
        """The references recorded as resolving to ``view``."""
        return [r[0] for r in self._query("SELECT ref FROM refs WHERE view = ? ORDER BY ref", (view,))]

    # -- eviction ---------------------------------------------------------------

    def eviction_candidates(self) -> list[tuple[str, int, float]]:
        """(view, bytes its eviction frees, last used) of views no lease holds, least recently used first.

        The bytes are those of blobs no other view and no lease holds: a blob
        shared with a kept model stays, so evicting does not free it.
        """
        return [(r[0], r[1] or 0, r[2]) for r in self._query(
            "SELECT v.digest, (SELECT SUM(b.size) FROM view_blobs vb JOIN blobs b ON b.digest = vb.blob "
            "  WHERE vb.view = v.digest "
            "  AND NOT EXISTS (SELECT 1 FROM view_blobs o WHERE o.blob = vb.blob AND o.view != v.digest) "
            "  AND NOT EXISTS (SELECT 1 FROM lease_resources x WHERE x.kind = 'blob' AND x.name = vb.blob)), "
            "v.last_used FROM views v "
            "WHERE NOT EXISTS (SELECT 1 FROM lease_resources x WHERE x.kind = 'view' AND x.name = v.digest) "
            "ORDER BY v.last_used ASC")]

    def forget_view(self, view: str, *, unless_held: bool = False,
                    then: Callable[[], None] | None = None) -> bool:
        """Drop a view and the refs that pointed at it; False (and nothing done) if a lease holds it.

        ``then`` runs inside the same transaction, after the rows are gone and
        before they are committed: the caller renames the tree out of
        ``views/`` there, so no lease can be taken on a view whose tree is
        about to go, and a crash leaves the row or the tree, never a row
        whose tree is half deleted.
        """
        def body(db: sqlite3.Connection) -> bool:
            if unless_held and db.execute(
                    "SELECT 1 FROM lease_resources WHERE kind = 'view' AND name = ?", (view,)).fetchone():
                return False
            db.execute("DELETE FROM refs WHERE view = ?", (view,))
            db.execute("DELETE FROM view_blobs WHERE view = ?", (view,))
            db.execute("DELETE FROM views WHERE digest = ?", (view,))
            if then is not None:
                then()
            return True
        return self._atomic(body)

    def unheld_orphan(self, view: str, then: Callable[[], None]) -> bool:
        """Run ``then`` (move the tree away) if ``view`` has no row and no lease, in one transaction."""
        def body(db: sqlite3.Connection) -> bool:
            if db.execute("SELECT 1 FROM views WHERE digest = ?", (view,)).fetchone() or db.execute(
                    "SELECT 1 FROM lease_resources WHERE kind = 'view' AND name = ?", (view,)).fetchone():
                return False
            then()
            return True
        return self._atomic(body)

    # -- committed blobs --------------------------------------------------------------

    def blob_added(self, digest: str, size: int, *, leases: Sequence[str] = (), xxh3: str | None = None) -> None:
        """Count a blob about to be linked into ``blobs/``; ``leases`` hold it (their reservations shrink).

        ``xxh3`` is the local checksum of its bytes, kept for scrub (one already recorded stays).
        """
        stmts: list[tuple[str, Sequence[object]]] = [
            ("INSERT OR IGNORE INTO blobs (digest, size, xxh3) VALUES (?, ?, ?)", (digest, size, xxh3))]
        if xxh3 is not None:
            stmts.append(("UPDATE blobs SET xxh3 = ? WHERE digest = ? AND xxh3 IS NULL", (xxh3, digest)))
        for lease in set(leases):
            stmts += [("INSERT OR IGNORE INTO lease_resources (lease, kind, name) "
                       "SELECT id, 'blob', ? FROM leases WHERE id = ?", (digest, lease)),
                      ("UPDATE leases SET reserved = MAX(0, reserved - ?) WHERE id = ?", (size, lease))]
        self._tx(stmts)

    def remove_blob_unless_held(self, digest: str, unlink: Callable[[], int | None]) -> int | None:
        """If no lease holds ``digest``: ``unlink()`` it (inside the transaction) and uncount it.

        ``unlink`` returns the bytes it freed, or None when it kept the blob
        (a view still links it). Returns the same.
        """
        def body(db: sqlite3.Connection) -> int | None:
            if db.execute("SELECT 1 FROM lease_resources WHERE kind = 'blob' AND name = ?", (digest,)).fetchone():
                return None
            freed = unlink()
            if freed is not None:
                db.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
            return freed
        return self._atomic(body)

    def blob_xxh3(self, digest: str) -> str | None:
        """The xxh3-128 (hex) recorded for ``digest`` at commit, or None (not recorded, or no such blob)."""
        rows = self._query("SELECT xxh3 FROM blobs WHERE digest = ?", (digest,))
        return rows[0][0] if rows else None

    def set_blob_xxh3(self, digest: str, xxh3: str) -> None:
        """Record (or correct) the xxh3-128 of a blob whose sha256 was just checked good."""
        self._tx([("UPDATE blobs SET xxh3 = ? WHERE digest = ?", (xxh3, digest))])

    def blob_removed(self, digest: str) -> None:
        """Uncount a blob that was deleted."""
        self._tx([("DELETE FROM blobs WHERE digest = ?", (digest,))])

    def usage(self) -> int:
        """Bytes of committed blobs, as counted (no stat of the store)."""
        return int(self._query("SELECT COALESCE(SUM(size), 0) FROM blobs")[0][0])

    def reconcile_blobs(self, on_disk: dict[str, int], exists: Callable[[str], bool]) -> None:
        """Make the count match a scan of the disk (after a crash between counting and linking, or a hand edit).

        A counted blob the scan missed stays if ``exists`` finds it now, or a
        lease holds it (blobs are counted just before they are linked).
        """
        counted = dict(self._query("SELECT digest, size FROM blobs"))
        held = {r[0] for r in self._query("SELECT name FROM lease_resources WHERE kind = 'blob'")}
        stmts: list[tuple[str, Sequence[object]]] = [
            ("DELETE FROM blobs WHERE digest = ?", (d,)) for d in counted
            if d not in on_disk and d not in held and not exists(d)]
        stmts += [("INSERT OR REPLACE INTO blobs (digest, size) VALUES (?, ?)", (d, n))
                  for d, n in on_disk.items() if counted.get(d) != n]
        if stmts:
            self._tx(stmts)

    # -- leases and pins ----------------------------------------------------------

    def add_lease(self, lease_id: str, *, kind: str, owner: str, holder: str = "", views: Iterable[str] = (),
                  blobs: Iterable[str] = (), process: tuple[int, int] | None = None, reserved: int = 0) -> None:
        """Take (or retake, replacing what it held) the lease ``lease_id``; idempotent.

        ``process`` (pid, start time) makes the lease expire when that process
        is gone; mounts and pins have none and outlive the daemon.
        """
        if kind not in LEASE_KINDS:
            raise ValueError(f"lease kind {kind!r}")
        pid, start = process if process else (None, None)
        self._tx([
            ("INSERT OR REPLACE INTO leases (id, kind, owner, holder, pid, pid_start, reserved, created) "
             "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (lease_id, kind, owner, holder, pid, start, reserved, time.time())),
            ("DELETE FROM lease_resources WHERE lease = ?", (lease_id,)),
            *self._holds(lease_id, views, blobs),
        ])

    @staticmethod
    def _holds(lease_id: str, views: Iterable[str], blobs: Iterable[str]) -> list[tuple[str, Sequence[object]]]:
        sql = "INSERT OR IGNORE INTO lease_resources (lease, kind, name) SELECT id, ?, ? FROM leases WHERE id = ?"
        stmts: list[tuple[str, Sequence[object]]] = [(sql, ("view", v, lease_id)) for v in set(views)]
        return stmts + [(sql, ("blob", b, lease_id)) for b in set(blobs)]

    def hold(self, lease_id: str, *, views: Iterable[str] = (), blobs: Iterable[str] = ()) -> None:
        """Add views and blobs to an existing lease."""
        stmts = self._holds(lease_id, views, blobs)
        if stmts:
            self._tx(stmts)

    def lease_view(self, lease_id: str, view: str, *, kind: str, owner: str,
                   ref: tuple[str, str] | None = None) -> str | None:
        """Take ``lease_id`` on a recorded view (or on what ``ref`` = (ref, filters) resolves to) in one
        transaction with the lookup, so gc can never delete it between the two; mark it used.

        Returns the view, or None (no lease taken) when there is no such view.
        """
        def body(db: sqlite3.Connection) -> str | None:
            if ref is not None:
                row = db.execute("SELECT r.view FROM refs r JOIN views v ON v.digest = r.view "
                                 "WHERE r.ref = ? AND r.filters = ?", ref).fetchone()
            else:
                row = db.execute("SELECT digest FROM views WHERE digest = ?", (view,)).fetchone()
            if row is None:
                return None
            _hold_view(db, lease_id, str(row[0]), kind=kind, owner=owner)
            return str(row[0])
        return self._atomic(body)

    def release(self, lease_id: str, *, view: str, if_holder: str | None = None) -> None:
        """Stop holding ``view`` under ``lease_id`` (dropping the lease if it held nothing else).

        With ``if_holder``, only while the lease's holder is still that (a mount
        lease whose holder is empty was never published), in the same transaction.
        """
        def body(db: sqlite3.Connection) -> None:
            if if_holder is not None and not db.execute("SELECT 1 FROM leases WHERE id = ? AND holder = ?",
                                                        (lease_id, if_holder)).fetchone():
                return
            db.execute("DELETE FROM lease_resources WHERE lease = ? AND kind = 'view' AND name = ?", (lease_id, view))
            db.execute("DELETE FROM leases WHERE id = ? AND NOT EXISTS (SELECT 1 FROM lease_resources WHERE lease = ?)",
                       (lease_id, lease_id))
        self._atomic(body)

    def drop_lease(self, lease_id: str, *, if_holder: str | None = None) -> None:
        """Release a lease and everything it held (nothing happens if there is none).

        With ``if_holder``, only while the lease's holder is still that, in the same transaction.
        """
        if if_holder is None:
            self._tx([("DELETE FROM lease_resources WHERE lease = ?", (lease_id,)),
                      ("DELETE FROM leases WHERE id = ?", (lease_id,))])
            return
        self._tx([("DELETE FROM lease_resources WHERE lease = ? AND EXISTS "
                   "(SELECT 1 FROM leases WHERE id = ? AND holder = ?)", (lease_id, lease_id, if_holder)),
                  ("DELETE FROM leases WHERE id = ? AND holder = ?", (lease_id, if_holder))])

    def leases(self, kind: str | None = None) -> list[Lease]:
        """Every lease (of ``kind``) with what it holds."""
        rows = self._query("SELECT id, kind, owner, holder, pid, pid_start, reserved FROM leases "
                           + ("WHERE kind = ? " if kind else "") + "ORDER BY id", (kind,) if kind else ())
        held: dict[str, tuple[list[str], list[str]]] = {r[0]: ([], []) for r in rows}
        for lease, rkind, name in self._query("SELECT lease, kind, name FROM lease_resources ORDER BY name"):
            if lease in held:
                held[lease][0 if rkind == "view" else 1].append(name)
        return [Lease(r[0], r[1], r[2], r[3], r[4], r[5], r[6], tuple(held[r[0]][0]), tuple(held[r[0]][1]))
                for r in rows]

    def expire_leases(self) -> list[str]:
        """Drop the leases of processes that are gone; return their ids."""
        dead = [lease.id for lease in self.leases() if not lease.live()]
        for lease_id in dead:
            self.drop_lease(lease_id)
        return dead

    def reserve(self, lease_id: str, size: int, fits: Callable[[int], bool]) -> bool:
        """Set the lease's reservation to ``size`` if ``fits(usage + reserved by others + size)``; atomic."""
        def body(db: sqlite3.Connection) -> bool:
            used = db.execute("SELECT COALESCE(SUM(size), 0) FROM blobs").fetchone()[0]
            others = db.execute("SELECT COALESCE(SUM(reserved), 0) FROM leases WHERE id != ?",
                                (lease_id,)).fetchone()[0]
            if not fits(used + others + size):
                return False
            db.execute("UPDATE leases SET reserved = ? WHERE id = ?", (size, lease_id))
            return True
        return self._atomic(body)

    def reserved(self) -> int:
        """Bytes reserved by every lease (space pulls in progress will still need)."""
        return int(self._query("SELECT COALESCE(SUM(reserved), 0) FROM leases")[0][0])

    def pin(self, view: str, owner: str = "api") -> bool:
        """Pin a known view for ``owner`` so gc never evicts it; False if no such view."""
        return self.lease_view(f"pin:{owner}:{view}", view, kind="pin", owner=owner) is not None

    def pin_ref(self, ref: str, filters: str, owner: str, present: Callable[[str], bool]) -> tuple[str, str] | None:
        """(view, model digest) ``ref`` with ``filters`` was last recorded as, pinned for ``owner`` (as
        :meth:`pin` does, and marked used) in the same transaction as the lookup and ``present(view)`` (its
        tree is there); None, pinning nothing."""
        def body(db: sqlite3.Connection) -> tuple[str, str] | None:
            row = db.execute("SELECT r.view, r.model_digest FROM refs r JOIN views v ON v.digest = r.view "
                             "WHERE r.ref = ? AND r.filters = ?", (ref, filters)).fetchone()
            if row is None or not present(row[0]):
                return None
            _hold_view(db, f"pin:{owner}:{row[0]}", str(row[0]), kind="pin", owner=owner)  # the id pin() uses
            return str(row[0]), str(row[1])
        return self._atomic(body)

    def unpin(self, view: str, owner: str = "api") -> bool:
        """Remove ``owner``'s pin (another owner's pin stays); False if it had none."""
        lease_id = f"pin:{owner}:{view}"
        existed = bool(self._query("SELECT 1 FROM leases WHERE id = ?", (lease_id,)))
        self.drop_lease(lease_id)
        return existed

    # -- pushed blobs ---------------------------------------------------------------

    def record_pushed(self, registry: str, repository: str, digests: Iterable[str]) -> None:
        """Remember that ``repository`` on ``registry`` holds these blobs."""
        self._tx([("INSERT OR IGNORE INTO remote_blobs (registry, digest, repository) VALUES (?, ?, ?)",
                   (registry, d, repository)) for d in set(digests)])

    def pushed_to(self, registry: str, digest: str) -> list[str]:
        """Repositories on ``registry`` known to hold ``digest``."""
        return [r[0] for r in self._query(
            "SELECT repository FROM remote_blobs WHERE registry = ? AND digest = ? ORDER BY repository",
            (registry, digest))]

    # -- digests learnt from origins without sha256 -------------------------------

    def learn_digest(self, source_key: str, digest: str, size: int) -> None:
        """Remember that the origin's ``source_key`` names bytes with this sha256."""
        self._tx([("INSERT OR REPLACE INTO learned_digests (source_key, digest, size) VALUES (?, ?, ?)",
                   (source_key, digest, size))])

    def forget_learned(self, source_keys: Iterable[str]) -> None:
        """Drop what was learnt for ``source_keys`` (their bytes failed a later check)."""
        self._tx([("DELETE FROM learned_digests WHERE source_key = ?", (key,)) for key in source_keys])

    def learned_digest(self, source_key: str) -> str | None:
        """The sha256 learnt for ``source_key``, if any."""
        rows = self._query("SELECT digest FROM learned_digests WHERE source_key = ?", (source_key,))
        return rows[0][0] if rows else None

    def learned_digests(self) -> list[tuple[str, str]]:
        """Every (source key, sha256) learnt."""
        return [(r[0], r[1]) for r in self._query("SELECT source_key, digest FROM learned_digests", ())]

    # -- private models ----------------------------------------------------------------

    def record_origin_access(self, ref: str, needed_credentials: bool) -> None:
        """Remember whether ``ref``'s origin gave it only against credentials (its last pull)."""
        self._tx([("INSERT OR REPLACE INTO origin_access (ref, needed_credentials, updated) VALUES (?, ?, ?)",
                   (ref, int(needed_credentials), time.time()))])

    def origin_needed_credentials(self, ref: str) -> bool | None:
        """Whether ``ref`` needed credentials at its origin; None when unknown."""
        rows = self._query("SELECT needed_credentials FROM origin_access WHERE ref = ?", (ref,))
        return bool(rows[0][0]) if rows else None


def _hold_view(db: sqlite3.Connection, lease_id: str, view: str, *, kind: str, owner: str) -> None:
    """In the caller's transaction: ``lease_id`` (made if new) holds ``view``, which is marked used now."""
    now = time.time()
    db.execute("INSERT OR IGNORE INTO leases (id, kind, owner, created) VALUES (?, ?, ?, ?)", (lease_id, kind, owner, now))
    db.execute("INSERT OR IGNORE INTO lease_resources (lease, kind, name) VALUES (?, 'view', ?)", (lease_id, view))
    db.execute("UPDATE views SET last_used = ? WHERE digest = ?", (now, view))
