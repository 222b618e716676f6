"""A generic object store for the fake API server: any resource, list, watch, patch, status.

:class:`Objects` keeps every object of every registered resource under one
resource-version counter (as etcd does), and serves the REST shapes of the
Kubernetes API concepts page for them:

- ``GET`` a collection: a list whose ``metadata.resourceVersion`` a watch can
  start from; ``labelSelector`` (equality and existence) and
  ``fieldSelector=metadata.name=...`` are honoured;
- ``GET ...?watch=1``: a stream of JSON lines ``{"type", "object"}``
  (ADDED, MODIFIED, DELETED) after the given ``resourceVersion`` (none or "0":
  every current object first as ADDED), ``BOOKMARK`` events every
  :attr:`Objects.bookmark_interval` seconds when ``allowWatchBookmarks`` is
  set, ending after ``timeoutSeconds``. A watch from a version older than the
  retained history gets an ``ERROR`` event with a 410 ``Expired`` Status, and
  :meth:`Objects.expire` (a test hook) compacts the history and ends every
  open watch that way, as an API server does when etcd compacts;
- ``POST`` creates (409 AlreadyExists), ``PUT`` replaces, ``PATCH`` takes
  JSON merge patches (RFC 7386), JSON patches (RFC 6902: add, remove,
  replace, test) and strategic merge patches (merge patches whose lists of
  taints and conditions merge by key, ``$patch: delete`` removes an item),
  ``DELETE`` removes. Server-side apply is not served (415).
- Optimistic concurrency: a write naming a ``metadata.resourceVersion`` that
  is not the current one is a 409 Conflict; :meth:`Objects.conflict_next`
  forces the next writes to a resource to conflict (a test hook).
- The status subresource: for resources registered with it, writes to the
  object keep its status and writes to ``/status`` change only the status;
  ``metadata.generation`` moves when anything but metadata and status changes.

Registered out of the box: Nodes, Namespaces, coordination.k8s.io Leases,
discovery.k8s.io EndpointSlices and modelcache.io ModelPrewarms; more with
:meth:`Objects.register`.
"""

from __future__ import annotations

import copy
import itertools
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

PATH = (r"(?:/api/(?P<core>v1)|/apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
        r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[a-z0-9.-]+)(?:/(?P<name>[^/]+))?(?P<sub>/status)?")

_HISTORY = 10_000  # events kept for watches to resume from (older: 410 Gone)


@dataclass(frozen=True)
class Resource:
    """One kind of object the store serves."""

    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool
    status: bool = False  # has the status subresource

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


class Stream:
    """A streamed answer (a watch): the server writes each item as one JSON line, chunked."""

    def __init__(self, items: Iterator[dict]) -> None:
        self.items = items


