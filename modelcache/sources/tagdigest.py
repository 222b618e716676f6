"""What a registry tag names now, asked with one blocking GET and no event loop (issue 13).

A warm pull of ``oci://HOST/REPO:TAG`` still asks the registry whether the
tag moved (the origin decides what a tag is), but that one question need not
load the asynchronous clients, which cost more than the rest of a warm pull.
:func:`tag_digest` sends the manifest GET the registry source would send
(same ``Accept``, no credentials), on a plain socket, and reads the answer
only if it is a plain anonymous 200 with a length within the manifest cap.

A registry that answers with a ``Bearer`` challenge (Docker Hub, GHCR, Quay
and most others, even for public images) is asked for an anonymous token at
the challenge's realm, as the distribution token spec describes, and the GET
is sent again with it, provided no credentials are configured for the host
(the full path would log in with them). Nothing secret is ever sent here.

It never decides anything on its own: any other answer (a ``Basic`` login
challenge, a token refused or short of access, a redirect, an error, a proxy
in the way, a body that fails its digest) is None, and the pull then takes its full path, which answers it in full and
reports its errors. What it returns is the digest the full path would
record as the model's: the manifest's own, or for an index the digest of the
manifest chosen from it (:func:`~.oci_manifest.select_from_index`), which is
read from the index without fetching that manifest.
"""

from __future__ import annotations

import hashlib
import json
import socket
from typing import Any
from urllib.parse import urlencode, urlsplit

from ..errors import ModelCacheError
from ..refs import OciRef
from .http import content_length, parse_head
from .oci_manifest import (
    ACCEPT,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_MANIFEST_BYTES,
    media_type_of,
    parse_json,
    select_from_index,
)
from .proxy import proxy_for

_MAX_HEAD = 64 << 10
_MAX_TOKEN = 1 << 20  # a registry token's JSON: a few KiB in practice


def tag_digest(ref: OciRef, *, plain_http: bool = False, connect_timeout: float = 30.0,
               read_timeout: float = 30.0) -> str | None:
    """The digest of the image manifest ``ref`` names at its registry now; None when this GET cannot tell."""
    scheme = "http" if plain_http or ref.is_loopback() else "https"
    url = f"{scheme}://{ref.host}/v2/{ref.repository}/manifests/{ref.reference}"
    timeouts = (connect_timeout, read_timeout)
    headers = {"Accept": ACCEPT}
    try:
        status, answer, body = _exchange(url, headers, MAX_MANIFEST_BYTES, timeouts)
        if status == 401:
            token = _anonymous_token(ref, answer.get("www-authenticate", ""), timeouts)
            if token is None:
                return None
            status, answer, body = _exchange(url, {**headers, "Authorization": f"Bearer {token}"},
                                             MAX_MANIFEST_BYTES, timeouts)
    except (OSError, ValueError, _Declined):  # ssl errors are OSErrors; ValueError: a malformed answer
        return None
    if status != 200 or body is None:
        return None
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    header_digest = answer.get("docker-content-digest")
    if ref.digest is not None and digest != ref.digest or header_digest and header_digest != digest:
        return None  # the full path checks it again and says what is wrong
    try:
        doc = parse_json(body, what=str(ref))
        media_type = media_type_of(doc, answer.get("content-type"))
        if media_type in INDEX_TYPES:
            return select_from_index(doc, what=str(ref)).digest
    except ModelCacheError:
        return None
    return digest if media_type in MANIFEST_TYPES else None


class _Declined(Exception):
    """This lean path does not take the exchange (a proxy, a scheme it does not speak): the full path will."""


def _anonymous_token(ref: OciRef, challenge: str, timeouts: tuple[float, float]) -> str | None:
    """A token for an anonymous pull of ``ref`` from a ``Bearer`` challenge's realm; None where there is none.

    None too where credentials are configured for the registry: the full path sends them to the realm,
    and what it is given (and records as needing credentials) is what counts.
    """
    from .registry_auth import load_credentials, parse_challenge

    scheme, params = parse_challenge(challenge)
    if scheme != "bearer" or not params.get("realm"):
        return None
    try:
        if load_credentials(ref.host) is not None:
            return None
    except ModelCacheError:  # a config file it cannot read: the full path says what is wrong with it
        return None
    query = {"service": params["service"]} if params.get("service") else {}
    query["scope"] = params.get("scope") or f"repository:{ref.repository}:pull"
    realm = params["realm"]
    status, _, body = _exchange(realm + ("&" if "?" in realm else "?") + urlencode(query), {}, _MAX_TOKEN,
                                timeouts)
    if status != 200 or body is None:
        return None
    doc = json.loads(body)
    token = (doc.get("token") or doc.get("access_token")) if isinstance(doc, dict) else None
    return token if isinstance(token, str) and token and token.isprintable() else None


def _exchange(url: str, headers: dict[str, str], cap: int,
              timeouts: tuple[float, float]) -> tuple[int, dict[str, str], bytes | None]:
    """One GET on its own connection: (status, headers, body); the body only of a 200 of at most ``cap`` bytes."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Declined(url)
    try:
        if proxy_for(url) is not None:
            raise _Declined(url)  # the full path's clients speak to proxies
    except ModelCacheError as e:  # a proxy setting it refuses, with the full path's message
        raise _Declined(url) from e
    secure = parts.scheme == "https"
    host = parts.hostname
    # An ASCII name goes as bytes (getaddrinfo takes them; the stub says str): a str is IDNA-encoded
    # first, which loads unicodedata and stringprep (milliseconds).
    address: tuple[Any, int] = (host.encode() if host.isascii() else host, parts.port or (443 if secure else 80))
    raw = socket.create_connection(address, timeout=timeouts[0])
    sock = raw
    try:
        if secure:
            import ssl  # only for https: a plain-HTTP registry never loads TLS

            sock = ssl.create_default_context().wrap_socket(raw, server_hostname=host)
        sock.settimeout(timeouts[1])
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        sock.sendall((f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n{lines}"
                      "Accept-Encoding: identity\r\nConnection: close\r\n\r\n").encode("latin-1"))
        got = bytearray()
        while (end := got.find(b"\r\n\r\n")) < 0:
            piece = sock.recv(_MAX_HEAD)
            if not piece or len(got) > _MAX_HEAD:
                raise ValueError("no complete response head")
            got += piece
        status, answer = parse_head(bytes(got[:end]))
        length = content_length(answer)
        if status != 200 or length is None or length > cap or answer.get("transfer-encoding"):
            return status, answer, None  # a body it would have to decode or could not bound: not read
        body = got[end + 4:]
        while len(body) < length:
            piece = sock.recv(length - len(body))
            if not piece:
                return status, answer, None
            body += piece
        return status, answer, bytes(body) if len(body) == length else None
    finally:
        sock.close()
        raw.close()  # the TLS socket took it over: closing it again is harmless
