"""S3 (and MinIO, SeaweedFS, …) as a source: ``s3://BUCKET/PREFIX``.

Every object under the prefix is a file of the model, at its key relative to
the prefix. If the prefix holds an OCI image layout (``oci-layout`` and
``index.json``) it is read as one instead, with the usual digest checks.

Endpoint and credentials come from the AWS chain (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, profiles, IRSA), or only from the keys given with the
request (a pod's secret; none given means anonymous); a custom endpoint gets
path-style addressing. Objects read with credentials count as private unless
an anonymous listing and HEAD of the first object prove them public. Listing (paginated) and signing run in threads through boto3;
the bytes come through presigned URLs on the lean HTTP reader, in parallel
ranges like every other source: boto3's ``get_object`` in threads pays a
Python-level copy per read and holds a thread per stream, which the
presigned path avoids (tools/bench_sources.py measures both).

S3 objects carry no sha256, so a file is fetched as an unverified blob and
stored under the sha256 computed on the way in; the (bucket, key, ETag) ->
sha256 mapping is kept in the index, so a second pull of the same objects,
or of the same bytes from any source, fetches nothing. Every range is asked
with ``If-Match: ETag``: an object that changes during a pull is an error,
not a silent mix of old and new bytes. A plain (non-multipart) ETag is the
object's MD5 and is checked as well; a multipart ETag (MD5 of the parts'
MD5s) is checked when the first and last parts (a HEAD each with
``partNumber``) show one part size, which lets peers serve the object too.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator

from ..errors import (
    DigestMismatch,
    InvalidContent,
    ModelCacheError,
    NotFound,
    Unauthorized,
    Unavailable,
)
from ..model import Blob, FileEntry, Model, standin_digest
from ..refs import S3Ref
from ..tree import safe_path
from .base import SourceOptions
from .credentials import SourceCredentials
from .http import check_range_response, connection_failure, exact_range
from .oci_manifest import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_MANIFEST_BYTES,
    media_type_of,
    model_from_manifest,
    parse_json,
    select_from_index,
)
from .proxy import refuse_plain
from .rawget import RawPool

REF_NAME = "org.opencontainers.image.ref.name"
_PRESIGN_SECONDS = 3600


def client(concurrency: int = 16, credentials: SourceCredentials | None = None, *, unsigned: bool = False):
    """A boto3 S3 client (path-style for custom endpoints).

    Credentials: the standard chain when ``credentials`` is None, else only its
    keys; ``unsigned`` (or ``credentials`` without keys) sends anonymous requests.
    """
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    keys: dict[str, str | None] = {}
    if credentials is not None and credentials.aws_access_key_id:
        keys = {"aws_access_key_id": credentials.aws_access_key_id,
                "aws_secret_access_key": credentials.aws_secret_access_key,
                "aws_session_token": credentials.aws_session_token}
    elif credentials is not None:
        unsigned = True
    extra = {"signature_version": UNSIGNED} if unsigned else {}
    config = Config(s3={"addressing_style": "path"} if endpoint else {}, retries={"mode": "standard"},
                    max_pool_connections=max(10, concurrency), **extra)
    return boto3.client("s3", config=config, **keys)


def map_error(e: Exception, what: str) -> ModelCacheError:
    """A botocore error as one of ours."""
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(e, NoCredentialsError):
        return Unauthorized(f"{what}: no AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)")
    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "InvalidToken"):
            return Unauthorized(f"{what}: S3 refused our credentials ({code})")
        if code in ("NoSuchBucket", "NoSuchKey", "404", "NotFound"):
            return NotFound(f"{what}: {code}")
        return ModelCacheError(f"{what}: S3 error {code}")
    return Unavailable(f"{what}: {connection_failure(e)}")


class S3Source:
    """Resolves and reads one ``s3://`` reference."""

    def __init__(self, ref: S3Ref, options: SourceOptions, *, learned=None) -> None:
        self.ref = ref
        self.name = str(ref)
        self._options = options
        self._learned = learned or (lambda key: None)  # source key -> sha256 already known
        self._s3 = client(options.connections, options.credentials)
        self._signed = options.credentials is None or bool(options.credentials.aws_access_key_id)
        self.needed_credentials = False  # set by resolve
        self._raw = RawPool(connect_timeout=options.connect_timeout, read_timeout=options.read_timeout,
                            threads=options.connections)
        self._objects: dict[str, tuple[str, str]] = {}  # blob digest -> (key, etag)
        self._urls: dict[str, tuple[float, str]] = {}  # key -> (signed at, presigned URL)
        self._prefix = ref.prefix.strip("/")

    async def _call(self, fn, *args, **kwargs):
        # boto3 takes HTTP(S)_PROXY by itself: never let it sign requests to an http:// endpoint through one.
        refuse_plain(self._s3.meta.endpoint_url, what=self.name, credentials=self._signed)
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except ModelCacheError:
            raise
        except Exception as e:  # botocore raises many kinds; map them once here
            raise map_error(e, self.name) from e

    def _list(self) -> list[dict]:
        paginator = self._s3.get_paginator("list_objects_v2")
        prefix = f"{self._prefix}/" if self._prefix else ""
        objects = []
        for page in paginator.paginate(Bucket=self.ref.bucket, Prefix=prefix):
            objects += [o for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        return objects

    def _public(self, key: str) -> bool:
        """Whether anyone may list the prefix and read ``key`` (two anonymous requests)."""
        anonymous = client(unsigned=True)
        prefix = f"{self._prefix}/" if self._prefix else ""
        try:
            anonymous.list_objects_v2(Bucket=self.ref.bucket, Prefix=prefix, MaxKeys=1)
            anonymous.head_object(Bucket=self.ref.bucket, Key=key)
        except Exception:  # refused, or anything else: not proven public, so private
            return False
        return True

    async def probe(self) -> None:
        """List one object under the prefix with our credentials (access check)."""
        prefix = f"{self._prefix}/" if self._prefix else ""
        page = await self._call(self._s3.list_objects_v2, Bucket=self.ref.bucket, Prefix=prefix, MaxKeys=1)
        if not page.get("Contents"):
            raise NotFound(f"{self.name}: no objects under this prefix")

    async def resolve(self) -> Model:
        objects = await self._call(self._list)
        if not objects:
            raise NotFound(f"{self.name}: no objects under this prefix")
        if self._signed:
            self.needed_credentials = not await asyncio.to_thread(self._public, objects[0]["Key"])
        prefix = f"{self._prefix}/" if self._prefix else ""
        keys = {o["Key"][len(prefix):]: o for o in objects}
        if "oci-layout" in keys and "index.json" in keys:
            return await self._resolve_layout(keys)
        etags = {o["Key"]: str(o["ETag"]).strip('"') for o in objects}
        unknown = [o for o in objects if "-" in etags[o["Key"]]
                   and not self._learned(f"s3://{self.ref.bucket}/{o['Key']}@{etags[o['Key']]}")]
        cuts = await asyncio.gather(*(asyncio.to_thread(self._part_size, o["Key"], etags[o["Key"]], int(o["Size"]))
                                      for o in unknown))
        multipart = {o["Key"]: (cut, etags[o["Key"]]) for o, cut in zip(unknown, cuts, strict=True) if cut}
        parts = []
        for rel, obj in sorted(keys.items()):
            etag = etags[obj["Key"]]
            source_key = f"s3://{self.ref.bucket}/{obj['Key']}@{etag}"
            known = self._learned(source_key)
            md5 = etag if len(etag) == 32 and "-" not in etag else None
            if known:
                blob = Blob(known, int(obj["Size"]))
            else:
                blob = Blob(standin_digest(source_key), int(obj["Size"]), verified=False, md5=md5,
                            md5_parts=multipart.get(obj["Key"]))
            self._objects[blob.digest] = (obj["Key"], etag)
            # A key is any string: "../x" must not become a path outside the model.
            parts.append(FileEntry(path=safe_path(rel, context=self.name), blob=blob, source_key=source_key))
        listing = "".join(f"{p.path}\0{p.source_key}\n" for p in parts).encode()
        return Model(ref=self.name, digest="sha256:" + hashlib.sha256(listing).hexdigest(), parts=tuple(parts))

    def _part_size(self, key: str, etag: str, size: int) -> int | None:
        """The part size of an object uploaded in parts, when its first and last parts (a HEAD each,
        ``partNumber``) show one size for all: what its ETag can be checked with (issue 11: peers may
        then serve it). None when they do not, or the server cannot say (blocks; in a thread)."""
        count = etag.rpartition("-")[2]
        if not count.isdigit() or int(count) < 1:
            return None
        n = int(count)
        try:
            first = self._s3.head_object(Bucket=self.ref.bucket, Key=key, PartNumber=1, IfMatch=f'"{etag}"')
            last = first if n == 1 else \
                self._s3.head_object(Bucket=self.ref.bucket, Key=key, PartNumber=n, IfMatch=f'"{etag}"')
            part, tail = int(first["ContentLength"]), int(last["ContentLength"])
        except Exception:  # not supported, refused, changed: no check, so the origin alone serves it
            return None
        if first.get("PartsCount") != n or not 0 < tail <= part or (n - 1) * part + tail != size:
            return None
        return part

    async def _resolve_layout(self, keys: dict[str, dict]) -> Model:
        def get(rel: str, limit: int = MAX_MANIFEST_BYTES) -> bytes:
            obj = self._s3.get_object(Bucket=self.ref.bucket, Key=keys[rel]["Key"])
            if obj["ContentLength"] > limit:
                raise InvalidContent(f"{self.name}: {rel} is over the 4 MiB limit")
            return obj["Body"].read()

        def verified(digest: str) -> bytes:
            rel = f"blobs/sha256/{digest[7:]}"
            if rel not in keys:
                raise NotFound(f"{self.name}: blob {digest} missing from the layout")
            body = get(rel)
            if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
                raise DigestMismatch(f"{self.name}: manifest {digest} does not match its digest")
            return body

        index = parse_json(await self._call(get, "index.json"), what=f"{self.name}/index.json")
        entries = [m for m in index.get("manifests", []) if isinstance(m, dict)]
        if self.ref.tag:
            entries = [m for m in entries if (m.get("annotations") or {}).get(REF_NAME) == self.ref.tag]
            if not entries:
                raise NotFound(f"{self.name}: tag {self.ref.tag!r} not in the layout")
        if len(entries) != 1:
            raise InvalidContent(f"{self.name}: the layout holds {len(entries)} images; pick one with --tag")
        digest = str(entries[0].get("digest"))
        doc = parse_json(await self._call(verified, digest), what=digest)
        if media_type_of(doc, entries[0].get("mediaType")) in INDEX_TYPES:
            digest = select_from_index(doc, what=self.name).digest
            doc = parse_json(await self._call(verified, digest), what=digest)
        if media_type_of(doc) not in MANIFEST_TYPES:
            raise InvalidContent(f"{self.name}: unsupported manifest type")
        model = model_from_manifest(doc, ref=self.name, digest=digest)
        for blob in model.blobs:
            key = keys.get(f"blobs/sha256/{blob.hex}")
            if key is None:
                raise NotFound(f"{self.name}: blob {blob.digest} missing from the layout")
            self._objects[blob.digest] = (key["Key"], str(key["ETag"]).strip('"'))
        return model

    async def _presigned(self, key: str) -> str:
        """A GET URL for ``key``, signed once and reused while it has over half its life left."""
        signed = self._urls.get(key)
        if signed is None or time.monotonic() - signed[0] > _PRESIGN_SECONDS / 2:
            url = await self._call(self._s3.generate_presigned_url, "get_object",
                                   Params={"Bucket": self.ref.bucket, "Key": key}, ExpiresIn=_PRESIGN_SECONDS)
            signed = self._urls[key] = (time.monotonic(), url)
        return signed[1]

    async def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes | memoryview]:
        key, etag = self._objects[blob.digest]
        what = f"s3://{self.ref.bucket}/{key}"
        url = await self._presigned(key)
        headers = {"Range": f"bytes={offset}-{offset + length - 1}", "If-Match": f'"{etag}"',
                   "Accept-Encoding": "identity"}
        resp = await self._raw.get(url, headers)
        try:
            if resp.status == 412:
                raise InvalidContent(f"{what} changed during the pull (its ETag is no longer {etag}); pull again")
            if resp.content_length is None:
                raise Unavailable(f"{what}: HTTP {resp.status} without a plain body")
            skip = check_range_response(resp.status, resp.headers, offset, length, what, size=blob.size)
            got_etag = resp.headers.get("etag", "").strip('"')
            if got_etag and got_etag != etag:
                raise InvalidContent(f"{what} changed during the pull (ETag {got_etag}, listed {etag}); pull again")
            async for piece in exact_range(resp.body(), offset, length, skip=skip, what=what):
                yield piece
        finally:
            resp.close()

    async def close(self) -> None:
        self._raw.close()

