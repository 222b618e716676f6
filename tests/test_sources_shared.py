"""What every source and target says one way: HTTP status to error, redirects, layout choice, tags.

These are the shared functions that issue 13 brought the copies together
into; the tests drive them through each caller (a registry pull, a registry
push, the Hub's error mapping, the S3 error mapping) so a caller that goes
its own way again shows up here.
"""

from __future__ import annotations

import ast
import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from faultproxy import BackgroundServer

from modelcache.errors import InvalidContent, ModelCacheError, NotFound, Unauthorized, Unavailable
from modelcache.model import Blob
from modelcache.package.layout import tagged_index
from modelcache.package.targets import RegistryTarget
from modelcache.refs import parse
from modelcache.sources import SourceOptions
from modelcache.sources.hf import map_hub_error
from modelcache.sources.http import (
    check_range_response,
    error_for_status,
    follow_redirects,
    is_transient,
)
from modelcache.sources.oci_manifest import REF_NAME, choose_in_layout
from modelcache.sources.registry import RegistrySource
from modelcache.sources.s3_client import map_error

RETRIED = (408, 425, 429, 500, 502, 503, 504, 520)
FINAL = {400: ModelCacheError, 401: Unauthorized, 403: Unauthorized, 404: NotFound, 405: ModelCacheError,
         409: ModelCacheError, 410: ModelCacheError, 416: InvalidContent, 501: ModelCacheError, 505: ModelCacheError,
         511: ModelCacheError}
EXPECTED = {**{s: Unavailable for s in RETRIED}, **FINAL}


def test_the_retry_set() -> None:
    """Retried: 408, 425, 429 and the 5xx of a passing failure; not 501/505/511 nor any 4xx besides."""
    assert {s for s in range(100, 600) if is_transient(s)} == {408, 425, 429} | (
        set(range(500, 600)) - {501, 505, 506, 508, 510, 511})
    for status, kind in EXPECTED.items():
        error = error_for_status(status, "x", retry_after="7")
        assert type(error) is kind, status
        assert isinstance(error, Unavailable) == (status in RETRIED)
        if isinstance(error, Unavailable):
            assert error.retry_after == 7.0
    assert "not satisfiable" in str(error_for_status(416, "x")) and "size differs" in str(error_for_status(416, "x"))
    assert str(error_for_status(404, "x", not_found="tag gone")) == "tag gone"
    assert str(error_for_status(403, "x", hint="check HF_TOKEN")).endswith("(HTTP 403); check HF_TOKEN")


def _status_server():
    """A registry-shaped server that answers every request under ``/v2/s<N>/…`` with HTTP N."""
    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/v2/":
            return web.json_response({})
        status = int(request.path.split("/")[2][1:])
        return web.Response(status=status, body=b"nope", headers={"Retry-After": "0"})

    return BackgroundServer(handle)


