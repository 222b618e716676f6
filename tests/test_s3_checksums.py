"""The check an S3 pull takes of each object, best first (issue 13), against a real S3 server (SeaweedFS):
the sha256 S3 keeps makes the blob verified; else S3's CRC (CRC64NVME, CRC32C or CRC32; whole or
composite) checks bytes from the bucket alone instead of the ETag's MD5, while a peer's bytes still need
the ETag; objects too small for a HEAD, or that S3 keeps no checksum of, have the ETag alone."""

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
from modelcache.model import Blob, S3Checksum
from modelcache.refs import parse
from modelcache.sources import SourceOptions, s3
from modelcache.sources.s3 import S3Source
from modelcache.sources.s3_client import LeanBucket
from modelcache.store import Store, etag
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
    assert blobs["crc"].crc == S3Checksum("crc32", 0, _crc(data["crc"])) and not blobs["crc"].verified
    assert blobs["crc"].md5 == hashlib.md5(data["crc"]).hexdigest()
    composite = base64.b64encode(zlib.crc32(crcs).to_bytes(4, "big")).decode() + "-3"
    assert blobs["parts"].crc == S3Checksum("crc32", PART, composite) and blobs["parts"].md5_parts[0] == PART
    assert blobs["tiny"].crc == S3Checksum("crc32", 0, _crc(data["tiny"]))
    # From the bucket alone the CRC is the check (a quarter of an MD5); with peers the ETag, which a peer
    # cannot forge bytes to, as it can to a CRC.
    alone, peers = checks_for(blobs["parts"], peers=False), checks_for(blobs["parts"], peers=True)
    assert (alone.crc, alone.md5_parts, alone.md5) == (blobs["parts"].crc, None, None)
    assert (peers.crc, peers.md5_parts) == (None, blobs["parts"].md5_parts) and peers.origin_checked
    assert not dataclasses.replace(blobs["crc"], md5=None).origin_checked  # a CRC alone admits no peer


def _b64(value: int, width: int) -> str:
    return base64.b64encode(value.to_bytes(width, "big")).decode()


def test_crc64nvme_and_crc32c_are_taken_and_without_awscrt_the_etag(bucket, monkeypatch) -> None:
    """CRC64NVME (what S3 now keeps of objects uploaded without a checksum) and CRC32C, whole or (CRC32C)
    composite, are the checks of bytes from the bucket; where awscrt cannot compute them, the ETag is."""
    from awscrt import checksums
    from boto3.s3.transfer import TransferConfig

    bucket.create_bucket(Bucket="checks-crc64")
    data = {name: os.urandom(n) for name, n in (("nvme", 3000), ("c", 4000), ("cparts", 2 * PART + 9))}
    bucket.put_object(Bucket="checks-crc64", Key="m/nvme", Body=data["nvme"], ChecksumAlgorithm="CRC64NVME")
    bucket.put_object(Bucket="checks-crc64", Key="m/c", Body=data["c"], ChecksumAlgorithm="CRC32C")
    bucket.upload_fileobj(io.BytesIO(data["cparts"]), "checks-crc64", "m/cparts",
                          ExtraArgs={"ChecksumAlgorithm": "CRC32C"},
                          Config=TransferConfig(multipart_threshold=PART, multipart_chunksize=PART))
    blobs = _resolve("s3://checks-crc64/m")
    assert blobs["nvme"].crc == S3Checksum("crc64nvme", 0, _b64(checksums.crc64nvme(data["nvme"]), 8))
    assert blobs["c"].crc == S3Checksum("crc32c", 0, _b64(checksums.crc32c(data["c"]), 4))
    cparts = data["cparts"]
    crcs = b"".join(checksums.crc32c(cparts[i:i + PART]).to_bytes(4, "big") for i in range(0, len(cparts), PART))
    assert blobs["cparts"].crc == S3Checksum("crc32c", PART, _b64(checksums.crc32c(crcs), 4) + "-3")
    # The store's check agrees with S3's for each (the composite one fed in uneven pieces).
    for name, blob in blobs.items():
        crc = etag.S3Crc(blob.crc)
        for i in range(0, len(data[name]), 777_777):
            crc.update(data[name][i:i + 777_777])
        assert crc.value() == blob.crc.value, name

    monkeypatch.setattr(etag, "_crc_of", lambda algorithm: (zlib.crc32, 4) if algorithm == "crc32" else None)
    blobs = _resolve("s3://checks-crc64/m")
    assert blobs["nvme"].crc is None and blobs["nvme"].md5 == hashlib.md5(data["nvme"]).hexdigest()
    assert blobs["cparts"].crc is None and blobs["cparts"].md5_parts[0] == PART


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
        patch.setattr(LeanBucket, "checksums", lambda self, key, etag: {"crc64nvme": _b64(1234, 8)})
        with pytest.raises(DigestMismatch, match="CRC64NVME"):
            _fetch(store, "s3://checks-wrong/m")
    assert not store.content.has(sha256(body))
    _fetch(store, "s3://checks-wrong/m", lambda blob: dataclasses.replace(blob, md5="0" * 32))
    assert store.content.has(sha256(body))
