"""Who may call the daemon's HTTP API: one small class per mode.

Every request outside the open endpoints (health, readiness, metrics) is
first *authenticated* (who is this bearer token?) and then *authorized*
(may they do this?). The modes:

- ``token``: one shared bearer token, from ``--api-token-file`` or else
  ``<store>/api-token``, made (0600, random) on first start and reused, so a
  local user who can read the store can call the API. Anyone holding it may
  do anything. Compared in constant time.
- ``kubernetes``: the caller's ServiceAccount token is checked with a
  TokenReview (authentication.k8s.io/v1); the user, groups, uid and extra it
  yields are authorized with a SubjectAccessReview (authorization.k8s.io/v1)
  for a verb on a resource of API group ``modelcache.io``, as kube-rbac-proxy
  does. So RBAC decides: a ClusterRole granting ``create`` on ``pulls`` lets
  an autoscaler's ServiceAccount pre-warm. Answers, yes and no, are cached
  briefly (``cache_ttl``), keyed by a hash of the token (and the request's
  attributes), never the token itself. The review API unreachable is
  ``Unavailable`` (503), never a yes.
- ``none``: no check at all; an explicit opt-out, logged as a warning.

The ``kubernetes`` client is synchronous: every review runs in a thread.
Errors are ours (``Unauthenticated`` 401, ``Forbidden`` 403,
``Unavailable`` 503); the HTTP edge maps them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import Forbidden, InvalidReference, Unauthenticated, Unavailable

log = logging.getLogger(__name__)

MODES = ("token", "kubernetes", "none")
API_GROUP = "modelcache.io"  # the resources RBAC grants on: pulls, models, pins (and prewarms)
TOKEN_FILE_NAME = "api-token"


def default_mode(environ: Mapping[str, str] = os.environ) -> str:
    """``kubernetes`` inside a cluster (the kubelet sets KUBERNETES_SERVICE_HOST in every pod), else ``token``."""
    return "kubernetes" if environ.get("KUBERNETES_SERVICE_HOST") else "token"


@dataclass(frozen=True)
class AuthConfig:
    """How ``serve`` authenticates API callers (``--api-auth`` and friends)."""

    mode: str = "token"
    token_file: Path | None = None  # token mode: the token; default <store>/api-token, made on first start
    kubeconfig: Path | None = None  # kubernetes mode: where the API server is; default the in-cluster config
    cache_ttl: float = 10.0  # kubernetes mode: seconds a review's answer is reused (0: never)
    cache_size: int = 4096
    review_timeout: float = 5.0


@dataclass(frozen=True)
class Access:
    """What a request asks to do, as Kubernetes resource attributes in API group ``modelcache.io``."""

    resource: str  # pulls, models, pins, prewarms
    verb: str  # create, get, list, update, delete
    name: str = ""


@dataclass(frozen=True)
class Caller:
    """An authenticated caller."""

    user: str
    groups: tuple[str, ...] = ()
    uid: str = ""
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()
    key: str = ""  # a hash of the credential: caches use it, never the token


class Authenticator(Protocol):
    """One mode of API authentication."""

    mode: str

    async def authenticate(self, token: str | None) -> Caller:
        """The caller holding bearer ``token`` (None: no credential); raises Unauthenticated, Unavailable."""

    async def authorize(self, caller: Caller, access: Access) -> None:
        """Return if ``caller`` may do ``access``; raises Forbidden, Unavailable."""

    def close(self) -> None:
        """Release connections."""


def build(config: AuthConfig, store: Path) -> Authenticator:
    """The authenticator for ``config`` (blocks: reads token files and kubeconfigs)."""
    if config.mode not in MODES:
        raise InvalidReference(f"--api-auth {config.mode!r}: expected one of {', '.join(MODES)}")
    if config.token_file is not None and config.mode != "token":
        raise InvalidReference(f"--api-token-file is for --api-auth token, not {config.mode}")
    if config.kubeconfig is not None and config.mode != "kubernetes":
        raise InvalidReference(f"--kubeconfig is for --api-auth kubernetes, not {config.mode}")
    if config.mode == "none":
        log.warning("API authentication is off (--api-auth none): anyone who reaches the port may pull and pin")
        return OpenAuth()
    if config.mode == "token":
        path = config.token_file or store / TOKEN_FILE_NAME
        token = read_token(path) if config.token_file else ensure_token(path)
        log.info("API callers authenticate with the bearer token in %s", path)
        return TokenAuth(token)
    auth = KubernetesAuth(config)
    log.info("API callers authenticate with TokenReview and SubjectAccessReview at %s (group %s)",
             auth.host, API_GROUP)
    return auth


# -- none -----------------------------------------------------------------------


class OpenAuth:
    """Everyone is anonymous and allowed everything."""

    mode = "none"

    async def authenticate(self, token: str | None) -> Caller:
        return Caller("system:anonymous")

    async def authorize(self, caller: Caller, access: Access) -> None:
        return None

    def close(self) -> None:
        return None


# -- token ----------------------------------------------------------------------


def read_token(path: Path) -> str:
    """The token in ``path`` (surrounding whitespace dropped, as Secrets often end in a newline)."""
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise InvalidReference(f"--api-token-file {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise InvalidReference(f"--api-token-file {path}: not text") from e
    if not token:
        raise InvalidReference(f"--api-token-file {path} is empty")
    return token


def ensure_token(path: Path) -> str:
    """The token in ``path``, made first (random, mode 0600) if there is none.

    Written to a temporary name and linked into place, so a concurrent start
    on the same store never reads half a token, and the first to link wins.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another daemon on this store made it first: use theirs
        finally:
            tmp.unlink(missing_ok=True)
    token = path.read_text().strip()
    if not token:
        raise InvalidReference(f"{path} is empty: delete it and a new token is made at start")
    return token


