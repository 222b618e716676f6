"""`package` sends the registry's credentials to the registry's origin only.

A registry may hand out upload ``Location``s on another origin (blob storage
behind it). Here a front on one loopback port demands basic auth and rewrites
upload Locations to a second port; both forward to the real registry, and
the second records every header it receives.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from auth_support import auth_entry, docker_config
from faultproxy import BackgroundServer
from support import run_cli


class Forwarder(BackgroundServer):
    """Forwards to ``upstream``; records (method, path, headers); optionally demands auth, moves uploads."""

    def __init__(self, upstream: str, *, demand_auth: bool = False, uploads_to: str | None = None) -> None:
        super().__init__(self._handle)
        self.upstream, self.demand_auth, self.uploads_to = upstream, demand_auth, uploads_to
        self.seen: list[tuple[str, str, dict[str, str]]] = []

    async def _handle(self, request):
        from aiohttp import web

        self.seen.append((request.method, request.path, dict(request.headers)))
        if self.demand_auth and "Authorization" not in request.headers:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="test"'})
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length", "authorization")}
        headers["Host"] = request.host  # Locations the registry builds point back here
        body = await request.read()
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            async with session.request(request.method, f"http://{self.upstream}{request.path_qs}", headers=headers,
                                       data=body or None, allow_redirects=False) as up:
                data = await up.read()
                out = {k: v for k, v in up.headers.items()
                       if k.lower() not in ("transfer-encoding", "connection", "content-length", "content-encoding")}
                location = out.get("Location")
                if self.uploads_to and location and "/blobs/uploads/" in location:
                    parts = urlsplit(location)
                    out["Location"] = f"http://{self.uploads_to}{parts.path}" + (f"?{parts.query}" if parts.query else "")
                return web.Response(status=up.status, headers=out, body=data)


def test_upload_location_on_another_port_gets_no_authorization(registry, tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(os.urandom(3 << 20))  # over --upload-chunk: PATCHes, then a PUT
    (model / "config.json").write_text("{}")
    with Forwarder(registry.host) as storage, \
            Forwarder(registry.host, demand_auth=True, uploads_to=storage.host) as front:
        env = docker_config(tmp_path / "docker", front.host, auth_entry())
        proc = run_cli("package", str(model), "--to", f"oci://{front.host}/origins/m:v1", "--upload-chunk", "1M",
                       "--large-file", "1M", store=tmp_path / "s", env=env)
        assert proc.returncode == 0, proc.stderr
        moved = [(m, p, h) for m, p, h in storage.seen if "/blobs/uploads/" in p]
        assert {m for m, _p, _h in moved} >= {"PATCH", "PUT"}, storage.seen
        assert not any("Authorization" in h for _m, _p, h in storage.seen), storage.seen
        # The credentials were in use: the front saw them after its challenge.
        assert any(h.get("Authorization", "").startswith("Basic ") for _m, _p, h in front.seen)
    pulled = run_cli("pull", "-q", f"oci://{registry.host}/origins/m:v1", store=tmp_path / "s2")
    assert pulled.returncode == 0, pulled.stderr


def test_same_origin_compares_scheme_host_and_port() -> None:
    """One helper for the pull side (registry, Hub) and the push side: RFC 6454 origins."""
    from modelcache.sources.http import same_origin

    assert same_origin("http://Reg.example/v2/x", "http://reg.example:80/v2/y")
    assert same_origin("https://reg.example/a", "https://reg.example:443/b")
    assert not same_origin("http://127.0.0.1:5000/a", "http://127.0.0.1:5001/a")
    assert not same_origin("https://reg.example/a", "http://reg.example/a")
    assert not same_origin("https://reg.example/a", "https://cdn.reg.example/a")
