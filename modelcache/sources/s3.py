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

Most S3 objects carry no sha256, so a file is fetched as an unverified blob
and stored under the sha256 computed on the way in; the (bucket, key, ETag)
-> sha256 mapping is kept in the index, so a second pull of the same objects,
or of the same bytes from any source, fetches nothing. Every range is asked
with ``If-Match: ETag``: an object that changes during a pull is an error,
not a silent mix of old and new bytes. A plain (non-multipart) ETag is the
object's MD5 and is checked as well; a multipart ETag (MD5 of the parts'
MD5s) is checked when the first and last parts (a HEAD each with
``partNumber``) show one part size, which lets peers serve the object too.
Objects big enough get one more HEAD for the checksums S3 keeps (issue 13):
a whole-object sha256 makes the blob verified; a CRC (CRC64NVME, CRC32C or
CRC32) checks the bytes from the bucket alone in place of the MD5, at a
sixteenth to a quarter of its CPU (:func:`~modelcache.store.etag.checks_for`).

The listing is read a page at a time, and a caller may take each page's
files as it arrives (``resolve(early=…)``) to start fetching them before the
last page is in.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from ..errors import (
    DigestMismatch,
    InvalidContent,
    ModelCacheError,
    NotFound,
)
from ..model import Blob, FileEntry, Model, S3Checksum, standin_digest
from ..refs import S3Ref
from ..store.etag import crc_available
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
from .s3_client import Listed, map_error, open_bucket

Early = Callable[[list[FileEntry]], Awaitable[None]]  # takes the files of a listing page as it comes in

_PRESIGN_SECONDS = 3600
# Objects at least this big get a HEAD for S3's checksums: it costs less than their MD5 (8 MiB: ~15 ms of CPU).
CHECKSUM_HEAD_MIN = 8 << 20
_LAYOUT_NAMES = frozenset({"blobs", "index.json", "oci-layout"})  # what an OCI layout in the prefix holds


def _hex_of(value: str, size: int) -> str | None:
    """The hex of S3's base64 checksum ``value`` if it decodes to ``size`` bytes, else None."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == size else None


def _crc_check(sums: dict[str, str], etag: str, part: int | None) -> S3Checksum | None:
    """The cheapest CRC among S3's checksums of an object that can be checked here, or None.

    A whole-object CRC is taken as it is; a composite one (``<base64>-<parts>``) only when the ETag
    shows the same number of parts and their size is known (``part``).
    """
    for algorithm in ("crc64nvme", "crc32c", "crc32"):  # awscrt's SIMD CRCs first: a quarter of zlib's cost
        value = sums.get(algorithm, "")
        width = crc_available(algorithm) if value else None  # awscrt is loaded only for a CRC it computes
        if width is None:
            continue
        if "-" not in value and _hex_of(value, width):
            return S3Checksum(algorithm, 0, value)
        if part and value.rpartition("-")[2] == etag.rpartition("-")[2] and _hex_of(value.partition("-")[0], width):
            return S3Checksum(algorithm, part, value)
    return None


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

    async def probe(self) -> None:
        """List one object under the prefix with our credentials (access check)."""
        if await self._call(self._bucket.first, self._under) is None:
            raise NotFound(f"{self.name}: no objects under this prefix")

    async def resolve(self, *, early: Early | None = None) -> Model:
        """The model: every object under the prefix, or the image of the OCI layout the prefix holds.

        ``early``, when given, is handed the files of each listing page as soon as that page is in and
        its objects' checks are known (issue 13: the transfer starts before the full listing is in),
        all but what a layout would name (``blobs/…``, ``index.json``, ``oci-layout``): those wait for the
        whole listing, which says whether the prefix is a layout. A retried resolve hands them again.
        """
        pages = self._bucket.pages(self._under)
        objects: list[Listed] = []
        files: dict[str, FileEntry] = {}  # key -> its file, for objects already handed over
        while True:
            page = await self._call(next, pages, None)
            if page is None:
                break
            page = [o for o in page if not o["Key"].endswith("/")]
            if not objects and page and self._signed:
                self.needed_credentials = not await self._call(self._bucket.public, self._under, page[0]["Key"])
            objects += page
            if early is not None:
                now = [o for o in page if o["Key"][len(self._under):].partition("/")[0] not in _LAYOUT_NAMES]
                entries = await self._entries(now)
                files.update((o["Key"], e) for o, e in zip(now, entries, strict=True))
                if entries:
                    await early(entries)
        if not objects:
            raise NotFound(f"{self.name}: no objects under this prefix")
        keys = {o["Key"][len(self._under):]: o for o in objects}
        if "oci-layout" in keys and "index.json" in keys:
            return await self._resolve_layout(keys)
        rest = [o for o in objects if o["Key"] not in files]
        files.update((o["Key"], e) for o, e in zip(rest, await self._entries(rest), strict=True))
        parts = [files[obj["Key"]] for _, obj in sorted(keys.items())]
        listing = "".join(f"{p.path}\0{p.source_key}\n" for p in parts).encode()
        return Model(ref=self.name, digest="sha256:" + hashlib.sha256(listing).hexdigest(), parts=tuple(parts))

    async def _entries(self, objects: list[Listed]) -> list[FileEntry]:
        """The files of ``objects``, each with the best check of its bytes the origin gives (HEADs in threads)."""
        entries = await asyncio.gather(*(self._call(self._entry, o) for o in objects))
        for entry, obj in zip(entries, objects, strict=True):
            self._objects[entry.blob.digest] = (obj["Key"], str(obj["ETag"]).strip('"'))
        return list(entries)

    def _entry(self, obj: Listed) -> FileEntry:
        """One object as a file of the model (blocks: the index, HEADs; in a thread).

        Its blob, best first: the sha256 learnt from an earlier pull, or the one S3 keeps
        (``x-amz-checksum-sha256`` of the whole object: the blob is then verified, and found in
        the store before a byte is fetched); else unverified, with its ETag (MD5, or multipart)
        and S3's CRC of it (whole or composite) when S3 keeps one: bytes from the bucket alone
        are checked by the CRC, which costs a quarter of an MD5 or less (issue 13), a peer's by the ETag
        (:func:`~modelcache.store.etag.checks_for`). The checksums cost a HEAD, asked only for
        objects big enough that it is cheaper than their MD5.
        """
        key, size = obj["Key"], int(obj["Size"])
        etag = str(obj["ETag"]).strip('"')
        source_key = f"s3://{self.ref.bucket}/{key}@{etag}"
        # A key is any string: "../x" must not become a path outside the model.
        path = safe_path(key[len(self._under):], context=self.name)
        known = self._learned(source_key)
        if known:
            return FileEntry(path=path, blob=Blob(known, size), source_key=source_key)
        sums = self._bucket.checksums(key, etag) if size >= CHECKSUM_HEAD_MIN else {}
        digest = _hex_of(sums.get("sha256", ""), 32) if sums.get("type", "FULL_OBJECT").upper() == "FULL_OBJECT" \
            else None
        if digest:
            return FileEntry(path=path, blob=Blob("sha256:" + digest, size), source_key=source_key)
        part = self._part_size(key, etag, size) if "-" in etag else None
        md5 = etag if len(etag) == 32 and "-" not in etag else None
        blob = Blob(standin_digest(source_key), size, verified=False, md5=md5,
                    md5_parts=(part, etag) if part else None, crc=_crc_check(sums, etag, part))
        return FileEntry(path=path, blob=blob, source_key=source_key)

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

