"""Leader election with a coordination.k8s.io Lease, as client-go's leaderelection does.

One daemon at a time holds the Lease (``spec.holderIdentity``, its node
name) and renews ``spec.renewTime`` every ``retry`` seconds. Another takes
it over only once ``renewTime + leaseDurationSeconds`` has passed. Every
write names the Lease's resourceVersion, so two daemons racing for it cannot
both win: the loser gets 409 Conflict. A holder that could not renew within
its ``renew_deadline`` (shorter than the duration) stops acting as leader
before anyone else may start. :meth:`Elector.release` gives the Lease up
on shutdown (an empty holder), so the next daemon need not wait it out.

The calls block (the ``kubernetes`` client is synchronous): run them in a thread.
"""

from __future__ import annotations

import datetime
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

CALL_TIMEOUT = 5.0


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Elector:
    """Acquire or renew one Lease for ``identity``."""

    def __init__(self, api_client: Any, namespace: str, name: str, identity: str, *,
                 duration: float = 15.0) -> None:
        from kubernetes import client

        self._client = client
        self._api = client.CoordinationV1Api(api_client)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.duration = max(1, round(duration))
        self.renew_deadline = duration * 2 / 3
        self.retry = max(0.2, duration / 5)
        self._renewed: float | None = None  # monotonic time of our last successful renewal

    @property
    def leading(self) -> bool:
        """True while our last renewal is younger than the renew deadline."""
        return self._renewed is not None and time.monotonic() - self._renewed < self.renew_deadline

    def try_acquire(self) -> bool:
        """Take or renew the Lease once; whether we hold it now (blocks)."""
        from kubernetes.client.exceptions import ApiException

        c = self._client
        started = time.monotonic()
        now = _now()
        try:
            try:
                lease = self._api.read_namespaced_lease(self.name, self.namespace, _request_timeout=CALL_TIMEOUT)
            except ApiException as e:
                if e.status != 404:
                    raise
                spec = c.V1LeaseSpec(holder_identity=self.identity, lease_duration_seconds=self.duration,
                                     acquire_time=now, renew_time=now, lease_transitions=0)
                self._api.create_namespaced_lease(self.namespace, c.V1Lease(
                    metadata=c.V1ObjectMeta(name=self.name, namespace=self.namespace), spec=spec),
                    _request_timeout=CALL_TIMEOUT)
            else:
                spec = lease.spec or c.V1LeaseSpec()
                holder = spec.holder_identity or ""
                if holder and holder != self.identity and spec.renew_time is not None:
                    expires = spec.renew_time + datetime.timedelta(seconds=spec.lease_duration_seconds or
                                                                   self.duration)
                    if expires > now:
                        self._renewed = None
                        return False
                if holder != self.identity:
                    spec.acquire_time = now
                    spec.lease_transitions = (spec.lease_transitions or 0) + 1
                    log.info("taking the lease %s/%s over from %r", self.namespace, self.name, holder)
                spec.holder_identity, spec.renew_time, spec.lease_duration_seconds = self.identity, now, self.duration
                lease.spec = spec
                self._api.replace_namespaced_lease(self.name, self.namespace, lease, _request_timeout=CALL_TIMEOUT)
        except ApiException as e:
            if e.status != 409:  # 409: another daemon won this round
                log.warning("lease %s/%s: %s %s", self.namespace, self.name, e.status, e.reason)
            return self.leading
        except Exception as e:
            log.warning("lease %s/%s: %s: %s", self.namespace, self.name, type(e).__name__, e)
            return self.leading
        self._renewed = started
        return True

    def release(self) -> None:
        """Give the Lease up if we hold it (blocks; best effort)."""
        if self._renewed is None:
            return
        self._renewed = None
        try:
            lease = self._api.read_namespaced_lease(self.name, self.namespace, _request_timeout=CALL_TIMEOUT)
            if lease.spec is not None and lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = ""
                lease.spec.renew_time = _now()
                lease.spec.lease_duration_seconds = 1
                self._api.replace_namespaced_lease(self.name, self.namespace, lease, _request_timeout=CALL_TIMEOUT)
        except Exception as e:
            log.info("could not give the lease %s/%s up: %s", self.namespace, self.name, e)
