"""Registries that demand credentials: htpasswd (basic) and the bearer token flow.

The token server is ours (no real one can run here), but the registry that
checks its tokens is the real docker-registry: tokens are JWTs signed RS256
with a key whose self-signed certificate the registry trusts, carried in the
``x5c`` header as the distribution token spec describes.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import secrets
import threading
import time
from pathlib import Path

import bcrypt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

USER, PASSWORD = "modeluser", "s3cret-pass"
SERVICE, ISSUER = "test-registry", "test-token-issuer"


def basic(user: str = USER, password: str = PASSWORD) -> str:
    """An Authorization header value for basic auth."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def htpasswd_config(root: Path) -> str:
    """Registry YAML for basic auth against an htpasswd file written under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "htpasswd"
    path.write_text(f"{USER}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()}\n")
    return f"auth:\n  htpasswd:\n    realm: test-realm\n    path: {path}\n"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Issues registry tokens for USER/PASSWORD; anonymous requests get pull access to ``public`` repositories only.

    As Docker Hub and GHCR answer an anonymous token request for a public image.
    """

    def __init__(self, root: Path, public: tuple[str, ...] = ()) -> None:
        self.public = public
        root.mkdir(parents=True, exist_ok=True)
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "modelcache test token signer")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .sign(self.key, hashes.SHA256()))
        self.cert_path = root / "token-cert.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.scopes: list[str] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def registry_config(self) -> str:
        """Registry YAML that sends clients here for tokens and trusts our certificate."""
        return (f"auth:\n  token:\n    realm: {self.realm}\n    service: {SERVICE}\n"
                f"    issuer: {ISSUER}\n    rootcertbundle: {self.cert_path}\n")

    def token(self, scope: str, subject: str = USER) -> str:
        """A signed JWT granting the actions in ``scope`` (repository:NAME:a,b)."""
        header = {"typ": "JWT", "alg": "RS256",
                  "x5c": [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()]}
        access = []
        if scope and subject:
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": subject, "aud": SERVICE, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": secrets.token_hex(8), "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"

    async def _handle(self, request: web.Request) -> web.Response:
        scope = request.query.get("scope", "")
        self.scopes.append(scope)
        auth = request.headers.get("Authorization")
        if auth is not None and auth != basic():
            return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401)
        if auth is None and scope.count(":") == 2 and scope.split(":")[1] in self.public:
            return web.json_response({"token": self.token(scope.rsplit(":", 1)[0] + ":pull", "anonymous")})
        return web.json_response({"token": self.token(scope, USER if auth else "")})

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/token", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())

    def __enter__(self) -> TokenServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def docker_config(directory: Path, host: str, entry: dict) -> dict[str, str]:
    """Write a Docker config.json with ``entry`` for ``host``; return env pointing at it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"auths": {host: entry}}))
    return {"DOCKER_CONFIG": str(directory)}


def auth_entry(user: str = USER, password: str = PASSWORD) -> dict:
    """The ``auths.HOST`` entry Docker writes after a login."""
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
