"""S3 (and MinIO, SeaweedFS, …) as a source: ``s3://BUCKET/PREFIX``.

Every object under the prefix is a file of the model, at its key relative to
the prefix. If the prefix holds an OCI image layout (``oci-layout`` and
``index.json``) it is read as one instead, with the usual digest checks.

Endpoint and credentials come from the AWS chain (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, profiles, IRSA), or only from the keys given with the
request (a pod's secret; none given means anonymous); a custom endpoint gets
path-style addressing. Objects read with credentials count as private unless
an anonymous listing and HEAD of the first object prove them public. The
bucket is spoken to through :mod:`.s3_client`: at a custom endpoint (MinIO,
SeaweedFS, Ceph, R2) listing pages and URLs are signed there with SigV4 and
neither boto3 nor botocore's client is loaded; AWS itself goes through a
boto3 client built once, on first use. The bytes come through presigned URLs
on the lean HTTP reader, in parallel ranges like every other source: boto3's
``get_object`` in threads pays a Python-level copy per read and holds a
thread per stream, which the presigned path avoids (tools/bench_sources.py
measures both).

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
import time
from collections.abc import AsyncIterator

from ..errors import (
    DigestMismatch,
    InvalidContent,
    ModelCacheError,
    NotFound,
)
from ..model import Blob, FileEntry, Model, standin_digest
from ..refs import S3Ref
from ..tree import safe_path
from .base import SourceOptions
from .oci_manifest import (
    MAX_MANIFEST_BYTES,
    Fetched,
    choose_in_layout,
    media_type_of,
    parse_json,
    resolve_image,
)
from .rawget import RawPool
from .s3_client import map_error, open_bucket

_PRESIGN_SECONDS = 3600


class S3Source:
    """Resolves and reads one ``s3://`` reference."""

    def __init__(self, ref: S3Ref, options: SourceOptions, *, learned=None) -> None:
        self.ref = ref
        self.name = str(ref)
        self._options = options
        self._learned = learned or (lambda key: None)  # source key -> sha256 already known
        self._bucket = open_bucket(ref.bucket, what=self.name, connections=options.connections,
                                   credentials=options.credentials, timeout=options.connect_timeout + options.read_timeout)
        self._signed = options.credentials is None or bool(options.credentials.aws_access_key_id)
        self.needed_credentials = False  # set by resolve
        self._raw = RawPool(connect_timeout=options.connect_timeout, read_timeout=options.read_timeout,
                            threads=options.connections)
        self._objects: dict[str, tuple[str, str]] = {}  # blob digest -> (key, etag)
        self._urls: dict[str, tuple[float, str]] = {}  # key -> (signed at, presigned URL)
        self._prefix = ref.prefix.strip("/")
        self._under = f"{self._prefix}/" if self._prefix else ""  # what listed keys start with

    async def _call(self, fn, *args, **kwargs):
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except ModelCacheError:
            raise
        except Exception as e:  # botocore raises many kinds; map them once here
            raise map_error(e, self.name) from e

    def _list(self) -> list[dict]:
        return [o for page in self._bucket.pages(self._under) for o in page if not o["Key"].endswith("/")]

    async def probe(self) -> None:
        """List one object under the prefix with our credentials (access check)."""
        if await self._call(self._bucket.first, self._under) is None:
            raise NotFound(f"{self.name}: no objects under this prefix")

    async def resolve(self) -> Model:
        objects = await self._call(self._list)
        if not objects:
            raise NotFound(f"{self.name}: no objects under this prefix")
        if self._signed:
            self.needed_credentials = not await self._call(self._bucket.public, self._under, objects[0]["Key"])
        keys = {o["Key"][len(self._under):]: o for o in objects}
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
            first = self._bucket.head_part(key, 1, etag)
            last = first if n == 1 else self._bucket.head_part(key, n, etag)
        except ModelCacheError:  # refused, unreachable: no check, so the origin alone serves it
            return None
        if first is None or last is None:
            return None
        (part, parts), tail = first, last[0]
        if parts != n or not 0 < tail <= part or (n - 1) * part + tail != size:
            return None
        return part

    async def _resolve_layout(self, keys: dict[str, dict]) -> Model:
        def get(rel: str) -> bytes:
            return self._bucket.get(keys[rel]["Key"], MAX_MANIFEST_BYTES)

        def verified(digest: str) -> bytes:
            rel = f"blobs/sha256/{digest[7:]}"
            if rel not in keys:
                raise NotFound(f"{self.name}: blob {digest} missing from the layout")
            body = get(rel)
            if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
                raise DigestMismatch(f"{self.name}: manifest {digest} does not match its digest")
            return body

        async def fetch(blob: Blob | str) -> Fetched:
            assert isinstance(blob, Blob)  # a layout names its manifests by descriptor
            doc = parse_json(await self._call(verified, blob.digest), what=blob.digest)
            return doc, media_type_of(doc, blob.media_type), blob.digest

        index = parse_json(await self._call(get, "index.json"), what=f"{self.name}/index.json")
        root = choose_in_layout(index, tag=self.ref.tag, digest=None, what=self.name)
        model = await resolve_image(root, fetch, name=self.name)
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
            url = await self._call(self._bucket.url, key, _PRESIGN_SECONDS)
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
            got_etag = resp.headers.get("etag", "").strip('"')
            if got_etag and got_etag != etag and resp.status in (200, 206):
                raise InvalidContent(f"{what} changed during the pull (ETag {got_etag}, listed {etag}); pull again")
            async for piece in resp.ranged(offset, length, what=what, size=blob.size):
                yield piece
        finally:
            resp.close()

    async def close(self) -> None:
        self._raw.close()

