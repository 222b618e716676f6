"""List, then watch: a local cache of one resource kept by a thread, as client-go's informers do.

Guarantees:

- The cache starts from a full list; the watch starts from that list's
  resourceVersion, so no change between the two is missed, and asks for
  bookmarks, so a quiet watch still moves its version forward.
- A watch that ends (its timeout, a dropped connection) is resumed from the
  last version seen; a 410 Gone (the history was compacted) relists, and the
  keys of objects that vanished meanwhile are reported too, so a deletion is
  never lost.
- Every change only reports the object's key (``namespace/name``, or
  ``name`` when cluster-scoped) through ``notify``; whoever reacts reads the
  object from :meth:`Informer.get`. Acting on a key is therefore level
  triggered: a repeated or coalesced report is harmless.
- Errors other than 410 are logged and retried after a backoff; the thread
  never dies of them. :meth:`stop` ends the thread promptly (it shuts the
  watch's socket).

The ``kubernetes`` client is synchronous, so the loop runs in its own thread;
``notify`` must be thread-safe (the controller passes
``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

LIST_TIMEOUT = 30.0  # seconds a list may take before it counts as failed


def key_of(obj: dict) -> str:
    """``namespace/name``, or ``name`` for a cluster-scoped object."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))


class Informer:
    """One resource's cache, kept by list and watch in a thread."""

    def __init__(self, name: str, list_fn: Callable[..., Any], notify: Callable[[str], None], *,
                 watch_timeout: int = 300, backoff: float = 1.0, max_backoff: float = 30.0) -> None:
        self.name = name
        self._list_fn, self._notify = list_fn, notify
        self.watch_timeout, self.backoff, self.max_backoff = watch_timeout, backoff, max_backoff
        self.synced = threading.Event()  # set after the first full list
        self.relists = 0  # lists done after the first (a 410, an error): for tests and metrics
        self._cache: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._watch: Any = None
        self._thread = threading.Thread(target=self._run, name=f"informer-{name}", daemon=True)

    def start(self) -> Informer:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread: the watch's connection is shut, so a blocked read returns."""
        self._stopped.set()
        w = self._watch
        if w is not None:
            w.stop()
        self._thread.join(timeout)

    def get(self, key: str) -> dict | None:
        """A copy of the cached object, or None."""
        with self._lock:
            obj = self._cache.get(key)
            return copy.deepcopy(obj) if obj is not None else None

    def items(self) -> dict[str, dict]:
        """Copies of every cached object by key."""
        with self._lock:
            return copy.deepcopy(self._cache)

    def each(self, fn: Callable[[dict], Any]) -> list[Any]:
        """``fn`` of every cached object, under the lock and without copies (``fn`` must not keep or change them)."""
        with self._lock:
            return [fn(obj) for obj in self._cache.values()]

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._cache)

    # -- the thread ---------------------------------------------------------------

    def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        delay = self.backoff
        first = True
        while not self._stopped.is_set():
            try:
                version = self._list()
                if not first:
                    self.relists += 1
                first = False
                delay = self.backoff
                while not self._stopped.is_set():
                    version = self._watch_from(version)
            except ApiException as e:
                if self._stopped.is_set():
                    return
                if e.status == 410:  # compacted history: list again (client-go's relist)
                    log.info("watch of %s expired (410 Gone): listing again", self.name)
                    continue
                log.warning("list/watch of %s failed: %s %s; retrying in %.0fs", self.name, e.status, e.reason,
                            delay)
            except Exception as e:  # the API unreachable, a bad answer: retry, never die
                if self._stopped.is_set():  # stop() shut the watch's socket
                    return
                log.warning("list/watch of %s failed: %s: %s; retrying in %.0fs", self.name, type(e).__name__,
                            e, delay)
            self._stopped.wait(delay)
            delay = min(delay * 2, self.max_backoff)

    def _list(self) -> str:
        response = self._list_fn(_preload_content=False, _request_timeout=LIST_TIMEOUT)
        doc = json.loads(response.data)
        fresh = {key_of(o): o for o in doc.get("items") or []}
        with self._lock:
            gone = set(self._cache) - set(fresh)
            self._cache = fresh
        for key in sorted(gone | set(fresh)):
            self._notify(key)
        self.synced.set()
        return str(doc["metadata"]["resourceVersion"])

    def _watch_from(self, version: str) -> str:
        """Watch until the stream ends; the version to resume from. Raises ApiException(410) when expired."""
        from kubernetes import watch

        w = watch.Watch()
        self._watch = w
        if self._stopped.is_set():
            return version
        for event in w.stream(self._list_fn, resource_version=version, allow_watch_bookmarks=True,
                              timeout_seconds=self.watch_timeout, _request_timeout=self.watch_timeout + 30):
            kind, obj = event["type"], event["raw_object"]
            version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
            if kind == "BOOKMARK":
                continue
            key = key_of(obj)
            with self._lock:
                if kind == "DELETED":
                    self._cache.pop(key, None)
                else:
                    self._cache[key] = obj
            self._notify(key)
        return version
