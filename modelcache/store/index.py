"""The store's SQLite index: what the blobs and views mean.

Tables:

- ``refs``: a reference (with its include/exclude filters) -> the view it
  resolved to last, and the model digest it came from;
- ``views``: one row per built view: size, file count, created, last used;
- ``view_blobs``: which blobs a view holds (for gc and for ``ls``);
- ``layers``: the listing of an archive layer already unpacked into blobs, so
  a later pull of the same layer fetches nothing;
- ``leases`` and ``pins``: what must not be evicted (mounted, or pinned);
- ``learned_digests``: the sha256 learnt for bytes an origin names its own
  way (an S3 object's bucket, key and ETag), so they are not fetched again;
- ``remote_blobs``: which repositories of a registry we pushed a blob to,
  so a push to another repository there can cross-mount it;
- ``origin_access``: whether a reference needed credentials at its origin
  when it was last pulled (a private model: warm mounts check the pod's).

One connection per :class:`Index`, serialised by a lock; WAL mode and a busy
timeout let several processes share the file. Methods block; async callers
run them in a thread.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
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


def add_origin_access_table(db: sqlite3.Connection) -> None:
    """Additive schema step: ``origin_access`` (ref -> needed credentials at its origin, 0 or 1).

    Idempotent and independent of the other tables, so it can become one step of a
    versioned migration. A ref without a row was pulled before this table existed.
    """
    db.execute("CREATE TABLE IF NOT EXISTS origin_access ("
               "ref TEXT PRIMARY KEY, needed_credentials INTEGER NOT NULL, updated REAL NOT NULL)")


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
                self._db.executescript(_SCHEMA)
                add_origin_access_table(self._db)
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e) or attempt == 99:
                    raise
                time.sleep(0.05 + random.random() * 0.1)

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    def _tx(self, statements: Iterable[tuple[str, Sequence[object]]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

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

    def touch(self, view: str) -> None:
        """Mark a view as used now."""
        self._tx([("UPDATE views SET last_used = ? WHERE digest = ?", (time.time(), view))])

    def records(self) -> list[ViewRecord]:
        """Every ref with its view, newest use first."""
        rows = self._query(
            "SELECT r.ref, r.filters, r.model_digest, v.digest, v.size, v.files, v.last_used, "
            "EXISTS(SELECT 1 FROM pins p WHERE p.view = v.digest), "
            "(SELECT COUNT(*) FROM leases l WHERE l.view = v.digest) "
            "FROM refs r JOIN views v ON v.digest = r.view ORDER BY v.last_used DESC, r.ref"
        )
        return [ViewRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], bool(r[7]), r[8]) for r in rows]

    def blob_users(self, blob: str) -> list[str]:
        """Views that hold ``blob``."""
        return [r[0] for r in self._query("SELECT view FROM view_blobs WHERE blob = ?", (blob,))]

    # -- eviction ---------------------------------------------------------------

    def eviction_candidates(self) -> list[tuple[str, int, float]]:
        """(view, size, last used) of views neither pinned nor leased, least recently used first."""
        return [(r[0], r[1], r[2]) for r in self._query(
            "SELECT v.digest, v.size, v.last_used FROM views v "
            "WHERE NOT EXISTS (SELECT 1 FROM pins p WHERE p.view = v.digest) "
            "AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.view = v.digest) "
            "ORDER BY v.last_used ASC")]

    def forget_view(self, view: str) -> None:
        """Drop a view and the refs that pointed at it."""
        self._tx([
            ("DELETE FROM refs WHERE view = ?", (view,)),
            ("DELETE FROM view_blobs WHERE view = ?", (view,)),
            ("DELETE FROM views WHERE digest = ?", (view,)),
        ])

    # -- leases and pins ----------------------------------------------------------

    def add_lease(self, lease_id: str, view: str, holder: str) -> None:
        """Hold ``view`` for ``lease_id`` (a mounted volume); idempotent."""
        self._tx([("INSERT OR REPLACE INTO leases (id, view, holder, created) VALUES (?, ?, ?, ?)",
                   (lease_id, view, holder, time.time()))])

    def drop_lease(self, lease_id: str) -> None:
        """Release a lease (nothing happens if there is none)."""
        self._tx([("DELETE FROM leases WHERE id = ?", (lease_id,))])

    def leases(self) -> list[tuple[str, str, str]]:
        """Every lease as (id, view, holder)."""
        return [(r[0], r[1], r[2]) for r in self._query("SELECT id, view, holder FROM leases ORDER BY id")]

    def pin(self, view: str) -> bool:
        """Pin a known view so gc never evicts it; False if no such view."""
        if not self._query("SELECT 1 FROM views WHERE digest = ?", (view,)):
            return False
        self._tx([("INSERT OR IGNORE INTO pins (view, created) VALUES (?, ?)", (view, time.time()))])
        return True

    def unpin(self, view: str) -> bool:
        """Remove a pin; False if there was none."""
        existed = bool(self._query("SELECT 1 FROM pins WHERE view = ?", (view,)))
        self._tx([("DELETE FROM pins WHERE view = ?", (view,))])
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

    def learned_digest(self, source_key: str) -> str | None:
        """The sha256 learnt for ``source_key``, if any."""
        rows = self._query("SELECT digest FROM learned_digests WHERE source_key = ?", (source_key,))
        return rows[0][0] if rows else None

    # -- private models ----------------------------------------------------------------

    def record_origin_access(self, ref: str, needed_credentials: bool) -> None:
        """Remember whether ``ref``'s origin gave it only against credentials (its last pull)."""
        self._tx([("INSERT OR REPLACE INTO origin_access (ref, needed_credentials, updated) VALUES (?, ?, ?)",
                   (ref, int(needed_credentials), time.time()))])

    def origin_needed_credentials(self, ref: str) -> bool | None:
        """Whether ``ref`` needed credentials at its origin; None when unknown."""
        rows = self._query("SELECT needed_credentials FROM origin_access WHERE ref = ?", (ref,))
        return bool(rows[0][0]) if rows else None
