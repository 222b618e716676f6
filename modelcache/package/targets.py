"""Where packages go: an OCI registry, or an OCI image layout directory.

Every target takes blobs first, then manifests by digest, then the root
under its tag, so a failed push never moves a tag. Blobs the target already
has are skipped.

Registry pushes follow the distribution spec: a HEAD skips a blob the
repository has; a blob known to be in another repository of the same
registry is cross-mounted (``POST …/uploads/?mount=&from=``) instead of sent;
anything else is uploaded, in one PUT when smaller than ``chunk_size`` and
otherwise as a session of PATCH chunks of ``chunk_size`` bytes (default
32 MiB) closed by ``PUT ?digest=``. A chunk that fails is retried after
asking the registry how much of the upload it holds.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import random
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol
from urllib.parse import urlencode, urljoin

import aiohttp

from ..errors import DigestMismatch, InvalidContent, ModelCacheError, Unauthorized, Unavailable
from ..refs import OciRef
from ..sources import s3_client
from ..sources.base import SourceOptions
from ..sources.http import connection_failure, new_session, status_error
from ..sources.registry_auth import Authenticator, load_credentials
from .image import Document
from .layers import Layer, Segment, read_segments
from .layout import OCI_LAYOUT, LayoutWriter, tagged_index

Progress = Callable[[int], None]
_RETRIES = 5


class Target(Protocol):
    """A place a package can be published to."""

    name: str

    async def has(self, digest: str, size: int) -> bool:
        """True when the blob is already there."""
        ...

    async def put_blob(self, digest: str, size: int, segments: list[Segment], progress: Progress) -> str:
        """Store a blob; return how: "uploaded", "mounted" or "present"."""
        ...

    async def put_manifest(self, doc: Document, reference: str) -> None:
        """Store a manifest or index under ``reference`` (its digest, or the tag: last)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


def blob_segments(item: Layer | Document) -> list[Segment]:
    """The segments of a layer, or a document's bytes as one segment."""
    return item.segments if isinstance(item, Layer) else [item.body]


async def _pieces(segments: list[Segment], start: int, length: int) -> AsyncIterator[bytes]:
    """``length`` bytes of the segments from ``start``, read in a thread piece by piece."""
    it = read_segments(segments, start=start)
    left = length
    while left:
        piece = await asyncio.to_thread(next, it, None)
        if piece is None:
            raise InvalidContent("a source file ended early while being uploaded")
        piece = piece[:left]
        left -= len(piece)
        yield piece


class LayoutTarget:
    """An OCI image layout directory; the tag is written to index.json last."""

    def __init__(self, root: Path, tag: str) -> None:
        self.name = f"oci-layout://{root}:{tag}"
        self.tag = tag
        self._writer = LayoutWriter(root)

    async def has(self, digest: str, size: int) -> bool:
        path = self._writer.blobs / digest[7:]
        return await asyncio.to_thread(lambda: path.is_file() and path.stat().st_size == size)

    async def put_blob(self, digest: str, size: int, segments: list[Segment], progress: Progress) -> str:
        if await self.has(digest, size):
            return "present"
        await asyncio.to_thread(self._write, digest, segments, progress)
        return "uploaded"

    def _write(self, digest: str, segments: list[Segment], progress: Progress) -> None:
        tmp = self._writer.blobs / f".tmp-{secrets.token_hex(8)}"
        h = hashlib.sha256()
        try:
            with open(tmp, "wb") as out:
                for piece in read_segments(segments):
                    h.update(piece)
                    out.write(piece)
                    progress(len(piece))
                out.flush()
                os.fsync(out.fileno())
            if "sha256:" + h.hexdigest() != digest:
                raise DigestMismatch(f"{digest}: bytes changed between hashing and writing")
            os.replace(tmp, self._writer.blobs / digest[7:])
        finally:
            tmp.unlink(missing_ok=True)

    async def put_manifest(self, doc: Document, reference: str) -> None:
        digest = doc.descriptor["digest"]
        await self.put_blob(digest, len(doc.body), [doc.body], lambda n: None)
        if reference != digest:
            await asyncio.to_thread(self._writer.tag, doc.descriptor, reference)

    async def close(self) -> None:
        """Nothing to release."""


