"""Authenticating peer requests: an HMAC-SHA256 over method, path, range and time.

A request carries ``X-Modelcache-Peer-Auth: t=<unix seconds>,sig=<hex>``
where ``sig = HMAC(secret, "METHOD\\nPATH?QUERY\\nRANGE\\nT")``. The server
recomputes it with the shared secret (``--peer-secret-file``) and refuses
(401, no bytes) a missing or wrong signature, or a timestamp more than
:data:`WINDOW` seconds from its own clock.

Limits (documented in the README): anyone holding the secret is a peer;
there is no per-request nonce, so a request captured on the wire can be
replayed unchanged within the window (it only returns the same public-by-
digest bytes again); bodies are not encrypted (use a network policy or a
mesh for confidentiality).
"""

from __future__ import annotations

import hashlib
import hmac
import time

HEADER = "X-Modelcache-Peer-Auth"
WINDOW = 30.0


def _mac(secret: bytes, method: str, path: str, range_: str, stamp: int) -> str:
    message = f"{method.upper()}\n{path}\n{range_}\n{stamp}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign(secret: bytes, method: str, path: str, range_: str = "", *, now: float | None = None) -> str:
    """The header value for a request (``path`` with its query string)."""
    stamp = int(time.time() if now is None else now)
    return f"t={stamp},sig={_mac(secret, method, path, range_, stamp)}"


def check(secret: bytes, method: str, path: str, range_: str, header: str | None, *,
          now: float | None = None, window: float = WINDOW) -> str | None:
    """None when ``header`` signs this request and is fresh; else why not (one line)."""
    if not header:
        return "no peer signature"
    fields = dict(part.strip().partition("=")[::2] for part in header.split(","))
    stamp, sig = fields.get("t", ""), fields.get("sig", "")
    if not stamp.lstrip("-").isdigit() or not sig:
        return "malformed peer signature"
    current = time.time() if now is None else now
    if abs(current - int(stamp)) > window:
        return "stale peer signature"
    if not hmac.compare_digest(sig, _mac(secret, method, path, range_, int(stamp))):
        return "wrong peer signature"
    return None
