"""AWS Signature Version 4 for S3 GET and HEAD URLs, query-string form (presigned), with nothing but hashlib.

Written from AWS's SigV4 description (the canonical request, the string to
sign, the derived signing key; "Authenticating Requests: Using Query
Parameters" for S3), so that an S3 pull signs its listing and its ranges
without importing botocore or building its client (about a second of start-up
on a busy node, measured in tools/bench_sources.py). The ``host`` header
is signed, and the ``x-amz-*`` headers a request names (S3 wants those
signed, e.g. ``x-amz-checksum-mode``); the payload is ``UNSIGNED-PAYLOAD``:
the Range and If-Match headers of a ranged read may then be added freely,
as with botocore's own presigned URLs. tests/test_s3_lean.py checks the result
against botocore's signer, and SeaweedFS checks it on every test.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

_ALGORITHM = "AWS4-HMAC-SHA256"


@dataclass(frozen=True, slots=True)
class Keys:
    """An access key, its secret, and the session token of temporary credentials."""

    access_key: str
    secret_key: str = field(repr=False)
    token: str | None = field(default=None, repr=False)


def _quote(text: str, safe: str = "") -> str:
    # RFC 3986 unreserved characters stay; everything else is %XX (SigV4's UriEncode).
    return quote(text, safe="-_.~" + safe)


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def url(endpoint: str, path: str, query: str = "") -> str:
    """``endpoint`` (scheme and host) plus a raw ``path`` (encoded here, once) and an encoded ``query``."""
    return f"{endpoint.rstrip('/')}{_quote(path, safe='/')}" + (f"?{query}" if query else "")


def presign(method: str, endpoint: str, path: str, keys: Keys, *, region: str, query: str = "",
            expires: int = 3600, now: datetime.datetime | None = None, headers: Mapping[str, str] | None = None,
            ) -> str:
    """The URL of ``path`` (raw, as a key is) with SigV4 query authentication; ``query`` is encoded already.
    ``headers``, signed beside ``host``, must then be sent with exactly these values."""
    netloc = urlsplit(endpoint).netloc
    signed = sorted({"host": netloc, **{k.lower(): " ".join(v.split()) for k, v in (headers or {}).items()}}.items())
    names = ";".join(k for k, _ in signed)
    when = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y%m%dT%H%M%SZ")
    scope = f"{when[:8]}/{region}/s3/aws4_request"
    params = [tuple(p.split("=", 1)) if "=" in p else (p, "") for p in query.split("&") if p]
    params += [("X-Amz-Algorithm", _ALGORITHM), ("X-Amz-Credential", _quote(f"{keys.access_key}/{scope}")),
               ("X-Amz-Date", when), ("X-Amz-Expires", str(expires)), ("X-Amz-SignedHeaders", _quote(names))]
    if keys.token:
        params.append(("X-Amz-Security-Token", _quote(keys.token)))
    canonical_query = "&".join(f"{k}={v}" for k, v in sorted(params))
    canonical_path = _quote(path or "/", safe="/")
    canonical_headers = "".join(f"{k}:{v}\n" for k, v in signed)
    canonical = "\n".join((method, canonical_path, canonical_query, canonical_headers, names, "UNSIGNED-PAYLOAD"))
    to_sign = "\n".join((_ALGORITHM, when, scope, hashlib.sha256(canonical.encode()).hexdigest()))
    key = _hmac(_hmac(_hmac(_hmac(f"AWS4{keys.secret_key}".encode(), when[:8]), region), "s3"), "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return url(endpoint, path, f"{canonical_query}&X-Amz-Signature={signature}")


def query(**params: str | int) -> str:
    """An S3 query string, encoded as SigV4 wants it (``list-type=2&prefix=…``)."""
    return "&".join(f"{_quote(k)}={_quote(str(v))}" for k, v in params.items())