def _status(code: int, reason: str, message: str) -> tuple[int, dict]:
    return code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                  "reason": reason, "code": code}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Objects:
    """Every object of every registered resource, with the history watches resume from."""

    def __init__(self) -> None:
        self.resources: dict[tuple[str, str], Resource] = {}
        self.bookmark_interval = 1.0
        self._objects: dict[tuple[str, str, str, str], dict] = {}  # (group, plural, ns, name) -> object
        self._events: list[tuple[int, str, str, str, dict]] = []  # (rv, group, plural, type, object)
        self._rv = itertools.count(1)
        self._current = 0
        self._compacted = 0  # watches from at or below this version get 410
        self._epoch = 0  # bumped by expire(): open watches end with 410
        self._cond = threading.Condition()
        self._conflicts: dict[tuple[str, bool], int] = {}  # (plural, status?) -> writes left to refuse
        self._watching: dict[str, int] = {}  # plural -> watches past their start (an expire() reaches them)
        self.closed = False
        for r in (Resource("", "v1", "nodes", "Node", False, True),
                  Resource("", "v1", "namespaces", "Namespace", False, True),
                  Resource("coordination.k8s.io", "v1", "leases", "Lease", True),
                  Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
                  Resource("modelcache.io", "v1alpha1", "modelprewarms", "ModelPrewarm", True, True)):
            self.register(r)

    def register(self, resource: Resource) -> None:
        """Serve ``resource`` too."""
        self.resources[(resource.group, resource.plural)] = resource

    # -- test hooks ---------------------------------------------------------------

    def expire(self) -> None:
        """Compact the history: every open watch ends with a 410 ERROR event, resuming from before fails."""
        with self._cond:
            self._compacted = self._current
            self._events.clear()
            self._epoch += 1
            self._cond.notify_all()

    def watching(self, plural: str) -> int:
        """How many watches of ``plural`` have started: each has its epoch, so expire() ends it with 410."""
        with self._cond:
            return self._watching.get(plural, 0)

    def conflict_next(self, plural: str, n: int = 1, *, status: bool = False) -> None:
        """Refuse the next ``n`` writes to ``plural`` (its /status when ``status``) with 409 Conflict."""
        with self._cond:
            self._conflicts[(plural, status)] = self._conflicts.get((plural, status), 0) + n

    def close(self) -> None:
        """End every open watch (the server is stopping)."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    # -- direct access for tests --------------------------------------------------

    def get(self, plural: str, name: str, namespace: str = "", *, group: str | None = None) -> dict | None:
        """A copy of one object, or None."""
        r = self._resource(plural, group)
        with self._cond:
            obj = self._objects.get((r.group, r.plural, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def items(self, plural: str, namespace: str | None = None, *, group: str | None = None) -> list[dict]:
        """Copies of every object of ``plural`` (in ``namespace`` if given)."""
        r = self._resource(plural, group)
        with self._cond:
            return [copy.deepcopy(o) for (g, p, ns, _), o in sorted(self._objects.items())
                    if g == r.group and p == r.plural and (namespace is None or ns == namespace)]

    def create(self, plural: str, obj: dict, namespace: str = "", *, group: str | None = None) -> dict:
        """Create an object as a client would (raises on an error answer)."""
        r = self._resource(plural, group)
        code, answer = self._create(r, namespace, obj)
        if code >= 300:
            raise AssertionError(answer)
        return answer

    def update(self, plural: str, name: str, namespace: str = "", *, group: str | None = None,
               change: Any = None, status: bool = False) -> dict:
        """Apply ``change(object)`` (which edits it in place) and store it as a write would."""
        r = self._resource(plural, group)
        obj = self.get(plural, name, namespace, group=r.group)
        assert obj is not None, f"no {plural} {namespace}/{name}"
        change(obj)
        code, answer = self._write(r, namespace, name, obj, status=status)
        if code >= 300:
            raise AssertionError(answer)
        return answer

    def delete(self, plural: str, name: str, namespace: str = "", *, group: str | None = None) -> None:
        r = self._resource(plural, group)
        code, answer = self._delete(r, namespace, name)
        if code >= 300:
            raise AssertionError(answer)

    def _resource(self, plural: str, group: str | None) -> Resource:
        found = [r for (g, p), r in self.resources.items() if p == plural and (group is None or g == group)]
        assert len(found) == 1, f"{plural}: {len(found)} resources"
        return found[0]

    # -- HTTP ---------------------------------------------------------------------

    def serve(self, request: Any) -> tuple[int, Any]:
        """Answer one request routed to :data:`PATH` (a fake_k8s.FakeRequest)."""
        m = request.match
        group = m["group"] or ""
        version = m["core"] or m["version"]
        r = self.resources.get((group, m["plural"]))
        if r is None or r.version != version:
            return _status(404, "NotFound", f"the server could not find the requested resource ({request.path})")
        ns, name, sub = m["ns"] or "", m["name"], bool(m["sub"])
        if r.namespaced != bool(ns) and not (request.method == "GET" and name is None and not ns):
            return _status(404, "NotFound", f"{r.plural} is {'' if r.namespaced else 'not '}namespaced")
        query = {k: v[-1] for k, v in parse_qs(request.query).items()}
        if name is None:
            if request.method == "GET":
                if query.get("watch") in ("1", "true"):
                    return self._watch(r, ns or None, query)
                return self._list(r, ns or None, query)
            if request.method == "POST":
                return self._create(r, ns, request.body)
        elif request.method == "GET":
            with self._cond:
                obj = self._objects.get((r.group, r.plural, ns, name))
                if obj is None:
                    return _status(404, "NotFound", f'{r.plural} "{name}" not found')
                return 200, copy.deepcopy(obj)
        elif request.method == "PUT":
            return self._write(r, ns, name, request.body, status=sub)
        elif request.method == "PATCH":
            return self._patch(r, ns, name, request.headers.get("content-type", ""), request.body, status=sub)
        elif request.method == "DELETE":
            return self._delete(r, ns, name)
        return _status(405, "MethodNotAllowed", f"{request.method} is not supported on {request.path}")

    def _list(self, r: Resource, ns: str | None, query: dict[str, str]) -> tuple[int, dict]:
        with self._cond:
            items = [copy.deepcopy(o) for (g, p, n, _), o in sorted(self._objects.items())
                     if g == r.group and p == r.plural and (ns is None or n == ns) and _selected(o, query)]
            rv = str(self._current)
        return 200, {"kind": r.kind + "List", "apiVersion": r.api_version, "metadata": {"resourceVersion": rv},
                     "items": items}

    def _watch(self, r: Resource, ns: str | None, query: dict[str, str]) -> tuple[int, Stream]:
        since = query.get("resourceVersion") or "0"
        bookmarks = query.get("allowWatchBookmarks") in ("1", "true")
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)

        def mine(group: str, plural: str, obj: dict) -> bool:
            return (group == r.group and plural == r.plural and _selected(obj, query)
                    and (ns is None or obj["metadata"].get("namespace", "") == ns))

        def events() -> Iterator[dict]:
            with self._cond:
                epoch = self._epoch
                if since == "0":  # the current state first, as synthetic ADDED events
                    pos = self._current
                    initial = [copy.deepcopy(o) for (g, p, _, _), o in sorted(self._objects.items())
                               if mine(g, p, o)]
                else:
                    pos = int(since)
                    initial = []
                    if pos < self._compacted:
                        initial = None
            if initial is None:
                yield {"type": "ERROR", "object": _status(410, "Expired", f"too old resource version: {since} "
                                                          f"({self._compacted})")[1]}
                return
            with self._cond:
                self._watching[r.plural] = self._watching.get(r.plural, 0) + 1
            try:
                yield from following(epoch, pos, initial)
            finally:
                with self._cond:
                    self._watching[r.plural] -= 1

        def following(epoch: int, pos: int, initial: list[dict]) -> Iterator[dict]:
            for obj in initial:
                yield {"type": "ADDED", "object": obj}
            next_bookmark = time.monotonic() + self.bookmark_interval
            while True:
                with self._cond:
                    now = time.monotonic()
                    wait = min(deadline, next_bookmark if bookmarks else deadline) - now
                    if wait > 0 and not self.closed and self._epoch == epoch and self._current <= pos:
                        self._cond.wait(wait)
                    if self.closed:
                        return
                    if self._epoch != epoch:
                        gone = _status(410, "Expired", "the watch expired: the history was compacted")[1]
                        batch: list[dict] = [{"type": "ERROR", "object": gone}]
                    else:
                        batch = [{"type": t, "object": copy.deepcopy(o)} for v, g, p, t, o in self._events
                                 if v > pos and mine(g, p, o)]
                        pos = self._current
                for event in batch:
                    yield event
                    if event["type"] == "ERROR":
                        return
                now = time.monotonic()
                if now >= deadline:
                    return
                if bookmarks and now >= next_bookmark:
                    next_bookmark = now + self.bookmark_interval
                    yield {"type": "BOOKMARK", "object": {"kind": r.kind, "apiVersion": r.api_version,
                                                          "metadata": {"resourceVersion": str(pos)}}}

        return 200, Stream(events())

    def _create(self, r: Resource, ns: str, body: Any) -> tuple[int, dict]:
        if not isinstance(body, dict) or not (body.get("metadata") or {}).get("name"):
            return _status(422, "Invalid", "metadata.name is required")
        obj = copy.deepcopy(body)
        name = obj["metadata"]["name"]
        with self._cond:
            if (r.group, r.plural, ns, name) in self._objects:
                return _status(409, "AlreadyExists", f'{r.plural} "{name}" already exists')
            meta = obj["metadata"]
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
            meta.pop("resourceVersion", None)
            if ns:
                meta["namespace"] = ns
            obj["kind"], obj["apiVersion"] = r.kind, r.api_version
            return 201, self._store(r, ns, name, obj, "ADDED")

    def _write(self, r: Resource, ns: str, name: str, body: Any, *, status: bool) -> tuple[int, dict]:
        if not isinstance(body, dict):
            return _status(400, "BadRequest", "the body must be an object")
        with self._cond:
            old = self._objects.get((r.group, r.plural, ns, name))
            if old is None:
                return _status(404, "NotFound", f'{r.plural} "{name}" not found')
            if self._conflicts.get((r.plural, status)):
                self._conflicts[(r.plural, status)] -= 1
                return self._conflict(r, name)
            sent_rv = (body.get("metadata") or {}).get("resourceVersion")
            if sent_rv and sent_rv != old["metadata"]["resourceVersion"]:
                return self._conflict(r, name)
            new = copy.deepcopy(body)
            if status and r.status:  # /status: only the status changes
                new = {**copy.deepcopy(old), "status": new.get("status")}
            elif r.status:  # the object: its status stays
                new["status"] = copy.deepcopy(old.get("status"))
            if new.get("status") is None:
                new.pop("status", None)
            meta = new.setdefault("metadata", {})
            for kept in ("uid", "creationTimestamp", "namespace", "name", "generation"):
                if kept in old["metadata"]:
                    meta[kept] = old["metadata"][kept]
            if _spec(new) != _spec(old):
                meta["generation"] = old["metadata"].get("generation", 1) + 1
            new["kind"], new["apiVersion"] = r.kind, r.api_version
            if _same(new, old):
                return 200, copy.deepcopy(old)  # nothing changed: no new version, no event
            return 200, self._store(r, ns, name, new, "MODIFIED")

    def _patch(self, r: Resource, ns: str, name: str, content_type: str, patch: Any, *,
               status: bool) -> tuple[int, dict]:
        kind = content_type.split(";")[0].strip()
        with self._cond:
            old = self._objects.get((r.group, r.plural, ns, name))
            if old is None:
                return _status(404, "NotFound", f'{r.plural} "{name}" not found')
            current = copy.deepcopy(old)
            current["metadata"].pop("resourceVersion")  # a patch naming one is checked by _write
            try:
                if kind == "application/merge-patch+json":
                    new = _merge(current, patch, strategic=False)
                elif kind == "application/strategic-merge-patch+json":
                    new = _merge(current, patch, strategic=True)
                elif kind == "application/json-patch+json":
                    new = _json_patch(old, patch)
                else:
                    return _status(415, "UnsupportedMediaType", f"the fake does not take {kind!r} patches")
            except _PatchError as e:
                return _status(422, "Invalid", f"the patch does not apply: {e}")
            if kind == "application/json-patch+json":
                new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            return self._write(r, ns, name, new, status=status)

    def _delete(self, r: Resource, ns: str, name: str) -> tuple[int, dict]:
        with self._cond:
            obj = self._objects.pop((r.group, r.plural, ns, name), None)
            if obj is None:
                return _status(404, "NotFound", f'{r.plural} "{name}" not found')
            rv = self._bump()
            obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(rv)}}
            self._record(rv, r, "DELETED", obj)
            return 200, copy.deepcopy(obj)

    # -- under the lock ---------------------------------------------------------------

    def _conflict(self, r: Resource, name: str) -> tuple[int, dict]:
        return _status(409, "Conflict", f'Operation cannot be fulfilled on {r.plural} "{name}": the object has '
                                        "been modified; please apply your changes to the latest version and try again")

    def _bump(self) -> int:
        self._current = next(self._rv)
        return self._current

    def _store(self, r: Resource, ns: str, name: str, obj: dict, event: str) -> dict:
        rv = self._bump()
        obj["metadata"]["resourceVersion"] = str(rv)
        self._objects[(r.group, r.plural, ns, name)] = obj
        self._record(rv, r, event, obj)
        return copy.deepcopy(obj)

    def _record(self, rv: int, r: Resource, event: str, obj: dict) -> None:
        self._events.append((rv, r.group, r.plural, event, copy.deepcopy(obj)))
        if len(self._events) > _HISTORY:
            dropped = self._events[: len(self._events) - _HISTORY]
            del self._events[: len(dropped)]
            self._compacted = dropped[-1][0]
        self._cond.notify_all()


def _spec(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "kind", "apiVersion")}


def _same(a: dict, b: dict) -> bool:
    strip = ("resourceVersion",)
    return ({**a, "metadata": {k: v for k, v in a["metadata"].items() if k not in strip}}
            == {**b, "metadata": {k: v for k, v in b["metadata"].items() if k not in strip}})


def _selected(obj: dict, query: dict[str, str]) -> bool:
    """Whether ``obj`` passes the request's labelSelector (k=v, k!=v, k, !k) and metadata.name fieldSelector."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    for term in filter(None, (query.get("labelSelector") or "").split(",")):
        if "!=" in term:
            k, v = term.split("!=", 1)
            ok = labels.get(k) != v
        elif "=" in term:
            k, v = term.split("=", 1)
            ok = labels.get(k.rstrip("=")) == v
        elif term.startswith("!"):
            ok = term[1:] not in labels
        else:
            ok = term in labels
        if not ok:
            return False
    for term in filter(None, (query.get("fieldSelector") or "").split(",")):
        k, _, v = term.partition("=")
        if k == "metadata.name" and meta.get("name") != v.lstrip("="):
            return False
    return True


