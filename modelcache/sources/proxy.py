"""Forward proxies for origin fetches (HTTPS_PROXY, HTTP_PROXY, NO_PROXY), and when credentials may use one.

A cluster that already runs a caching proxy (Dragonfly's dfdaemon, squid...)
puts it in front of the origins with the usual variables; every origin
client of ours asks :func:`proxy_for` so they all agree:

- an ``https://`` URL uses ``HTTPS_PROXY``, an ``http://`` one ``HTTP_PROXY``
  (the lower-case name wins when both are set, as curl does); a proxy URL is
  ``http://[user:password@]host:port`` (no scheme means http); other proxy
  schemes are refused with one line;
- ``NO_PROXY`` lists what goes direct, comma separated: ``*`` (everything),
  a host or domain name (matching itself and its subdomains; ``.example.com``
  and ``*.example.com`` mean the same), an IP address or a CIDR range
  (``10.0.0.0/8``), each optionally with ``:PORT``;
- an ``https://`` origin is reached through a ``CONNECT`` tunnel, so TLS runs
  end to end and the proxy sees the host and port only; an ``http://`` one
  is asked in absolute form, so the proxy reads the whole request;
- so credentials never cross a proxy in the clear: a request to an
  ``http://`` origin through a proxy that carries any (an ``Authorization``
  header, or a URL signed with an S3 key) is refused with
  :class:`~modelcache.errors.Unauthorized`, and the origin must use https or
  be listed in ``NO_PROXY``. The proxy's own ``user:password`` goes to the
  proxy alone, as ``Proxy-Authorization``.

Peers never go through a proxy (they are in the cluster; :mod:`modelcache.p2p`
does not ask this module). Whatever boto3 and huggingface_hub send they send
through the same variables on their own; their sources check
:func:`refuse_plain` before they let them.
"""

from __future__ import annotations

import base64
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import parse_qsl, unquote, urlsplit

from ..errors import InvalidReference, Unauthorized

# Query parameters that make a URL a credential by itself (S3 presigned URLs, SigV4 and SigV2).
SIGNED_QUERY = frozenset({"x-amz-signature", "x-amz-credential", "x-amz-security-token", "awsaccesskeyid",
                          "signature"})


@dataclass(frozen=True)
class Proxy:
    """Where to send a request instead of its origin."""

    host: str
    port: int
    authorization: str | None = None  # the Proxy-Authorization value, from user:password in the proxy URL

    @property
    def url(self) -> str:
        """``http://host:port``, without credentials (for messages and pool keys)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def headers(self) -> dict[str, str]:
        """Headers for the proxy itself."""
        return {"Proxy-Authorization": self.authorization} if self.authorization else {}


def proxy_for(url: str, environ: Mapping[str, str] | None = None) -> Proxy | None:
    """The proxy ``url`` goes through, or None (no proxy set, another scheme, or listed in NO_PROXY)."""
    env = os.environ if environ is None else environ
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        return None
    name = f"{scheme}_proxy"
    configured = env.get(name) or env.get(name.upper()) or ""
    if not configured.strip():
        return None
    no_proxy = env.get("no_proxy") or env.get("NO_PROXY") or ""
    host = (parts.hostname or "").lower()
    port = parts.port or (443 if scheme == "https" else 80)
    if _bypassed(host, port, no_proxy):
        return None
    return _parse_proxy(configured.strip(), name.upper())


def carries_credentials(url: str, headers: Mapping[str, str]) -> bool:
    """True when the request holds a credential: an Authorization header, user:password, or a signed URL."""
    if any(k.lower() == "authorization" for k in headers):
        return True
    parts = urlsplit(url)
    if parts.username or parts.password:
        return True
    return any(k.lower() in SIGNED_QUERY for k, _ in parse_qsl(parts.query, keep_blank_values=True))


def refuse_plain(url: str, *, what: str, credentials: bool = True, environ: Mapping[str, str] | None = None) -> None:
    """Raise Unauthorized when credentials for ``url`` would cross a proxy in the clear (an http:// origin)."""
    if not credentials or urlsplit(url).scheme.lower() != "http":
        return
    proxy = proxy_for(url, environ)
    if proxy is not None:
        host = urlsplit(url).hostname or url
        raise Unauthorized(f"{what}: refusing to send credentials to http://{urlsplit(url).netloc} through the "
                           f"proxy {proxy.url}, which would read them; use https or add {host} to NO_PROXY")


def check_request(url: str, headers: Mapping[str, str], *, what: str) -> Proxy | None:
    """The proxy for this request, after refusing one that would show its credentials to the proxy."""
    proxy = proxy_for(url)
    if proxy is not None and urlsplit(url).scheme.lower() == "http" and carries_credentials(url, headers):
        refuse_plain(url, what=what)
    return proxy


def aiohttp_options(url: str, headers: Mapping[str, str], *, what: str) -> dict:
    """Keyword arguments for an aiohttp request to ``url``: its proxy (CONNECT for https), checked as above."""
    proxy = check_request(url, headers, what=what)
    if proxy is None:
        return {}
    return {"proxy": proxy.url, "proxy_headers": proxy.headers() or None}


@lru_cache(maxsize=32)
def _parse_proxy(text: str, variable: str) -> Proxy:
    parts = urlsplit(text if "://" in text else "http://" + text)
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise InvalidReference(f"{variable}={_redact(text)}: expected http://[USER:PASSWORD@]HOST[:PORT] "
                               "(only http proxies; https origins are tunnelled through them with CONNECT)")
    try:
        port = parts.port or 80
    except ValueError:
        raise InvalidReference(f"{variable}={_redact(text)}: bad port") from None
    authorization = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode()).decode()
    return Proxy(parts.hostname.lower(), port, authorization)


def _redact(text: str) -> str:
    parts = urlsplit(text if "://" in text else "http://" + text)
    return text.replace(parts.password, "***") if parts.password else text


@lru_cache(maxsize=32)
def _rules(no_proxy: str) -> tuple[tuple[str, object, int | None], ...]:
    """NO_PROXY parsed: (kind, value, port) with kind ``all``, ``net`` or ``name``."""
    rules: list[tuple[str, object, int | None]] = []
    for entry in no_proxy.replace(" ", ",").split(","):
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry == "*":
            rules.append(("all", None, None))
            continue
        port: int | None = None
        host = entry
        if entry.startswith("["):  # [v6]:port
            host, _, rest = entry[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
        elif entry.count(":") == 1:  # name:port or v4:port (a bare v6 address has more colons)
            host, _, p = entry.partition(":")
            port = int(p) if p.isdigit() else None
        try:
            rules.append(("net", ipaddress.ip_network(host, strict=False), port))
            continue
        except ValueError:
            pass
        rules.append(("name", host.removeprefix("*").lstrip("."), port))
    return tuple(rules)


def _bypassed(host: str, port: int, no_proxy: str) -> bool:
    """True when NO_PROXY sends ``host:port`` direct."""
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for kind, value, rule_port in _rules(no_proxy):
        if rule_port is not None and rule_port != port:
            continue
        if kind == "all":
            return True
        if kind == "net":
            assert isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network)
            if address is not None and address.version == value.version and address in value:
                return True
        elif isinstance(value, str) and value and (host == value or host.endswith("." + value)):
            return True
    return False
