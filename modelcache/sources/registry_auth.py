"""Registry credentials and the auth challenge flow.

- Credentials come from Docker's ``config.json`` (``$DOCKER_CONFIG`` or
  ``~/.docker/config.json``): ``auths.<host>.auth`` (base64 ``user:password``)
  or ``username``/``password``; Docker Hub's aliases are matched too.
- A 401 carries ``WWW-Authenticate``. ``Basic`` is answered with the
  credentials; ``Bearer realm=…,service=…,scope=…`` is answered by fetching a
  token from the realm (with the credentials, if any, as basic auth), as the
  distribution token spec describes, and the token is cached per scope.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlencode

if TYPE_CHECKING:  # imported where a token is fetched: a pull that needs none never loads it
    import aiohttp

from ..errors import InvalidContent, Unauthorized, Unavailable
from .http import connection_failure, same_origin
from .proxy import aiohttp_options

_PARAM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)')


@dataclass(frozen=True, slots=True)
class Credentials:
    """A username and password (or token) for one registry."""

    username: str
    password: str

    def basic(self) -> str:
        """The value of an ``Authorization: Basic`` header."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def docker_config_path() -> Path:
    """Where Docker keeps ``config.json``."""
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def load_credentials(host: str, config: Path | None = None) -> Credentials | None:
    """Credentials for ``host`` from Docker's config file, or None."""
    path = config or docker_config_path()
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise Unauthorized(f"cannot read registry credentials from {path}: {e}") from e
    return credentials_in(doc, host, where=str(path))


def credentials_in(doc: object, host: str, *, where: str) -> Credentials | None:
    """Credentials for ``host`` in a parsed Docker config (a file's, or a pod secret's), or None."""
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        return None
    names = {host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"https://{host}/v2/"}
    if host in ("docker.io", "registry-1.docker.io", "index.docker.io"):
        names.add("https://index.docker.io/v1/")
    for key, entry in auths.items():
        if key.rstrip("/") not in {n.rstrip("/") for n in names} or not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            try:
                user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError) as e:
                raise Unauthorized(f"{where}: auths.{key}.auth is not base64 user:password") from e
            if sep:
                return Credentials(user, password)
        if entry.get("username") and entry.get("password"):
            return Credentials(str(entry["username"]), str(entry["password"]))
    return None


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Split ``WWW-Authenticate`` into its scheme and parameters."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for key, value in _PARAM.findall(rest):
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[key.lower()] = value
    return scheme.lower(), params


class Authenticator:
    """Answers one registry's challenges; caches the header per scope."""

    def __init__(self, session: aiohttp.ClientSession, registry: str, credentials: Credentials | None, *,
                 where: str | None = None) -> None:
        self._session = session
        self._registry = registry
        self._credentials = credentials
        self._where = where  # where credentials would come from, for messages (default: Docker's file)
        self._headers: dict[str, str] = {}
        # True once a challenge was answered with our credentials (not an anonymous token):
        # the registry demanded a login, so what we read is private (KEP-2535's "pulled with a secret").
        self.used_credentials = False

    def header(self, scope: str) -> str | None:
        """The Authorization header to send for ``scope``, if one is known."""
        return self._headers.get(scope) or self._headers.get("*")

    async def request(self, method: str, url: str, *, scope: str, home: str, what: str,
                      headers: Mapping[str, str] | None = None,
                      body: Callable[[], AsyncIterator[bytes] | bytes] | None = None) -> aiohttp.ClientResponse:
        """One request, with a 401's challenge answered once; the response as it came (redirects too).

        The one challenge loop of pulls and pushes. The registry's
        ``Authorization`` goes only to its own origin (``home``, any URL of
        the registry): an upload ``Location`` or a redirect may lead anywhere.
        ``body`` makes the request body afresh for each attempt. A 401 after
        the challenge was answered is returned for the caller to map.
        """
        import aiohttp  # here, not at the top: a pull that meets no challenge need not load it

        session = self._session() if callable(self._session) else self._session  # a session, or its factory
        mine = same_origin(url, home)
        for answered in (False, True):
            sent = dict(headers or {})
            auth = self.header(scope) if mine else None
            if auth:
                sent["Authorization"] = auth
            try:
                # HTTPS_PROXY and friends apply here (modelcache.sources.proxy), checked before anything is sent.
                resp = await session.request(method, url, headers=sent, data=body() if body else None,
                                             allow_redirects=False, **aiohttp_options(url, sent, what=what))
            except (TimeoutError, aiohttp.ClientError) as e:
                raise Unavailable(f"{what}: {method} failed: {connection_failure(e)}") from e
            if resp.status != 401 or not mine or answered:
                return resp
            challenge = resp.headers.get("WWW-Authenticate", "")
            resp.release()
            if not challenge:
                raise Unauthorized(f"{what}: registry answered 401 without a challenge")
            await self.answer(challenge, scope)
        raise AssertionError("unreachable: the second attempt returns")

    async def answer(self, challenge: str, scope: str) -> str:
        """Obtain an Authorization header for a 401's challenge; raise if impossible."""
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if not self._credentials:
                raise Unauthorized(f"{self._registry} requires a login "
                                   f"(no credentials in {self._where or docker_config_path()})")
            self._headers["*"] = self._credentials.basic()
            self.used_credentials = True
            return self._headers["*"]
        if scheme != "bearer" or "realm" not in params:
            raise Unauthorized(f"{self._registry}: unsupported auth challenge {challenge!r}")
        query = {"service": params.get("service", "")} if params.get("service") else {}
        wanted = params.get("scope") or scope
        if wanted:
            query["scope"] = wanted
        url = params["realm"] + ("&" if "?" in params["realm"] else "?") + urlencode(query)
        headers = {"Authorization": self._credentials.basic()} if self._credentials else {}
        import aiohttp

        try:
            async with self._session.get(url, headers=headers,
                                         **aiohttp_options(url, headers, what=self._registry)) as resp:
                if resp.status in (401, 403):
                    raise Unauthorized(f"{self._registry}: token server refused "
                                       f"{'our credentials' if self._credentials else 'anonymous access'}")
                if resp.status >= 400:
                    raise Unavailable(f"{self._registry}: token server answered HTTP {resp.status}")
                body = await resp.json(content_type=None)
        except aiohttp.ClientError as e:
            raise Unavailable(f"{self._registry}: token server unreachable: {e}") from e
        except ValueError as e:
            raise InvalidContent(f"{self._registry}: token server sent invalid JSON") from e
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise InvalidContent(f"{self._registry}: token server sent no token")
        self._headers[scope] = f"Bearer {token}"
        self.used_credentials = self.used_credentials or self._credentials is not None
        return self._headers[scope]