@pytest.mark.parametrize("status", sorted(EXPECTED))
def test_every_caller_maps_a_status_alike(status: int) -> None:
    """Manifest GET, blob range GET, push request, Hub API error, S3 error: one status, one kind of error."""
    from botocore.exceptions import ClientError
    from huggingface_hub.utils import get_session, hf_raise_for_status

    kind = EXPECTED[status]
    seen: dict[str, type] = {}
    with _status_server() as server:
        async def main() -> None:
            options = SourceOptions(plain_http=True, connect_timeout=5, read_timeout=5)
            source = RegistrySource(parse(f"oci://{server.host}/s{status}/m:v1"), options)
            target = RegistryTarget(parse(f"oci://{server.host}/s{status}/m:v1"), options)
            try:
                for name, call in (("manifest", source.resolve), ("target", target._open_session)):
                    try:
                        await call()
                    except ModelCacheError as e:
                        seen[name] = type(e)
                blob = Blob("sha256:" + "a" * 64, 1000)
                try:
                    async for _ in source.read(blob, 0, 10):
                        pass
                except ModelCacheError as e:
                    seen["blob"] = type(e)
            finally:
                await source.close()
                await target.close()

        asyncio.run(main())
        # The Hub's client raises its own error for the status; map_hub_error reads it.
        try:
            hf_raise_for_status(get_session().get(f"http://{server.host}/v2/s{status}/api/models/org/model"))
        except Exception as e:
            seen["hub"] = type(map_hub_error(e, "org/model"))
    s3 = ClientError({"Error": {"Code": "SomethingElse"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
    seen["s3"] = type(map_error(s3, "s3://b/k"))
    if status == 416:  # only a range request gets one: the manifest, the push and the APIs never see it
        seen = {k: v for k, v in seen.items() if k == "blob"}
    assert seen and set(seen.values()) == {kind}, seen


def test_range_statuses() -> None:
    """check_range_response: 206 at the asked offset, 200 (whole body) skips to it, the rest is the shared map."""
    assert check_range_response(206, {"content-range": "bytes 10-19/100"}, 10, 10, "x") == 0
    assert check_range_response(200, {}, 10, 90, "x", size=100) == 10
    with pytest.raises(Unavailable):
        check_range_response(206, {"content-range": "bytes 0-9/100"}, 10, 10, "x")
    with pytest.raises(Unavailable) as waited:
        check_range_response(408, {"retry-after": "3"}, 0, 10, "x")
    assert waited.value.retry_after == 3.0


@dataclass
class _Hop:
    status: int
    headers: dict
    dropped: bool = False


def test_redirects_followed_checked_and_bounded() -> None:
    """Relative and absolute Locations are followed, each dropped; six hops or a file: URL are refused."""
    hops = {"http://a/1": _Hop(302, {"location": "/2"}), "http://a/2": _Hop(307, {"location": "http://b/3"}),
            "http://b/3": _Hop(200, {})}
    asked: list[str] = []

    async def send(url: str) -> _Hop:
        asked.append(url)
        return hops[url]

    url, resp = asyncio.run(follow_redirects("http://a/1", send, lambda r: setattr(r, "dropped", True), what="x"))
    assert (url, resp.status, asked) == ("http://b/3", 200, ["http://a/1", "http://a/2", "http://b/3"])
    assert hops["http://a/1"].dropped and hops["http://a/2"].dropped and not resp.dropped

    async def loop(url: str) -> _Hop:
        return _Hop(301, {"location": url + "x"})

    with pytest.raises(InvalidContent, match="too many redirects"):
        asyncio.run(follow_redirects("http://a/", loop, lambda r: None, what="x"))

    async def elsewhere(url: str) -> _Hop:
        return _Hop(302, {"location": "file:///etc/passwd"})

    with pytest.raises(InvalidContent, match="only http and https"):
        asyncio.run(follow_redirects("http://a/", elsewhere, lambda r: None, what="x"))


def _entry(n: int, tag: str | None) -> dict:
    return {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": f"sha256:{n:064x}", "size": 10,
            **({"annotations": {REF_NAME: tag}} if tag else {})}


def test_choosing_an_image_in_a_layout() -> None:
    """By digest, by tag, the only one; several without a name list their tags; none is not found."""
    index = {"manifests": [_entry(1, "v1"), _entry(2, "v2")]}
    assert choose_in_layout(index, tag="v2", digest=None, what="l").digest == f"sha256:{2:064x}"
    assert choose_in_layout(index, tag=None, digest=f"sha256:{1:064x}", what="l").digest == f"sha256:{1:064x}"
    assert choose_in_layout({"manifests": [_entry(3, None)]}, tag=None, digest=None, what="l").size == 10
    with pytest.raises(InvalidContent, match=r"holds 2 images; name one with :TAG or --tag \(v1, v2\)"):
        choose_in_layout(index, tag=None, digest=None, what="l")
    with pytest.raises(NotFound, match="tag 'v9' not found"):
        choose_in_layout(index, tag="v9", digest=None, what="l")
    with pytest.raises(NotFound, match="lists no images"):
        choose_in_layout({"manifests": []}, tag=None, digest=None, what="l")


def test_tagging_replaces_only_that_tag() -> None:
    """A tag moves to the new manifest; other tags stay; a missing index starts empty."""
    index = tagged_index(None, _entry(1, None), "v1")
    assert index["schemaVersion"] == 2 and [m["digest"][-1] for m in index["manifests"]] == ["1"]
    index = tagged_index(index, _entry(2, None), "v2")
    index = tagged_index(index, {**_entry(3, None), "annotations": {"x": "y"}}, "v1")
    assert [(m["digest"][-1], m["annotations"][REF_NAME]) for m in index["manifests"]] == [("2", "v2"), ("3", "v1")]
    assert index["manifests"][-1]["annotations"]["x"] == "y"


def _imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [a.name for a in node.names]
            found |= {f"{package}.{n.split('.')[0]}" for n in names}
    return found


def test_sources_import_no_cycle() -> None:
    """No module of modelcache.sources imports, even lazily, one that imports it back (base names no source)."""
    root = Path(__file__).resolve().parent.parent / "modelcache" / "sources"
    graph = {f"sources.{p.stem}": _imports(p, "sources") for p in root.glob("*.py") if p.stem != "__init__"}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = [m for m in graph if reaches(m, m, {m})]
    assert not cycles, cycles
    assert not graph["sources.base"] - {"sources.credentials"}
