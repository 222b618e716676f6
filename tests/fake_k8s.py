"""An in-process fake of the Kubernetes API server, for tests (no real one can run here).

It listens on 127.0.0.1 (``http.server`` in a thread), answers the resources
registered with :meth:`FakeKubernetes.route`, records every request it got,
and writes a kubeconfig pointing at itself. Out of the box it serves what
the daemon's API authentication asks for:

- ``POST /apis/authentication.k8s.io/v1/tokenreviews``: a token in
  :attr:`FakeKubernetes.tokens` is authenticated as that user;
- ``POST /apis/authorization.k8s.io/v1/subjectaccessreviews``: allowed when
  a grant matches the user or one of its groups, the verb, the API group and
  the resource (grants are set directly with :meth:`grant`, or read from
  ClusterRoles and ClusterRoleBindings with :meth:`load_rbac`).

Objects of any resource (Nodes, Namespaces, Leases, EndpointSlices, ModelPrewarms,
and more registered on :attr:`FakeKubernetes.objects`) are kept by the generic
store of :mod:`fake_k8s_objects`: list, watch (resource versions, bookmarks, 410
Gone), create, replace, patch, delete, the status subresource and 409 Conflicts.
Other answers plug in as more routes, which come first: a handler takes a
:class:`FakeRequest` and returns a status and a JSON body (or a
:class:`fake_k8s_objects.Stream`, written as chunked JSON lines). Requests
must carry the kubeconfig's bearer token, as a real API server would insist;
anything else is a 401 Status.

The answers follow the shapes of the Kubernetes API reference (TokenReview
and SubjectAccessReview status; ``Status`` objects for errors), and the tests
prove them with the real ``kubernetes`` client.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from fake_k8s_objects import PATH, Objects, Stream, encode_line

CLIENT_TOKEN = "fake-k8s-client-token"  # what the kubeconfig hands its client (the daemon's own ServiceAccount)


@dataclass(frozen=True)
class User:
    """What a TokenReview says about a token."""

    username: str
    groups: tuple[str, ...] = ()
    uid: str = ""
    extra: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class FakeRequest:
    """One request as the fake received it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any  # parsed JSON, or None
    match: re.Match[str] | None = None  # the route's match (path parameters), set when routed


Handler = Callable[[FakeRequest], tuple[int, Any]]


def status(code: int, reason: str, message: str) -> tuple[int, dict]:
    """A ``Status`` error object, as the API server answers failures."""
    return code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                  "reason": reason, "code": code}