class RegistryTarget:
    """A repository in a registry (distribution spec push)."""

    def __init__(self, ref: OciRef, options: SourceOptions, *, chunk_size: int = 32 << 20,
                 mount_from: Callable[[str], list[str]] = lambda digest: []) -> None:
        self.ref = ref
        self.name = str(ref)
        scheme = "http" if options.plain_http or ref.is_loopback() else "https"
        self._base = f"{scheme}://{ref.host}/v2/{ref.repository}"
        self._scope = f"repository:{ref.repository}:pull,push"
        self._chunk = chunk_size
        self._mount_from = mount_from
        self._session = new_session(connections=options.connections, connect_timeout=options.connect_timeout,
                                    read_timeout=options.read_timeout)
        self._auth = Authenticator(self._session, ref.host, load_credentials(ref.host))

    async def close(self) -> None:
        await self._session.close()

    async def _request(self, method: str, url: str, *, headers: dict[str, str] | None = None,
                       body: Callable[[], AsyncIterator[bytes] | bytes] | None = None,
                       ok: tuple[int, ...]) -> aiohttp.ClientResponse:
        """One request with the auth challenge answered; the response is read and released.

        The registry's ``Authorization`` goes only to the registry's own origin:
        an upload ``Location`` may point anywhere (a storage front on another
        host or port), and what it is told is the session URL, not our login.
        """
        resp = await self._auth.request(method, url, scope=self._scope, home=self._base, what=self.name,
                                        headers=headers, body=body)
        try:
            await resp.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise Unavailable(f"{self.name}: {method} failed: {connection_failure(e)}") from e
        finally:
            resp.release()
        if resp.status in ok:
            return resp
        detail = (await resp.text())[:200].strip() if resp.status < 500 else ""
        raise status_error(resp, f"{self.name}: {method}", hint="check your registry login", detail=detail)

    async def has(self, digest: str, size: int) -> bool:
        resp = await self._request("HEAD", f"{self._base}/blobs/{digest}", ok=(200, 404))
        return resp.status == 200

    async def put_blob(self, digest: str, size: int, segments: list[Segment], progress: Progress) -> str:
        if await self.has(digest, size):
            return "present"
        for repo in self._mount_from(digest):
            if repo == self.ref.repository:
                continue
            query = urlencode({"mount": digest, "from": repo})
            resp = await self._request("POST", f"{self._base}/blobs/uploads/?{query}", ok=(201, 202))
            if resp.status == 201:
                return "mounted"
            await self._cancel(resp)  # 202: the registry opened an upload instead; drop it
        await self._upload(digest, size, segments, progress)
        return "uploaded"

    async def _cancel(self, resp: aiohttp.ClientResponse) -> None:
        location = resp.headers.get("Location")
        if location:
            try:
                await self._request("DELETE", urljoin(self._base, location), ok=(200, 202, 204, 404))
            except ModelCacheError:
                pass  # an abandoned upload session expires on its own

    async def _upload(self, digest: str, size: int, segments: list[Segment], progress: Progress) -> None:
        location = await self._open_session()
        if size <= self._chunk:
            url = _with_query(location, digest=digest)
            await self._with_retries(lambda: self._request(
                "PUT", url, ok=(201,), body=lambda: _pieces(segments, 0, size),
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)}))
            progress(size)
            return
        offset = failures = 0
        while offset < size:
            length = min(self._chunk, size - offset)
            try:
                resp = await self._request(
                    "PATCH", location, ok=(202,), body=functools.partial(_pieces, segments, offset, length),
                    headers={"Content-Type": "application/octet-stream", "Content-Length": str(length),
                             "Content-Range": f"{offset}-{offset + length - 1}"})
            except Unavailable as e:
                failures += 1
                if failures > _RETRIES:
                    raise
                await asyncio.sleep(e.retry_after if e.retry_after is not None else random.uniform(0.1, 1.0))
                location, offset = await self._resume(location)
                continue
            location = self._location(resp)
            offset += length
            progress(length)
        await self._with_retries(lambda: self._request(
            "PUT", _with_query(location, digest=digest), ok=(201,), headers={"Content-Length": "0"}))

    async def _open_session(self) -> str:
        resp = await self._request("POST", f"{self._base}/blobs/uploads/", ok=(202,),
                                   headers={"Content-Length": "0"})
        return self._location(resp)

    async def _resume(self, location: str) -> tuple[str, int]:
        """Where a chunked upload goes on after a failed chunk: (session URL, offset).

        From what the registry kept of this session; or, when the registry no
        longer knows the session by this URL, from 0 in a fresh one. CNCF
        Distribution refuses a session URL whose state token is older than the
        bytes it holds, which is what a chunk cut off midway leaves behind.
        """
        try:
            return location, await self._held(location)
        except (Unavailable, Unauthorized):
            raise
        except ModelCacheError:
            return await self._open_session(), 0

    async def _held(self, location: str) -> int:
        """Bytes of an upload session the registry holds (its Range header, ``0-LAST``).

        ``0-0`` is read as nothing held: CNCF Distribution answers it for an
        empty session (and for one byte); resuming at 0 is always safe, as a
        registry holding more refuses the chunk instead of corrupting the blob.
        """
        resp = await self._request("GET", location, ok=(204,))
        held = resp.headers.get("Range", "")
        last = held.rpartition("-")[2]
        return int(last) + 1 if last.isdigit() and int(last) > 0 else 0

    async def _with_retries(self, send: Callable) -> aiohttp.ClientResponse:
        for attempt in range(_RETRIES + 1):
            try:
                return await send()
            except Unavailable as e:
                if attempt == _RETRIES:
                    raise
                await asyncio.sleep(e.retry_after if e.retry_after is not None else random.uniform(0.1, 2 ** attempt))
        raise AssertionError("unreachable")

    def _location(self, resp: aiohttp.ClientResponse) -> str:
        location = resp.headers.get("Location")
        if not location:
            raise InvalidContent(f"{self.name}: upload answer without a Location")
        return urljoin(self._base + "/", location)

    async def put_manifest(self, doc: Document, reference: str) -> None:
        await self._with_retries(lambda: self._request(
            "PUT", f"{self._base}/manifests/{reference}", ok=(201,), body=lambda: doc.body,
            headers={"Content-Type": doc.descriptor["mediaType"]}))


