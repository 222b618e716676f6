"""Who may mount a cached model: the pod's credentials checked at the model's origin.

Kubernetes closed the same hole for images (KEP-2535, "ensure secret pulled
images"): a model that needed credentials at its origin is on the node's
disk, and without a check any pod naming it would get it. Before a mount,
:meth:`AccessGate.check` applies the policy:

- ``never``: no check (warm mounts are fast and work offline; any pod on the
  node may read any cached model);
- ``private`` (the default): models whose last pull needed credentials, and
  models of unknown standing (cached before this was recorded), are checked;
- ``always``: every model is checked, public ones anonymously (one origin
  round trip per mount past the cache; a model whose origin is down cannot
  be mounted).

A check reads the model's manifest (registry), lists its prefix (S3) or
resolves its revision (Hub) with the pod's credentials only, never the
daemon's. Answers are cached per (reference, credentials fingerprint) for
``ttl`` seconds, refusals too, in a bounded map; concurrent checks of one key
share one request. A refusal or an origin that does not know the model is
:class:`Unauthorized` (CSI: PERMISSION_DENIED); an unreachable origin is
:class:`Unavailable` (UNAVAILABLE, kubelet retries) and is not cached.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from ..errors import NotFound, Unauthorized
from ..refs import parse
from ..sources import SourceCredentials, SourceOptions, open_source
from ..store import Store

POLICIES = ("always", "private", "never")
DEFAULT_TTL = 60.0
MAX_ENTRIES = 4096
_HINT = "give the pod's volume a nodePublishSecretRef with credentials for it"

Probe = Callable[[str, SourceCredentials], Awaitable[None]]


class AccessGate:
    """Applies the mount credential policy, with a small cache of the origin's answers."""

    def __init__(self, store: Store, options: SourceOptions, *, policy: str = "private",
                 ttl: float = DEFAULT_TTL, max_entries: int = MAX_ENTRIES, probe: Probe | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if policy not in POLICIES:
            raise ValueError(f"mount credential policy {policy!r}: expected one of {', '.join(POLICIES)}")
        self.policy, self.ttl, self._max = policy, ttl, max_entries
        self._store, self._options = store, options
        self._probe = probe or self._origin_probe
        self._clock = clock
        self._answers: OrderedDict[tuple[str, str], tuple[float, Unauthorized | None]] = OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Task[Unauthorized | None]] = {}

    async def check(self, ref: str, credentials: SourceCredentials | None) -> None:
        """Return if the pod may mount ``ref`` (canonical); raise Unauthorized or Unavailable."""
        if self.policy == "never":
            return
        needed = await asyncio.to_thread(self._store.index.origin_needed_credentials, ref)
        if self.policy == "private" and needed is False:
            return
        if credentials is None and needed:
            raise Unauthorized(f"{ref} needed credentials at its origin and the volume carries none; {_HINT}")
        given = credentials or SourceCredentials()  # anonymous: the daemon's own never count
        key = (ref, given.fingerprint())
        refusal = await self._answer(key, ref, given)
        if refusal is not None:
            raise refusal

    async def _answer(self, key: tuple[str, str], ref: str, given: SourceCredentials) -> Unauthorized | None:
        cached = self._answers.get(key)
        if cached is not None and self._clock() < cached[0]:
            return cached[1]
        task = self._inflight.get(key)
        if task is None:
            task = self._inflight[key] = asyncio.ensure_future(self._ask(ref, given))
            task.add_done_callback(lambda t: self._done(key, t))
        refusal = await asyncio.shield(task)  # a caller's deadline never cancels a shared check
        self._answers[key] = (self._clock() + self.ttl, refusal)
        self._answers.move_to_end(key)
        while len(self._answers) > self._max:
            self._answers.popitem(last=False)
        return refusal

    def _done(self, key: tuple[str, str], task: asyncio.Task[Unauthorized | None]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have gone (deadlines)

    async def _ask(self, ref: str, given: SourceCredentials) -> Unauthorized | None:
        """None when the origin lets ``given`` read ``ref``; the refusal otherwise (Unavailable raises)."""
        try:
            await self._probe(ref, given)
        except NotFound as e:  # registries answer 404 for repositories a login may not see
            return Unauthorized(f"{ref}: the volume's credentials cannot read it at its origin ({e}); {_HINT}")
        except Unauthorized as e:
            who = "the volume's credentials" if given != SourceCredentials() else "anonymous access"
            return Unauthorized(f"{ref}: its origin refused {who} ({e}); {_HINT}")
        return None

    async def _origin_probe(self, ref: str, credentials: SourceCredentials) -> None:
        source = open_source(parse(ref), dataclasses.replace(self._options, credentials=credentials))
        try:
            probe = getattr(source, "probe", None)
            if probe is None:  # a local path: nothing at an origin to ask
                return
            await probe()
        finally:
            await source.close()