class FakeKubernetes:
    """A fake API server: a table of routes, the review tables, and a log of requests."""

    def __init__(self) -> None:
        self.tokens: dict[str, User] = {}
        self.grants: set[tuple[str, str, str, str]] = set()  # (user or group, api group, resource, verb)
        self.requests: list[FakeRequest] = []
        self.fail: tuple[int, Any] | None = None  # when set, every request gets this answer
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self.route("POST", "/apis/authentication.k8s.io/v1/tokenreviews", self._token_review)
        self.route("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", self._access_review)
        self.objects = Objects()  # answers what no route does (routes added by tests come first)
        self._objects_path = re.compile(PATH)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- set-up ---------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        """Serve ``method`` on paths fully matching the regex ``pattern`` with ``handler``."""
        self._routes.append((method, re.compile(pattern), handler))

    def grant(self, subject: str, resource: str, *verbs: str, group: str = "modelcache.io") -> None:
        """Allow a user (or every member of a group) ``verbs`` on ``resource`` in API ``group``."""
        for verb in verbs:
            self.grants.add((subject, group, resource, verb))

    def load_rbac(self, docs: Iterable[dict]) -> None:
        """Turn ClusterRoles and their ClusterRoleBindings into grants (ServiceAccounts, users, groups)."""
        docs = list(docs)
        roles = {d["metadata"]["name"]: d.get("rules", []) for d in docs if d.get("kind") == "ClusterRole"}
        for binding in (d for d in docs if d.get("kind") == "ClusterRoleBinding"):
            rules = roles[binding["roleRef"]["name"]]
            for s in binding["subjects"]:
                subject = (f"system:serviceaccount:{s['namespace']}:{s['name']}" if s["kind"] == "ServiceAccount"
                           else s["name"])
                for rule in rules:
                    for group in rule.get("apiGroups", []):
                        for resource in rule.get("resources", []):
                            self.grant(subject, resource, *rule.get("verbs", []), group=group)

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig whose current context is this server, with :data:`CLIENT_TOKEN` (JSON is YAML)."""
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": CLIENT_TOKEN}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }
        path.write_text(json.dumps(config))
        return path

    def received(self, path_suffix: str) -> list[FakeRequest]:
        """The requests whose path ends with ``path_suffix`` (e.g. ``tokenreviews``)."""
        with self._lock:
            return [r for r in self.requests if r.path.endswith(path_suffix)]

    # -- running --------------------------------------------------------------

    def start(self) -> FakeKubernetes:
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-k8s", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: close the port and every kept-alive connection, so clients find it down."""
        self.objects.close()  # open watches end
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> FakeKubernetes:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def answer(self, request: FakeRequest) -> tuple[int, Any]:
        """Dispatch one request to the first route matching its method and path."""
        for method, pattern, handler in self._routes:
            match = pattern.fullmatch(request.path)
            if match and method == request.method:
                return handler(dataclasses.replace(request, match=match))
        match = self._objects_path.fullmatch(request.path)
        if match:
            return self.objects.serve(dataclasses.replace(request, match=match))
        if any(p.fullmatch(request.path) for _, p, _ in self._routes):
            return status(405, "MethodNotAllowed", f"{request.method} is not supported on {request.path}")
        return status(404, "NotFound", f"the server could not find the requested resource ({request.path})")

    def _record(self, request: FakeRequest) -> tuple[int, Any]:
        with self._lock:
            self.requests.append(request)
        if self.fail is not None:
            return self.fail
        if request.headers.get("authorization") != f"Bearer {CLIENT_TOKEN}":
            return status(401, "Unauthorized", "Unauthorized")
        return self.answer(request)

    # -- the review APIs ------------------------------------------------------

    def _token_review(self, request: FakeRequest) -> tuple[int, dict]:
        spec = (request.body or {}).get("spec") or {}
        user = self.tokens.get(spec.get("token", ""))
        if user is None:
            review_status: dict[str, Any] = {"authenticated": False, "error": "invalid bearer token"}
        else:
            review_status = {"authenticated": True, "user": {
                "username": user.username, "uid": user.uid, "groups": list(user.groups), "extra": user.extra}}
        return 201, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "metadata": {},
                     "spec": spec, "status": review_status}

    def _access_review(self, request: FakeRequest) -> tuple[int, dict]:
        spec = (request.body or {}).get("spec") or {}
        attrs = spec.get("resourceAttributes") or {}
        subjects = [spec.get("user", ""), *(spec.get("groups") or [])]
        allowed = any((s, attrs.get("group", ""), attrs.get("resource", ""), attrs.get("verb", "")) in self.grants
                      for s in subjects)
        review_status = {"allowed": allowed}
        if not allowed:
            review_status["reason"] = "no RBAC policy matched"
        return 201, {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "metadata": {},
                     "spec": spec, "status": review_status}


def _handler_for(fake: FakeKubernetes) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client's urllib3 pool expects

        def setup(self) -> None:
            super().setup()
            with fake._lock:
                fake._connections.add(self.connection)

        def finish(self) -> None:
            with fake._lock:
                fake._connections.discard(self.connection)
            super().finish()

        def _serve(self) -> None:
            path, _, query = self.path.partition("?")
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                code, answer = status(400, "BadRequest", "request body is not JSON")
            else:
                headers = {k.lower(): v for k, v in self.headers.items()}
                code, answer = fake._record(FakeRequest(self.command, path, query, headers, body))
            if isinstance(answer, Stream):
                self._stream(code, answer)
                return
            data = json.dumps(answer).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _stream(self, code: int, stream: Stream) -> None:
            # A watch: one JSON object per line, each line its own chunk, flushed at once.
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for item in stream.items:
                    line = encode_line(item)
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:  # the client went away (a stopped watch)
                self.close_connection = True

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        def log_message(self, format: str, *args: object) -> None:  # quiet: the test log records requests
            pass

    return _Handler