def _with_query(url: str, **params: str) -> str:
    return url + ("&" if "?" in url else "?") + urlencode(params)


class S3LayoutTarget:
    """An OCI image layout stored in an S3 bucket under a prefix.

    ``PREFIX/oci-layout``, ``PREFIX/blobs/sha256/<hex>`` and, last,
    ``PREFIX/index.json``. Endpoint and credentials come from the AWS chain
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, profiles, IRSA); a custom
    endpoint gets path-style addressing, as MinIO and most S3 servers want.
    Blobs stream from their segments through boto3's managed (multipart)
    upload in threads.
    """

    def __init__(self, bucket: str, prefix: str, tag: str, *, concurrency: int = 4) -> None:
        self.name = f"s3://{bucket}/{prefix}:{tag}".replace("//:", "/:")
        self.bucket, self.prefix, self.tag = bucket, prefix.strip("/"), tag
        self._s3 = s3_client.client(concurrency * 2)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _call(self, fn: Callable, *args: object, **kwargs: object) -> object:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # botocore raises many kinds; s3_client maps them all
            raise s3_client.map_error(e, self.name) from e

    async def has(self, digest: str, size: int) -> bool:
        def head() -> bool:
            from botocore.exceptions import ClientError

            try:
                found = self._s3.head_object(Bucket=self.bucket, Key=self._key(f"blobs/sha256/{digest[7:]}"))
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise
            return int(found["ContentLength"]) == size

        return bool(await asyncio.to_thread(self._call, head))

    async def put_blob(self, digest: str, size: int, segments: list[Segment], progress: Progress) -> str:
        if await self.has(digest, size):
            return "present"
        reader = _SegmentReader(segments, progress)
        await asyncio.to_thread(self._call, self._s3.upload_fileobj, reader, self.bucket,
                                self._key(f"blobs/sha256/{digest[7:]}"))
        if "sha256:" + reader.hash.hexdigest() != digest:
            raise DigestMismatch(f"{digest}: bytes changed between hashing and uploading")
        return "uploaded"

    async def put_manifest(self, doc: Document, reference: str) -> None:
        digest = str(doc.descriptor["digest"])
        await self.put_blob(digest, len(doc.body), [doc.body], lambda n: None)
        if reference == digest:
            return
        await asyncio.to_thread(self._tag, doc, reference)

    def _tag(self, doc: Document, tag: str) -> None:
        import json

        from botocore.exceptions import ClientError

        self._call(self._s3.put_object, Bucket=self.bucket, Key=self._key("oci-layout"), Body=OCI_LAYOUT.encode())
        try:
            index = json.loads(self._s3.get_object(Bucket=self.bucket, Key=self._key("index.json"))["Body"].read())
        except ClientError:
            index = None
        index = tagged_index(index, doc.descriptor, tag)
        self._call(self._s3.put_object, Bucket=self.bucket, Key=self._key("index.json"),
                   Body=json.dumps(index, indent=2).encode(), ContentType="application/json")

    async def close(self) -> None:
        """Nothing to release (boto3 pools close with the client)."""


class _SegmentReader:
    """A file-like view of a layer's segments for boto3 (reads in its threads)."""

    def __init__(self, segments: list[Segment], progress: Progress) -> None:
        self._it = read_segments(segments)
        self._buf = b""
        self.hash = hashlib.sha256()
        self._progress = progress

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            piece = next(self._it, None)
            if piece is None:
                break
            self._buf += piece
        out, self._buf = (self._buf, b"") if n < 0 else (self._buf[:n], self._buf[n:])
        self.hash.update(out)
        self._progress(len(out))
        return out