class TokenAuth:
    """One shared bearer token; its holder may do everything."""

    mode = "token"

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def authenticate(self, token: str | None) -> Caller:
        if token is None:
            raise Unauthenticated("missing credential: send Authorization: Bearer <the daemon's API token>")
        # Constant time, so the answer's timing says nothing about how much of a guess was right.
        if not hmac.compare_digest(token.encode(), self._token):
            raise Unauthenticated("the bearer token is not the daemon's API token")
        return Caller("api-token", key="api-token")

    async def authorize(self, caller: Caller, access: Access) -> None:
        return None

    def close(self) -> None:
        return None


# -- kubernetes -----------------------------------------------------------------


class TTLCache:
    """A bounded map whose entries expire ``ttl`` seconds after they were put (ttl 0: stores nothing)."""

    def __init__(self, ttl: float, size: int) -> None:
        self.ttl, self.size = ttl, size
        self._entries: OrderedDict[object, tuple[float, object]] = OrderedDict()

    def get(self, key: object) -> tuple[bool, object]:
        """(True, value) for a live entry, else (False, None)."""
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        if entry[0] <= time.monotonic():
            del self._entries[key]
            return False, None
        return True, entry[1]

    def put(self, key: object, value: object) -> None:
        if self.ttl <= 0:
            return
        self._entries[key] = (time.monotonic() + self.ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:  # the oldest entry goes first
            self._entries.popitem(last=False)


class KubernetesAuth:
    """TokenReview, then SubjectAccessReview against ``modelcache.io`` resources, both cached briefly."""

    mode = "kubernetes"

    def __init__(self, config: AuthConfig) -> None:
        from kubernetes import client
        from kubernetes import config as kube_config

        configuration = client.Configuration()
        try:
            if config.kubeconfig is not None:
                kube_config.load_kube_config(config_file=str(config.kubeconfig), client_configuration=configuration,
                                             persist_config=False)
            else:
                kube_config.load_incluster_config(client_configuration=configuration)
        except (kube_config.ConfigException, OSError, ValueError) as e:
            where = f"--kubeconfig {config.kubeconfig}" if config.kubeconfig else "the in-cluster config"
            raise InvalidReference(f"--api-auth kubernetes: cannot load {where}: {e} "
                                   "(outside a cluster, pass --kubeconfig or use --api-auth token)") from e
        # A refused connection fails fast (no backoff between these); a stale pooled connection is retried.
        configuration.retries = 2
        self.host = configuration.host
        self._api = client.ApiClient(configuration)
        self._authn = client.AuthenticationV1Api(self._api)
        self._authz = client.AuthorizationV1Api(self._api)
        self._client = client
        self._timeout = config.review_timeout
        self._users = TTLCache(config.cache_ttl, config.cache_size)  # token hash -> Caller | error
        self._decisions = TTLCache(config.cache_ttl, config.cache_size)  # (token hash, Access) -> error | None

    async def authenticate(self, token: str | None) -> Caller:
        if token is None:
            raise Unauthenticated("missing credential: send Authorization: Bearer <a ServiceAccount token>")
        key = hashlib.sha256(token.encode()).hexdigest()
        hit, answer = self._users.get(key)
        if not hit:
            answer = await asyncio.to_thread(self._review_token, token, key)
            self._users.put(key, answer)
        if isinstance(answer, Unauthenticated):
            raise answer
        assert isinstance(answer, Caller)
        return answer

    async def authorize(self, caller: Caller, access: Access) -> None:
        key = (caller.key, access)
        hit, answer = self._decisions.get(key)
        if not hit:
            answer = await asyncio.to_thread(self._review_access, caller, access)
            self._decisions.put(key, answer)
        if isinstance(answer, Forbidden):
            raise answer

    def close(self) -> None:
        self._api.close()

    # -- in a thread ------------------------------------------------------------

    def _review_token(self, token: str, key: str) -> Caller | Unauthenticated:
        c = self._client
        body = c.V1TokenReview(spec=c.V1TokenReviewSpec(token=token))
        review = self._call("TokenReview", self._authn.create_token_review, body)
        status = review.status
        if status is None or not status.authenticated or status.user is None:
            why = (status.error if status is not None else None) or "not authenticated"
            return Unauthenticated(f"the bearer token was rejected by the Kubernetes API: {why}")
        user = status.user
        extra = tuple(sorted((k, tuple(v)) for k, v in (user.extra or {}).items()))
        return Caller(user.username or "", tuple(user.groups or ()), user.uid or "", extra, key)

    def _review_access(self, caller: Caller, access: Access) -> Forbidden | None:
        c = self._client
        attributes = c.V1ResourceAttributes(group=API_GROUP, resource=access.resource, verb=access.verb,
                                            name=access.name or None)
        spec = c.V1SubjectAccessReviewSpec(user=caller.user, groups=list(caller.groups), uid=caller.uid or None,
                                           extra={k: list(v) for k, v in caller.extra} or None,
                                           resource_attributes=attributes)
        review = self._call("SubjectAccessReview", self._authz.create_subject_access_review,
                            c.V1SubjectAccessReview(spec=spec))
        if review.status is not None and review.status.allowed:
            return None
        reason = review.status.reason if review.status is not None and review.status.reason else "not allowed"
        target = f"{access.resource}/{access.name}" if access.name else access.resource
        log.info("API: %s may not %s %s.%s: %s", caller.user, access.verb, target, API_GROUP, reason)
        return Forbidden(f"{caller.user} may not {access.verb} {target} (group {API_GROUP}): {reason}")

    def _call(self, what: str, method: Any, body: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return method(body, _request_timeout=self._timeout)
        except ApiException as e:  # the API server answered, but not with a review (our RBAC, say)
            raise Unavailable(f"cannot check the caller: {what} at {self.host} failed: {e.status} {e.reason}") \
                from e
        except (HTTPError, OSError) as e:
            raise Unavailable(f"cannot check the caller: the Kubernetes API at {self.host} is unreachable "
                              f"({type(e).__name__})") from e