class _PatchError(ValueError):
    pass


_MERGE_KEYS = {"taints": "key", "conditions": "type", "addresses": "type", "ownerReferences": "uid"}


def _merge(target: Any, patch: Any, *, strategic: bool, field: str = "") -> Any:
    """RFC 7386 merge (null deletes); strategic: lists named in _MERGE_KEYS merge item by item by their key."""
    if not isinstance(patch, dict):
        if strategic and isinstance(patch, list) and isinstance(target, list) and field in _MERGE_KEYS:
            key = _MERGE_KEYS[field]
            out = [copy.deepcopy(t) for t in target]
            for item in patch:
                if not isinstance(item, dict) or key not in item:
                    raise _PatchError(f"{field}: every item needs {key!r}")
                at = next((i for i, t in enumerate(out) if isinstance(t, dict) and t.get(key) == item[key]), None)
                if item.get("$patch") == "delete":
                    if at is not None:
                        out.pop(at)
                elif at is None:
                    out.append(copy.deepcopy(item))
                else:
                    out[at] = _merge(out[at], item, strategic=True)
            return out
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v, strategic=strategic, field=k)
    return out


def _json_patch(target: dict, ops: Any) -> dict:
    """RFC 6902: add, remove, replace and test (test failing: the patch does not apply)."""
    if not isinstance(ops, list):
        raise _PatchError("a JSON patch is a list of operations")
    doc = copy.deepcopy(target)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in str(op.get("path", "")).split("/")[1:]]
        if not parts:
            raise _PatchError("an operation needs a path")
        parent: Any = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent.get(p)
            if parent is None:
                raise _PatchError(f"{op['path']}: no such parent")
        last = parts[-1]
        kind = op.get("op")
        if kind == "test":
            have = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if have != op.get("value"):
                raise _PatchError(f"test of {op['path']} failed")
        elif kind in ("add", "replace"):
            if isinstance(parent, list):
                if last == "-":
                    parent.append(op["value"])
                elif kind == "add":
                    parent.insert(int(last), op["value"])
                else:
                    parent[int(last)] = op["value"]
            else:
                if kind == "replace" and last not in parent:
                    raise _PatchError(f"{op['path']}: nothing to replace")
                parent[last] = op["value"]
        elif kind == "remove":
            try:
                del parent[int(last) if isinstance(parent, list) else last]
            except (KeyError, IndexError) as e:
                raise _PatchError(f"{op['path']}: nothing to remove") from e
        else:
            raise _PatchError(f"unsupported op {kind!r}")
    return doc


def encode_line(item: dict) -> bytes:
    """One watch event as the server writes it."""
    return json.dumps(item).encode() + b"\n"
