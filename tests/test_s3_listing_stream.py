"""An S3 pull starts fetching each listing page's files as that page arrives, not after the last page
(issue 13), against a real S3 server (SeaweedFS, which honours max-keys) with two keys per page."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from support import sha256, tree_digests

from modelcache.pull import PullResult, pull
from modelcache.sources import s3_client
from modelcache.sources.s3_client import LeanBucket
from modelcache.store import Store
from modelcache.transfer import Engine
from modelcache.tree import Filters


def _pull(store: Store, ref: str, filters: Filters | None = None) -> PullResult:
    async def go() -> PullResult:
        engine = Engine(store.content)
        try:
            return await pull(store, engine, ref, filters=filters)
        finally:
            engine.close()
    return asyncio.run(go())


@pytest.fixture
def paged(s3_server, monkeypatch) -> None:
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(s3_client, "PAGE_KEYS", 2)


def test_the_first_pages_files_arrive_before_the_listing_ends(s3_server, paged, tmp_path: Path, monkeypatch) -> None:
    """Each later listing page is held back until the files of the page before are in the store: the
    pull finishes only if those were fetched while the listing was still going (without, it would wait
    out the bound and fail). Every file arrives once, the excluded one never."""
    s3 = s3_server.client()
    s3.create_bucket(Bucket="models-pages")
    files = {f"m/f{n}.bin": os.urandom((64 << 10) + n) for n in range(5)}
    for key, data in files.items():
        s3.put_object(Bucket="models-pages", Key=key, Body=data)
    store = Store(tmp_path / "store")
    pages = [list(files)[i:i + 2] for i in range(0, len(files), 2)]
    expected = {key: sha256(data) for key, data in files.items()}
    waited: list[bool] = []
    listing = LeanBucket._list

    def held_back(self, prefix: str, *, token: str | None = None, **kwargs):
        if token:  # a later page: only once the page before is in the store (bounded wait)
            before = [expected[k] for k in pages[len(waited)] if not k.endswith("f1.bin")]
            deadline = time.monotonic() + 20
            while not all(store.content.has(d) for d in before) and time.monotonic() < deadline:
                time.sleep(0.02)
            waited.append(all(store.content.has(d) for d in before))
        return listing(self, prefix, token=token, **kwargs)

    monkeypatch.setattr(LeanBucket, "_list", held_back)
    result = _pull(store, "s3://models-pages/m", Filters.of(exclude=["f1.bin"]))
    assert waited == [True, True]  # pages 2 and 3 came after the files of pages 1 and 2
    assert tree_digests(result.path) == {k.removeprefix("m/"): v for k, v in expected.items()
                                         if not k.endswith("f1.bin")}
    fetched = sum(len(d) for k, d in files.items() if not k.endswith("f1.bin"))
    assert result.stats.bytes_fetched == fetched == result.stats.bytes_total
    assert not store.content.has(expected["m/f1.bin"])


def test_a_layout_over_several_pages_is_read_as_one(s3_server, paged, tmp_path: Path) -> None:
    """What a layout holds (blobs/, index.json, oci-layout) waits for the whole listing: a prefix whose
    last page shows it is a layout is still read as one, and no blob of it is fetched as a plain file."""
    import json

    s3 = s3_server.client()
    s3.create_bucket(Bucket="models-layout-pages")
    weights = os.urandom(70 << 10)
    config = b"{}"
    digest = {b: sha256(b) for b in (weights, config)}
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "artifactType": "application/vnd.cncf.model.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.cncf.model.config.v1+json",
                                      "digest": digest[config], "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.cncf.model.weight.v1.raw",
                                       "digest": digest[weights], "size": len(weights),
                                       "annotations": {"org.cncf.model.filepath": "w.bin"}}]}).encode()
    index = json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha256(manifest),
         "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}).encode()
    objects = {f"l/blobs/sha256/{sha256(b)[7:]}": b for b in (weights, config, manifest)}
    objects |= {"l/index.json": index, "l/oci-layout": b'{"imageLayoutVersion": "1.0.0"}'}
    for key, data in objects.items():
        s3.put_object(Bucket="models-layout-pages", Key=key, Body=data)
    store = Store(tmp_path / "store")
    result = _pull(store, "s3://models-layout-pages/l")
    assert tree_digests(result.path) == {"w.bin": digest[weights]}
    assert result.stats.bytes_fetched == len(weights)  # the layer alone: not the manifest, not the index
