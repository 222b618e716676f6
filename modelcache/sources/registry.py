"""An OCI distribution registry as a source (pull side of the distribution spec).

Manifests are fetched with the OCI and Docker media types accepted, capped
at 4 MiB and verified against the digest they were asked by (or, for a tag,
against ``Docker-Content-Digest`` when the registry sends one). Blobs are read
by byte range. Redirects are followed by hand so that the registry's
``Authorization`` never travels to another host (blob storage behind a
redirect has its own signed URL).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:  # imported where used: a warm pull from a plain registry never needs it (0.2 s+ to import)
    import aiohttp

from ..errors import DigestMismatch, InvalidContent, Unavailable
from ..model import Blob, Model
from ..refs import OciRef
from .base import SourceOptions
from .http import (
    body_pieces,
    check_range_response,
    connection_failure,
    follow_redirects,
    new_session,
    status_error,
)
from .oci_manifest import (
    ACCEPT,
    MAX_MANIFEST_BYTES,
    Fetched,
    media_type_of,
    parse_json,
    resolve_image,
)
from .rawget import RawPool, RawResponse
from .registry_auth import Authenticator, credentials_in, load_credentials


class RegistrySource:
    """Resolves and reads one ``oci://`` reference."""

    def __init__(self, ref: OciRef, options: SourceOptions) -> None:
        self.ref = ref
        self.name = str(ref)
        scheme = "http" if options.plain_http or ref.is_loopback() else "https"
        self._base = f"{scheme}://{ref.host}/v2/{ref.repository}"
        self._scope = f"repository:{ref.repository}:pull"
        self._options = options
        self._session: aiohttp.ClientSession | None = None
        self._auth: Authenticator | None = None
        self._raw = RawPool(connect_timeout=options.connect_timeout, read_timeout=options.read_timeout,
                            threads=options.connections)
        self._redirects = False

    @property
    def session(self) -> aiohttp.ClientSession:
        """The HTTP session, created on first use (inside the event loop)."""
        if self._session is None:
            o = self._options
            self._session = new_session(connections=o.connections, connect_timeout=o.connect_timeout,
                                        read_timeout=o.read_timeout)
            given = o.credentials
            if given is None:
                self._auth = Authenticator(self._session, self.ref.host, load_credentials(self.ref.host))
            else:  # a pod's secret: its logins only, never the daemon's
                where = "the volume's secret"
                self._auth = Authenticator(self._session, self.ref.host,
                                           credentials_in(given.docker_auths(), self.ref.host, where=where),
                                           where=where)
        return self._session

    @property
    def needed_credentials(self) -> bool:
        """Whether the registry demanded a login that we answered with credentials."""
        return self._auth is not None and self._auth.used_credentials

    async def probe(self) -> None:
        """Read the reference's manifest (access check; the Model is not built)."""
        await self._get_manifest(self.ref.reference, expect=self.ref.digest)

    async def close(self) -> None:
        """Close the HTTP session."""
        self._raw.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _send(self, url: str, headers: Mapping[str, str]) -> aiohttp.ClientResponse:
        """GET with auth challenges answered and redirects followed safely."""
        self.session  # noqa: B018 - creates the authenticator on first use
        auth = self._auth
        assert auth is not None

        def send(at: str) -> Awaitable[aiohttp.ClientResponse]:
            return auth.request("GET", at, scope=self._scope, home=self._base, what=urlsplit(at).netloc,
                                headers=headers)

        _, resp = await follow_redirects(url, send, lambda r: r.release(), what=self.name)
        return resp

    async def _get_manifest(self, reference: str, *, expect: str | None) -> tuple[dict, str, str]:
        """(document, media type, digest) of a manifest, size-capped and verified."""
        what = f"{self.ref.host}/{self.ref.repository}@{reference}" if expect else self.name
        url = f"{self._base}/manifests/{reference}"
        found = await self._raw_manifest(url, what)
        if found is not None:
            body, header_digest, header_type = found
        else:
            body, header_digest, header_type = await self._general_manifest(url, what, reference, expect=expect)
        actual = "sha256:" + hashlib.sha256(body).hexdigest()
        wanted = expect or (header_digest if header_digest and header_digest.startswith("sha256:") else None)
        if wanted and actual != wanted:
            raise DigestMismatch(f"{what}: manifest digest is {actual}, expected {wanted}")
        doc = parse_json(body, what=f"manifest of {what}")
        return doc, media_type_of(doc, header_type), actual

    async def _raw_manifest(self, url: str, what: str) -> tuple[bytes, str | None, str | None] | None:
        """(body, Docker-Content-Digest, Content-Type) of a plain 200 on the lean client, else None.

        Why: the general client costs a quarter of a second to import, more
        than the rest of a warm pull. Anything but a 200 with a length (a
        challenge, a redirect, an error status) goes to the general path,
        which answers it in full.
        """
        raw = await self._raw_get(url, {"Accept": ACCEPT})
        if raw is None:
            return None
        try:
            if raw.status != 200 or (raw.content_length or 0) > MAX_MANIFEST_BYTES:
                return None
            body = bytearray()
            async for piece in raw.body():  # exactly Content-Length bytes, or Unavailable
                body += piece  # a copy: the lean client reuses its buffers
            return bytes(body), raw.headers.get("docker-content-digest"), raw.headers.get("content-type")
        finally:
            raw.close()

    async def _general_manifest(self, url: str, what: str, reference: str, *,
                                expect: str | None) -> tuple[bytes, str | None, str | None]:
        """(body, Docker-Content-Digest, Content-Type) of a manifest on the general client, capped."""
        import aiohttp

        resp = await self._send(url, {"Accept": ACCEPT})
        async with resp:
            if resp.status != 200:
                kind = "manifest" if expect else f"tag {reference!r}"
                raise status_error(resp, self.name if resp.status in (401, 403) else what,
                                   not_found=f"{kind} not found in {self.ref.host}/{self.ref.repository}",
                                   hint="check your registry login")
            if (resp.content_length or 0) > MAX_MANIFEST_BYTES:
                raise InvalidContent(f"{what}: manifest of {resp.content_length} bytes is over the 4 MiB limit")
            try:
                # read(n) returns what has arrived, up to n: loop to the end (or past the cap).
                buf = bytearray()
                while len(buf) <= MAX_MANIFEST_BYTES:
                    piece = await resp.content.read(MAX_MANIFEST_BYTES + 1 - len(buf))
                    if not piece:
                        break
                    buf += piece
                body = bytes(buf)
            except (TimeoutError, aiohttp.ClientError) as e:
                raise Unavailable(f"{what}: reading manifest failed: {connection_failure(e)}") from e
            header_digest = resp.headers.get("Docker-Content-Digest")
            header_type = resp.headers.get("Content-Type")
        if len(body) > MAX_MANIFEST_BYTES:
            raise InvalidContent(f"{what}: manifest is over the 4 MiB limit")
        return body, header_digest, header_type

    async def resolve(self) -> Model:
        """Fetch the manifest (through an index if need be) and build the Model."""
        def fetch(at: Blob | str) -> Awaitable[Fetched]:
            if isinstance(at, Blob):
                return self._get_manifest(at.digest, expect=at.digest)
            return self._get_manifest(at, expect=self.ref.digest)

        return await resolve_image(self.ref.reference, fetch, name=self.name)

    async def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes | memoryview]:
        """Yield bytes ``[offset, offset+length)`` of a blob, by HTTP range."""
        what = f"{self.ref.host}/{self.ref.repository} blob {blob.digest[:19]}"
        headers = {"Accept-Encoding": "identity"}
        if not (offset == 0 and length == blob.size):
            headers["Range"] = f"bytes={offset}-{offset + length - 1}"
        url = f"{self._base}/blobs/{blob.digest}"
        raw = await self._raw_get(url, headers)
        if raw is not None:
            try:
                async for piece in raw.ranged(offset, length, what=what, size=blob.size):
                    yield piece
            finally:
                raw.close()  # at once, even when the caller stops early
            return
        resp = await self._send(url, headers)
        async with resp:
            if resp.status not in (200, 206, 416):
                raise status_error(resp, what, not_found=f"{what}: blob not found in the registry")
            skip = check_range_response(resp.status, {k.lower(): v for k, v in resp.headers.items()},
                                        offset, length, what, size=blob.size)
            async for piece in body_pieces(resp, offset, length, skip=skip, what=what):
                yield piece

    async def _raw_get(self, url: str, headers: dict[str, str]) -> RawResponse | None:
        """The blob GET on the lean client, or None where the general client must take it.

        Redirects and auth challenges go to the general client (which follows
        them safely and learns the token); once a registry has redirected a
        blob, its blobs all take that path.
        """
        if self._redirects:
            return None
        sent = dict(headers)
        # Before the general client answered a challenge there is no Authorization to send (and no
        # need to load that client): a 401 here hands the request over to it.
        auth = self._auth.header(self._scope) if self._auth is not None else None
        if auth:
            sent["Authorization"] = auth
        resp = await self._raw.get(url, sent)
        if resp.status in (301, 302, 303, 307, 308):
            self._redirects = True
        if resp.content_length is None or resp.status in (401, 301, 302, 303, 307, 308):
            resp.close()
            return None
        return resp
