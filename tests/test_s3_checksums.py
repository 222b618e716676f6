"""The check an S3 pull takes of each object, best first (issue 13), against a real S3 server (SeaweedFS):
the sha256 S3 keeps makes the blob verified; else S3's CRC32 (whole or composite) checks bytes from the
bucket alone instead of the ETag's MD5, while a peer's bytes still need the ETag; objects too small for a
HEAD, or that S3 keeps no checksum of, have the ETag alone."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import io
import os
import zlib
from pathlib import Path

import pytest
from support import sha256

from modelcache.errors import DigestMismatch
from modelcache.model import Blob
from modelcache.refs import parse
from modelcache.sources import SourceOptions, s3
from modelcache.sources.s3 import S3Source
from modelcache.sources.s3_client import LeanBucket
from modelcache.store import Store
from modelcache.store.etag import checks_for
from modelcache.transfer import Engine, OriginOnly

PART = 5 << 20


@pytest.fixture
def bucket(s3_server, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(s3, "CHECKSUM_HEAD_MIN", 1)  # every object is worth a HEAD here
    return s3_server.client()


def _crc(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def _resolve(ref: str) -> dict[str, Blob]:
    async def go() -> dict[str, Blob]:
        source = S3Source(parse(ref), SourceOptions())
        try:
            return {p.path: p.blob for p in (await source.resolve()).parts}
        finally:
            await source.close()
    return asyncio.run(go())


def test_each_object_gets_the_best_check_its_origin_keeps(bucket) -> None:
    """S3's sha256 of a whole object makes its blob verified; its CRC32, whole or composite (parts of one
    size), comes beside the ETag."""
    from boto3.s3.transfer import TransferConfig

    bucket.create_bucket(Bucket="checks")
    data = {name: os.urandom(n) for name, n in (("sha", 1000), ("crc", 2000), ("parts", 2 * PART + 7),
                                                 ("tiny", 10))}
    bucket.put_object(Bucket="checks", Key="m/sha", Body=data["sha"], ChecksumAlgorithm="SHA256")
    bucket.put_object(Bucket="checks", Key="m/crc", Body=data["crc"], ChecksumAlgorithm="CRC32")
    bucket.put_object(Bucket="checks", Key="m/tiny", Body=data["tiny"], ChecksumAlgorithm="CRC32")
    with_crc = {"ChecksumAlgorithm": "CRC32"}
    bucket.upload_fileobj(io.BytesIO(data["parts"]), "checks", "m/parts", ExtraArgs=with_crc,
                          Config=TransferConfig(multipart_threshold=PART, multipart_chunksize=PART))
    crcs = b"".join(zlib.crc32(data["parts"][i:i + PART]).to_bytes(4, "big") for i in range(0, 2 * PART + 7, PART))
    blobs = _resolve("s3://checks/m")

    assert blobs["sha"] == Blob(sha256(data["sha"]), 1000)  # verified: found in the store before any fetch
    assert blobs["crc"].crc32 == (0, _crc(data["crc"])) and not blobs["crc"].verified
    assert blobs["crc"].md5 == hashlib.md5(data["crc"]).hexdigest()
    composite = base64.b64encode(zlib.crc32(crcs).to_bytes(4, "big")).decode() + "-3"
    assert blobs["parts"].crc32 == (PART, composite) and blobs["parts"].md5_parts[0] == PART
    assert blobs["tiny"].crc32 == (0, _crc(data["tiny"]))
    # From the bucket alone the CRC is the check (a quarter of an MD5); with peers the ETag, which a peer
    # cannot forge bytes to, as it can to a CRC.
    alone, peers = checks_for(blobs["parts"], peers=False), checks_for(blobs["parts"], peers=True)
    assert (alone.crc32, alone.md5_parts, alone.md5) == (blobs["parts"].crc32, None, None)
    assert (peers.crc32, peers.md5_parts) == (None, blobs["parts"].md5_parts) and peers.origin_checked
    assert not dataclasses.replace(blobs["crc"], md5=None).origin_checked  # a CRC alone admits no peer


def test_small_objects_and_objects_without_checksums_keep_the_etag(bucket, monkeypatch) -> None:
    """No checksum from S3, or an object too small to be worth a HEAD (none is asked): the ETag's MD5."""
    bucket.create_bucket(Bucket="checks-etag")
    body = os.urandom(5000)
    bucket.put_object(Bucket="checks-etag", Key="m/w", Body=body, ChecksumAlgorithm="CRC32")
    md5 = hashlib.md5(body).hexdigest()
    with monkeypatch.context() as patch:
        patch.setattr(LeanBucket, "checksums", lambda self, key, etag: {})  # a server that keeps none
        assert _resolve("s3://checks-etag/m")["w"].md5 == md5
    monkeypatch.setattr(s3, "CHECKSUM_HEAD_MIN", 1 << 20)  # too small to be worth a HEAD
    asked: list[str] = []
    checksums = LeanBucket.checksums
    monkeypatch.setattr(LeanBucket, "checksums", lambda self, key, etag: asked.append(key) or checksums(self, key, etag))
    assert _resolve("s3://checks-etag/m")["w"].md5 == md5
    assert asked == []


def _fetch(store: Store, ref: str, change=lambda blob: blob) -> None:
    async def go() -> None:
        source = S3Source(parse(ref), SourceOptions())
        engine = Engine(store.content)
        try:
            model = await source.resolve()
            await engine.fetch([change(p.blob) for p in model.parts], OriginOnly(source))
        finally:
            engine.close()
            await source.close()
    asyncio.run(go())


def test_bytes_from_the_bucket_are_checked_by_the_crc_instead_of_the_md5(bucket, monkeypatch,
                                                                           tmp_path: Path) -> None:
    """A CRC the bytes do not have fails the fetch (twice) and nothing is stored; with the right CRC, the
    MD5 is not even computed (a wrong one passes), which is the point: it cost 2 of 4.9 CPU s/GiB."""
    bucket.create_bucket(Bucket="checks-wrong")
    body = os.urandom(70 << 10)
    bucket.put_object(Bucket="checks-wrong", Key="m/w", Body=body, ChecksumAlgorithm="CRC32")
    store = Store(tmp_path / "store")
    with monkeypatch.context() as patch:
        patch.setattr(LeanBucket, "checksums", lambda self, key, etag: {"crc32": _crc(b"other bytes")})
        with pytest.raises(DigestMismatch, match="CRC32"):
            _fetch(store, "s3://checks-wrong/m")
    assert not store.content.has(sha256(body))
    _fetch(store, "s3://checks-wrong/m", lambda blob: dataclasses.replace(blob, md5="0" * 32))
    assert store.content.has(sha256(body))
