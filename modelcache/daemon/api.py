"""The daemon's HTTP API (aiohttp): health, metrics, models, pulls, pins.

    GET  /healthz               200 while the process runs
    GET  /readyz                200 once the store is open and CSI serves, else 503
    GET  /metrics               Prometheus text format
    GET  /v1/models             cached models (pinned, mounted) and pull jobs
    POST /v1/pulls              {"ref", "include": [], "exclude": []} -> 202 {"id", ...}
    GET  /v1/pulls/{id}         {"state", "bytes_done", "bytes_total", "path", "error", ...}
    PUT  /v1/pins/{view}        pin a cached model (its view digest, from /v1/models) for ?owner= (default "api")
    DELETE /v1/pins/{view}      remove that owner's pin (another owner's pin stays)

Every error, ours or aiohttp's (404 for an unknown path, 405), is JSON
``{"code", "message"}`` with the status the error maps to.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from ..errors import InvalidReference, ModelCacheError, NotFound
from ..tree import Filters

log = logging.getLogger(__name__)


def error_response(error: ModelCacheError) -> web.Response:
    """A JSON error with the status our error maps to."""
    return web.json_response({"code": type(error).__name__, "message": str(error)}, status=error.http_status)


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


def build_app(daemon: Any) -> web.Application:
    """The aiohttp application over a running daemon (server.Daemon)."""
    app = web.Application(middlewares=[_errors])

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        ready = daemon.ready.is_set()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def metrics(request: web.Request) -> web.Response:
        body = await asyncio.to_thread(daemon.metrics.render)
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    async def models(request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(daemon.models_json))

    async def start_pull(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError as e:  # not JSON, or not even UTF-8
            raise InvalidReference(f"request body is not JSON: {e}") from e
        if not isinstance(body, dict) or not isinstance(body.get("ref"), str):
            raise InvalidReference('expected a JSON object with "ref" (and optional "include", "exclude" lists)')
        include, exclude = body.get("include") or [], body.get("exclude") or []
        if not all(isinstance(x, list) and all(isinstance(g, str) for g in x) for x in (include, exclude)):
            raise InvalidReference('"include" and "exclude" must be lists of glob strings')
        job = daemon.pulls.start(body["ref"], Filters.of(include, exclude))
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


def _view_digest(text: str) -> str:
    hex_ = text.removeprefix("sha256:")
    if len(hex_) != 64 or any(c not in "0123456789abcdef" for c in hex_):
        raise InvalidReference(f"{text!r} is not a view digest (sha256:<64 hex>)")
    return "sha256:" + hex_
