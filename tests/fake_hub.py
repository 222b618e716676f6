"""A small Hugging Face Hub for tests: the endpoints `huggingface_hub` and modelcache use.

No real Hub can run here, so this one is proven against the real client:
the tests run `huggingface_hub.snapshot_download` against it. It serves
`repo_info` (/api/models/{repo}[/revision/{rev}]), the recursive tree
(/api/models/{repo}/tree/{rev}), and resolve URLs (HEAD and GET with Range,
ETag, X-Repo-Commit, X-Linked-Etag, X-Linked-Size). Files of `lfs_threshold`
bytes or more are LFS files: their resolve URL redirects (302) to a separate
"CDN" server on another loopback address, which records every request's
headers so tests can check the token never reaches it. With ``link_ttl``
set, the redirect carries an expiry, as the Hub's signed CDN links do, and
the CDN answers 403 once it has passed. Gated repositories
answer 401 with X-Error-Code: GatedRepo unless the right token is sent.

A file's content is bytes, or a Path served from disk with sendfile (as a
real CDN would; the benchmark uses this so the server is not what it
measures). Each file's hashes are computed once, not per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

Content = bytes | Path


def _identity(data: Content) -> str:
    """What makes a commit's content distinct (a file on disk: its path, size and mtime)."""
    if isinstance(data, Path):
        st = data.stat()
        return f"{data}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(data).hexdigest()


