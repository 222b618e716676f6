"""What a registry tag names now, asked with one blocking GET and no event loop (issue 13).

A warm pull of ``oci://HOST/REPO:TAG`` still asks the registry whether the
tag moved (the origin decides what a tag is), but that one question need not
load the asynchronous clients, which cost more than the rest of a warm pull.
:func:`tag_digest` sends the manifest GET the registry source would send
(same ``Accept``, no credentials), on a plain socket, and reads the answer
only if it is a plain anonymous 200 with a length within the manifest cap.

It never decides anything on its own: any other answer (a login challenge,
a redirect, an error, a proxy in the way, a body that fails its digest) is
None, and the pull then takes its full path, which answers it in full and
reports its errors. What it returns is the digest the full path would
record as the model's: the manifest's own, or for an index the digest of the
manifest chosen from it (:func:`~.oci_manifest.select_from_index`), which is
read from the index without fetching that manifest.
"""

from __future__ import annotations

import hashlib
import socket
from typing import Any
from urllib.parse import urlsplit

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


def tag_digest(ref: OciRef, *, plain_http: bool = False, connect_timeout: float = 30.0,
               read_timeout: float = 30.0) -> str | None:
    """The digest of the image manifest ``ref`` names at its registry now; None when this GET cannot tell."""
    scheme = "http" if plain_http or ref.is_loopback() else "https"
    url = f"{scheme}://{ref.host}/v2/{ref.repository}/manifests/{ref.reference}"
    try:
        if proxy_for(url) is not None:
            return None  # the full path's clients speak to proxies
    except ModelCacheError:  # a proxy setting it refuses, with the full path's message
        return None
    parts = urlsplit(url)
    try:
        body, header_digest, header_type = _get(parts.hostname or "", parts.port or (443 if scheme == "https" else 80),
                                                parts.netloc, parts.path, secure=scheme == "https",
                                                connect_timeout=connect_timeout, read_timeout=read_timeout)
    except (OSError, ValueError):  # ssl errors are OSErrors; ValueError: a malformed answer
        return None
    if body is None:
        return None
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if ref.digest is not None and digest != ref.digest or header_digest and header_digest != digest:
        return None  # the full path checks it again and says what is wrong
    try:
        doc = parse_json(body, what=str(ref))
        media_type = media_type_of(doc, header_type)
        if media_type in INDEX_TYPES:
            return select_from_index(doc, what=str(ref)).digest
    except ModelCacheError:
        return None
    return digest if media_type in MANIFEST_TYPES else None


def _get(host: str, port: int, authority: str, target: str, *, secure: bool, connect_timeout: float,
         read_timeout: float) -> tuple[bytes | None, str | None, str | None]:
    """(body, Docker-Content-Digest, Content-Type) of a plain 200 to an anonymous GET; (None, None, None) else."""
    # An ASCII name goes as bytes (getaddrinfo takes them; the stub says str): a str is IDNA-encoded
    # first, which loads unicodedata and stringprep (milliseconds).
    address: tuple[Any, int] = (host.encode() if host.isascii() else host, port)
    raw = socket.create_connection(address, timeout=connect_timeout)
    sock = raw
    try:
        if secure:
            import ssl  # only for https: a plain-HTTP registry never loads TLS

            sock = ssl.create_default_context().wrap_socket(raw, server_hostname=host)
        sock.settimeout(read_timeout)
        request = (f"GET {target} HTTP/1.1\r\nHost: {authority}\r\nAccept: {ACCEPT}\r\n"
                   "Accept-Encoding: identity\r\nConnection: close\r\n\r\n")
        sock.sendall(request.encode("latin-1"))
        got = bytearray()
        while (end := got.find(b"\r\n\r\n")) < 0:
            piece = sock.recv(_MAX_HEAD)
            if not piece or len(got) > _MAX_HEAD:
                return None, None, None
            got += piece
        status, headers = parse_head(bytes(got[:end]))
        length = content_length(headers)
        if status != 200 or length is None or length > MAX_MANIFEST_BYTES or headers.get("transfer-encoding"):
            return None, None, None
        body = got[end + 4:]
        while len(body) < length:
            piece = sock.recv(length - len(body))
            if not piece:
                return None, None, None
            body += piece
        if len(body) != length:
            return None, None, None
        return bytes(body), headers.get("docker-content-digest"), headers.get("content-type")
    finally:
        sock.close()
        raw.close()  # the TLS socket took it over: closing it again is harmless
