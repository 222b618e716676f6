"""The daemon's HTTP API (aiohttp): health, metrics, models, pulls, pins.

    GET  /healthz               200 while the process runs
    GET  /readyz                200 once the store is open and CSI serves, else 503
    GET  /metrics               Prometheus text format
    GET  /v1/models             cached models (pinned, mounted) and pull jobs
    POST /v1/pulls              {"ref", "include": [], "exclude": []} -> 202 {"id", ...}
                                (403 for a host path not allowed, 429 + Retry-After when too many
                                pulls are queued; a body that is not a small JSON object: 400 / 413)
    GET  /v1/pulls/{id}         {"state", "bytes_done", "bytes_total", "path", "error", ...}
    PUT  /v1/pins/{view}        pin a cached model (its view digest, from /v1/models) for ?owner= (default "api")
    DELETE /v1/pins/{view}      remove that owner's pin (another owner's pin stays)

Every error, ours or aiohttp's (404 for an unknown path, 405, 413), is JSON
``{"code", "message"}`` with the status the error maps to; an error that
carries ``retry_after`` (Busy, Unavailable) also sets ``Retry-After``.

Only /healthz, /readyz and /metrics are open, and with peer sharing on the
``/v1/peer/`` routes (:mod:`modelcache.p2p.server`), which check their own HMAC
signature instead of a bearer credential. Every other request needs a
bearer credential (reads too: model names may be private): no credential or a
bad one is a 401 with ``WWW-Authenticate: Bearer``, a known caller without the
right is a 403, and an unreachable review API a 503 (``auth``). What each
route asks for is a verb on a resource of API group ``modelcache.io``
(:data:`ACCESS`), so RBAC can grant it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any

from aiohttp import web

from ..errors import InvalidBody, InvalidReference, ModelCacheError, NotFound, Unauthenticated
from ..tree import Filters
from .auth import Access, Authenticator

log = logging.getLogger(__name__)

MAX_BODY = 256 << 10  # a pull request is a reference and a few globs; aiohttp answers 413 past this

PEER_PREFIX = "/v1/peer/"
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapers carry no credential

# (method, route) -> (resource, verb) in API group modelcache.io: the rights RBAC grants
# (daemonset/examples/rbac-prewarmer.yaml). The route's {id} or {view} is the resource name.
ACCESS = {
    ("GET", "/v1/models"): ("models", "list"),
    ("POST", "/v1/pulls"): ("pulls", "create"),
    ("GET", "/v1/pulls/{id}"): ("pulls", "get"),
    ("PUT", "/v1/pins/{view}"): ("pins", "create"),
    ("DELETE", "/v1/pins/{view}"): ("pins", "delete"),
}


def error_response(error: ModelCacheError) -> web.Response:
    """A JSON error with the status our error maps to (and Retry-After when it carries one)."""
    retry_after = getattr(error, "retry_after", None)
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else None
    return web.json_response({"code": type(error).__name__, "message": str(error)}, status=error.http_status,
                             headers=headers)


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    # The one place errors become HTTP: ours by their http_status, aiohttp's own
    # (unknown path, wrong method) and bugs in the same JSON shape.
    try:
        return await handler(request)
    except ModelCacheError as e:
        return error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        body = {"code": e.reason.replace(" ", ""), "message": f"{request.method} {request.path}: {e.reason}"}
        allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        return web.json_response(body, status=e.status, headers=allow)
    except Exception as e:
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response({"code": "Internal", "message": f"{type(e).__name__}: {e}"}, status=500)


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def _access(request: web.Request) -> Access | None:
    """What a routed request asks for; None for an unknown path or method (answered 404/405)."""
    resource = request.match_info.route.resource
    if resource is None:
        return None
    wanted = ACCESS.get((request.method, resource.canonical))
    if wanted is None:
        return None
    names = list(request.match_info.values())
    return Access(wanted[0], wanted[1], names[0] if names else "")


def _authentication(auth: Authenticator, *, peer_routes: bool = False) -> Any:
    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        # Closed unless named open: a route added later is never public by accident.
        # Peer routes sign every request themselves (HMAC, p2p.signing): they exist only with a secret.
        if request.path in OPEN_PATHS or (peer_routes and request.path.startswith(PEER_PREFIX)):
            return await handler(request)
        try:
            caller = await auth.authenticate(_bearer(request))
        except Unauthenticated as e:
            response = error_response(e)
            response.headers["WWW-Authenticate"] = 'Bearer realm="modelcache"'  # RFC 6750 section 3
            return response
        access = _access(request)
        if access is not None:
            await auth.authorize(caller, access)  # Forbidden (403) or Unavailable (503) go to _errors
        return await handler(request)

    return check


def build_app(daemon: Any, *, auth: Authenticator, peer: Any = None) -> web.Application:
    """The aiohttp application over a running daemon (server.Daemon), its callers checked by ``auth``;
    ``peer`` (a p2p.server.PeerServer) adds the peer routes."""
    app = web.Application(middlewares=[_errors, _authentication(auth, peer_routes=peer is not None)],
                          client_max_size=MAX_BODY)
    if peer is not None:
        peer.add_routes(app)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        # Ready once the store is open, and only while our CSI socket still answers (connect in a thread).
        ready = daemon.ready.is_set() and await asyncio.to_thread(daemon.csi_alive)
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def metrics(request: web.Request) -> web.Response:
        body = await asyncio.to_thread(daemon.metrics.render)
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    async def models(request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(daemon.models_json))

    async def start_pull(request: web.Request) -> web.Response:
        body = _json_object(await request.read())  # over MAX_BODY: aiohttp raises 413
        if not isinstance(body.get("ref"), str):
            raise InvalidBody('expected a JSON object with "ref" (and optional "include", "exclude" lists)')
        include, exclude = body.get("include") or [], body.get("exclude") or []
        if not all(isinstance(x, list) and all(isinstance(g, str) for g in x) for x in (include, exclude)):
            raise InvalidBody('"include" and "exclude" must be lists of glob strings')
        job = await daemon.pulls.start(body["ref"], Filters.of(include, exclude))
        return web.json_response(job.as_json(), status=202)

    async def get_pull(request: web.Request) -> web.Response:
        job = daemon.pulls.get(request.match_info["id"])
        if job is None:
            raise NotFound(f"no pull {request.match_info['id']!r}")
        return web.json_response(job.as_json())

    async def pin(request: web.Request) -> web.Response:
        view = _view_digest(request.match_info["view"])
        owner = request.query.get("owner", "api")
        if not owner or len(owner) > 253:
            raise InvalidReference("owner must be 1 to 253 characters")
        if request.method == "PUT":
            if not await asyncio.to_thread(daemon.store.index.pin, view, owner):
                raise NotFound(f"no cached model with view {view}")
            return web.json_response({"view": view, "owner": owner, "pinned": True})
        if not await asyncio.to_thread(daemon.store.index.unpin, view, owner):
            raise NotFound(f"{view} is not pinned by {owner!r}")
        return web.json_response({"view": view, "owner": owner, "pinned": False})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/pulls", start_pull)
    app.router.add_get("/v1/pulls/{id}", get_pull)
    app.router.add_route("PUT", "/v1/pins/{view}", pin)
    app.router.add_route("DELETE", "/v1/pins/{view}", pin)
    return app


def _json_object(raw: bytes) -> dict:
    """The body as a JSON object, or :class:`InvalidBody` saying what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidBody(f"request body is not UTF-8 (byte {e.start})") from None
    try:
        body = json.loads(text)
    except RecursionError:  # json's decoder recurses once per nesting level
        raise InvalidBody("request body is JSON nested too deeply") from None
    except ValueError as e:
        raise InvalidBody(f"request body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise InvalidBody('expected a JSON object with "ref" (and optional "include", "exclude" lists)')
    return body


def _view_digest(text: str) -> str:
    hex_ = text.removeprefix("sha256:")
    if len(hex_) != 64 or any(c not in "0123456789abcdef" for c in hex_):
        raise InvalidReference(f"{text!r} is not a view digest (sha256:<64 hex>)")
    return "sha256:" + hex_