@dataclass
class FakeRepo:
    """A repository: commits (sha -> files), refs (branch/tag -> sha), gating."""

    commits: dict[str, dict[str, Content]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated_token: str | None = None

    def commit(self, files: dict[str, Content], *, ref: str = "main") -> str:
        sha = hashlib.sha1(repr(sorted((k, _identity(v)) for k, v in files.items())).encode())
        sha_hex = sha.hexdigest()
        self.commits[sha_hex] = dict(files)
        self.refs[ref] = sha_hex
        return sha_hex


class FakeHub:
    """``with FakeHub() as hub:`` then HF_ENDPOINT=hub.endpoint."""

    def __init__(self, lfs_threshold: int = 1024, *, link_ttl: float | None = None,
                 cdn_delay: float = 0.0) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.link_ttl = link_ttl
        self.cdn_delay = cdn_delay  # seconds the CDN waits before answering (after checking the link)
        self.cdn_failures = 0  # the next N CDN requests answer 503 (Retry-After: 0)
        self.expired_refusals = 0
        self.lfs_threshold = lfs_threshold
        self.cdn_requests: list[dict[str, str]] = []
        self.hub_requests: list[tuple[str, str]] = []
        self._blobs: dict[str, Content] = {}
        self._digests: dict[int, tuple[Content, tuple[str, str, int]]] = {}
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.endpoint = self.cdn = ""

    def repo(self, name: str) -> FakeRepo:
        return self.repos.setdefault(name, FakeRepo())

    # -- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> FakeHub:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake hub did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        hub = web.Application()
        hub.router.add_get("/api/models/{org}/{name}", self._info)
        hub.router.add_get("/api/models/{org}/{name}/revision/{rev}", self._info)
        hub.router.add_get("/api/models/{org}/{name}/tree/{rev}", self._tree)
        hub.router.add_route("*", "/{org}/{name}/resolve/{rev}/{path:.+}", self._resolve)
        cdn = web.Application()
        cdn.router.add_route("*", "/blobs/{sha}", self._cdn)
        runners = []
        for app, host in ((hub, "127.0.0.1"), (cdn, "127.0.0.2")):
            runner = web.AppRunner(app, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, host, 0)
            await site.start()
            runners.append(runner)
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            if host == "127.0.0.1":
                self.endpoint = f"http://127.0.0.1:{port}"
            else:
                self.cdn = f"http://127.0.0.2:{port}"
        self._ready.set()
        await self._stop.wait()
        for runner in runners:
            await runner.cleanup()

    # -- the Hub API ----------------------------------------------------------------

    def _lookup(self, request: web.Request) -> tuple[str, FakeRepo, str, dict[str, Content]]:
        name = f"{request.match_info['org']}/{request.match_info['name']}"
        self.hub_requests.append((request.method, request.path_qs))
        repo = self.repos.get(name)
        if repo is None:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RepoNotFound"}, text="Repository not found")
        if repo.gated_token and request.headers.get("Authorization") != f"Bearer {repo.gated_token}":
            raise web.HTTPUnauthorized(headers={"X-Error-Code": "GatedRepo",
                                                "X-Error-Message": f"Access to model {name} is restricted."},
                                       text="gated")
        rev = request.match_info.get("rev", "main")
        sha = repo.refs.get(rev) or (rev if rev in repo.commits else None)
        if sha is None:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RevisionNotFound"}, text="Revision not found")
        return name, repo, sha, repo.commits[sha]

    def _digests_of(self, data: Content) -> tuple[str, str, int]:
        """(git blob sha1, sha256, size) of a file's content, computed once (the cache keeps
        the content alive, so its id is not reused)."""
        cached = self._digests.get(id(data))
        if cached is not None and cached[0] is data:
            return cached[1]
        size = data.stat().st_size if isinstance(data, Path) else len(data)
        git, sha = hashlib.sha1(b"blob %d\0" % size), hashlib.sha256()
        if isinstance(data, Path):
            with open(data, "rb") as f:
                while block := f.read(8 << 20):
                    git.update(block)
                    sha.update(block)
        else:
            git.update(data)
            sha.update(data)
        result = (git.hexdigest(), sha.hexdigest(), size)
        self._digests[id(data)] = (data, result)
        return result

    def _entry(self, path: str, data: Content) -> dict:
        git, sha, size = self._digests_of(data)
        entry: dict = {"type": "file", "path": path, "size": size, "oid": git}
        if size >= self.lfs_threshold:
            self._blobs[sha] = data
            entry["lfs"] = {"oid": sha, "size": size, "pointerSize": 134}
        return entry

    async def _info(self, request: web.Request) -> web.Response:
        name, repo, sha, files = self._lookup(request)
        # As the Hub: "gated" is false, "auto" or "manual".
        return web.json_response({"id": name, "modelId": name, "sha": sha, "private": False,
                                  "gated": "manual" if repo.gated_token else False,
                                  "siblings": [{"rfilename": p} for p in sorted(files)]})

    async def _tree(self, request: web.Request) -> web.Response:
        _name, _repo, _sha, files = self._lookup(request)
        entries = [self._entry(p, d) for p, d in sorted(files.items())]
        dirs = sorted({p.rsplit("/", 1)[0] for p in files if "/" in p})
        return web.json_response([{"type": "directory", "path": d, "oid": "0" * 40} for d in dirs] + entries)

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        _name, _repo, sha, files = self._lookup(request)
        path = request.match_info["path"]
        if path not in files:
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound"}, text="Entry not found")
        data = files[path]
        entry = self._entry(path, data)
        headers = {"X-Repo-Commit": sha}
        if "lfs" in entry:
            expiry = f"?expires={time.time() + self.link_ttl}" if self.link_ttl is not None else ""
            headers.update({"Location": f"{self.cdn}/blobs/{entry['lfs']['oid']}{expiry}",
                            "X-Linked-Etag": f'"{entry["lfs"]["oid"]}"', "X-Linked-Size": str(entry["size"]),
                            "ETag": f'"{entry["oid"]}"'})
            return web.Response(status=302, headers=headers)
        headers["ETag"] = f'"{entry["oid"]}"'
        return _ranged(request, data, headers)

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        self.cdn_requests.append(dict(request.headers))
        if "expires" in request.query and float(request.query["expires"]) < time.time():
            self.expired_refusals += 1
            raise web.HTTPForbidden(text="Request has expired")
        if self.cdn_failures:
            self.cdn_failures -= 1
            raise web.HTTPServiceUnavailable(headers={"Retry-After": "0"}, text="slow down")
        if self.cdn_delay:
            await asyncio.sleep(self.cdn_delay)
        data = self._blobs.get(request.match_info["sha"])
        if data is None:
            raise web.HTTPNotFound()
        return _ranged(request, data, {"ETag": f'"{request.match_info["sha"]}"'})


def _ranged(request: web.Request, data: Content, headers: dict[str, str]) -> web.StreamResponse:
    if isinstance(data, Path):  # aiohttp answers HEAD and Range itself, with sendfile
        return web.FileResponse(data, headers=headers)
    rng = request.headers.get("Range")
    if request.method == "HEAD":
        return web.Response(status=200, headers={**headers, "Content-Length": str(len(data))})
    if rng and rng.startswith("bytes="):
        start_s, _, end_s = rng[6:].partition("-")
        start = int(start_s)
        end = min(int(end_s) if end_s else len(data) - 1, len(data) - 1)
        return web.Response(status=206, body=memoryview(data)[start:end + 1],
                            headers={**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"})
    return web.Response(body=data, headers=headers)
