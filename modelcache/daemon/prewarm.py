"""The pre-warm controller in every daemon: ModelPrewarms in, warm models, pins, labels and status out.

Shape (client-go's): two informers (:mod:`..kube.informer`) keep ModelPrewarms
and Nodes in local caches by list and watch in threads; their events only
put keys on an asyncio queue; one worker reconciles a key from the caches,
comparing what should be with what is, so a missed, repeated or reordered
event is harmless. Every key is requeued each ``resync`` seconds, which is
also when a Ready model's files are checked to still be on disk.

For one ModelPrewarm, this daemon:

- decides whether its node is chosen: the node matches ``spec.nodeSelector``
  and, with ``spec.count``, is among the ``count`` heaviest matching nodes by
  rendezvous hashing of model and node name (:mod:`..kube.rendezvous`), which
  every daemon computes alike from its node cache;
- if chosen, pulls the model through the daemon's :class:`PullManager` (the
  same single-flight jobs as ``POST /v1/pulls``), pins the view with owner
  ``prewarm:<namespace>/<name>`` (unless ``spec.pin`` is false; the pull job
  takes that pin while its own lease still holds the view, so gc or the
  budget never evict a model between its pull's end and its pin) and reports
  Pending, Pulling (bytes), Ready or Failed (a reason) in its own entry of
  ``status.nodes``; a failed pull is retried after ``retry_failed`` seconds;
- if not chosen (any more), or the resource is gone: drops that owner's pins
  (the files stay until evicted) and its own status entry.

Status entries are written by **patch with retry on conflict**: the daemon
reads the object, replaces only its own entry in ``status.nodes``, and sends
a merge patch naming the resourceVersion it read; a 409 Conflict (another
node wrote meanwhile) makes it read and try again, so no node's entry is
ever lost. The aggregate ``ready``, ``desired``, ``Ready`` condition and
``observedGeneration`` are written the same way by the holder of a Lease
(:mod:`..kube.leader`), which also drops entries of nodes no longer chosen;
``nodeLabel`` is written by the first node to be Ready (it knows the digest).

The node carries ``modelcache.io/warm-<hash>`` (:func:`..kube.names.warm_label`)
for each model Ready here and still on disk, and no other label of that
prefix. With a startup taint, the taint is removed from the node once every
ModelPrewarm choosing it is Ready here, or after ``startup_timeout``.

Everything runs in the daemon's task group and stops when cancelled at drain;
the informers' threads are stopped and the Lease is given up.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import Busy, InvalidReference, ModelCacheError
from ..kube import names, rendezvous, selector
from ..kube.informer import Informer
from ..kube.leader import Elector
from ..tree import Filters
from .pulls import Hold, PullJob, PullManager

log = logging.getLogger(__name__)

LEASE_NAME = "modelcache-prewarm"
CALL_TIMEOUT = 10.0
CONFLICT_RETRIES = 10
SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass(frozen=True)
class PrewarmConfig:
    """What ``serve --prewarm`` and its companion flags say."""

    kubeconfig: Path | None = None  # None: the in-cluster config
    namespace: str = ""  # where the leader Lease lives; "" = the pod's own namespace (or modelcache-system)
    startup_taint: str | None = None
    startup_timeout: float = 600.0
    resync: float = 300.0  # seconds between full requeues (and checks that Ready models are still on disk)
    lease_duration: float = 15.0
    retry_failed: float = 30.0
    progress_interval: float = 10.0  # seconds between Pulling status updates (each is a write to the object)
    watch_timeout: int = 300


def lease_namespace(config: PrewarmConfig) -> str:
    """The namespace of the leader Lease: as configured, else the pod's own, else modelcache-system."""
    if config.namespace:
        return config.namespace
    try:
        return SA_NAMESPACE.read_text().strip() or "modelcache-system"
    except OSError:
        return "modelcache-system"


def load_client(kubeconfig: Path | None) -> Any:
    """An ApiClient for the kubeconfig (or the in-cluster config); InvalidReference saying why not (blocks)."""
    from kubernetes import client
    from kubernetes import config as kube_config

    configuration = client.Configuration()
    try:
        if kubeconfig is not None:
            kube_config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration,
                                         persist_config=False)
        else:
            kube_config.load_incluster_config(client_configuration=configuration)
    except (kube_config.ConfigException, OSError, ValueError) as e:
        where = f"--kubeconfig {kubeconfig}" if kubeconfig else "the in-cluster config"
        raise InvalidReference(f"--prewarm: cannot load {where}: {e} (pass --kubeconfig or --prewarm off)") from e
    configuration.retries = 2
    return client.ApiClient(configuration)


@dataclass
class Warm:
    """What this node did for one ModelPrewarm: the model, its view and digest once Ready."""

    model: str
    filters: Filters
    pin: bool
    state: str = "Pending"
    view: str | None = None  # sha256:<hex> once Ready
    digest: str | None = None
    job: PullJob | None = None
    hold: Hold | None = None  # the pin ``job`` takes for us before it lets go of the view, if one was asked for
    reason: str = ""
    retry_at: float = 0.0  # monotonic time before which a Failed model is not pulled again


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PrewarmController:
    """Reconciles ModelPrewarms for one node (see the module docstring)."""

    def __init__(self, config: PrewarmConfig, node: str, pulls: PullManager, api_client: Any) -> None:
        from kubernetes import client

        self.config, self.node, self.pulls, self.store = config, node, pulls, pulls.store
        self._api_client = api_client
        self._custom = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)
        self.elector = Elector(api_client, lease_namespace(config), LEASE_NAME, node, duration=config.lease_duration)
        self.warm: dict[str, Warm] = {}
        self.gate_open = config.startup_taint is None
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._started = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self.prewarms = Informer("modelprewarms", functools.partial(
            self._custom.list_cluster_custom_object, names.GROUP, names.VERSION, names.PLURAL),
            self._notify_prewarm, watch_timeout=config.watch_timeout)
        self.nodes = Informer("nodes", self._core.list_node, self._notify_node, watch_timeout=config.watch_timeout)

    # -- events: keys only ----------------------------------------------------------

    def _notify_prewarm(self, key: str) -> None:  # informer thread
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.enqueue, key)

    def _notify_node(self, key: str) -> None:  # informer thread
        # Which nodes match decides which are chosen: any node change may move any ModelPrewarm.
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.enqueue_all)

    def enqueue(self, key: str) -> None:
        if key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def enqueue_all(self) -> None:
        for key in set(self.prewarms.keys()) | set(self.warm):
            self.enqueue(key)
        self.enqueue("")  # "": the node itself (labels, the startup gate, pins of resources gone)

    def _later(self, delay: float, key: str) -> None:
        assert self._tasks is not None

        async def requeue() -> None:
            await asyncio.sleep(delay)
            self.enqueue(key)

        self._tasks.create_task(requeue())

    # -- running --------------------------------------------------------------------

    async def run(self) -> None:
        """Run until cancelled (the daemon's drain)."""
        self._loop = asyncio.get_running_loop()
        self.prewarms.start()
        self.nodes.start()
        log.info("pre-warm controller for node %s (lease %s/%s)", self.node, self.elector.namespace, LEASE_NAME)
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                tasks.create_task(self._elect())
                tasks.create_task(self._resync())
                if self.config.startup_taint is not None:
                    self._later(self.config.startup_timeout, "")
                await self._synced()
                self.enqueue_all()
                await self._work()
        finally:
            await asyncio.gather(asyncio.to_thread(self.prewarms.stop), asyncio.to_thread(self.nodes.stop),
                                 asyncio.to_thread(self.elector.release), return_exceptions=True)

    async def _synced(self) -> None:
        # threading.Events set by the informers' threads: polled, so no thread waits past a cancellation.
        while not (self.prewarms.synced.is_set() and self.nodes.synced.is_set()):  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    async def _elect(self) -> None:
        was = False
        while True:
            leading = await asyncio.to_thread(self.elector.try_acquire)
            if leading and not was:
                log.info("pre-warm: node %s writes the aggregate status now (lease held)", self.node)
                self.enqueue_all()
            was = leading
            await asyncio.sleep(self.elector.retry)

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.config.resync)
            self.enqueue_all()

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            try:
                if key:
                    await self.reconcile(key)
                if self._queue.empty():  # a batch is done: the node's own state follows from all of them
                    await self.reconcile_node()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the API unreachable, a conflict past retries: try again later
                log.warning("pre-warm %s: %s: %s; retrying", key or "(node)", type(e).__name__, e)
                self._later(self.config.retry_failed / 6, key)

    # -- one ModelPrewarm ----------------------------------------------------------

    def chosen(self, obj: dict) -> list[str]:
        """The nodes ``obj`` chooses, from the node cache."""
        spec = obj.get("spec") or {}
        wanted = spec.get("nodeSelector")
        matching = [name for name in self.nodes.each(
            lambda n: n["metadata"]["name"] if selector.matches(wanted, n["metadata"].get("labels")) else None) if name]
        count = spec.get("count")
        return rendezvous.choose(str(spec.get("model", "")), matching, int(count) if count else None)

    async def reconcile(self, key: str) -> None:
        obj = self.prewarms.get(key)
        if obj is None or self.node not in self.chosen(obj):
            await self._release(key, obj)
        else:
            await self._warm(key, obj)
        if obj is not None and self.elector.leading:
            await asyncio.to_thread(self._write_aggregate, key)

    async def _release(self, key: str, obj: dict | None) -> None:
        ns, _, name = key.partition("/")
        if (warm := self.warm.pop(key, None)) is not None:
            await self._withdraw(warm)
            log.info("pre-warm %s: node %s is not chosen any more: unpinned (files stay until evicted)", key,
                     self.node)
        await asyncio.to_thread(self._unpin_all, names.pin_owner(ns, name))
        if obj is not None and self._entry(obj) is not None:
            await asyncio.to_thread(self._write_entry, key, None)

    async def _warm(self, key: str, obj: dict) -> None:
        spec = obj.get("spec") or {}
        model = str(spec.get("model", ""))
        filters = Filters.of(spec.get("include") or [], spec.get("exclude") or [])
        pin = spec.get("pin") is not False
        ns, _, name = key.partition("/")
        owner = names.pin_owner(ns, name)
        warm = self.warm.get(key)
        if warm is not None and (warm.model, warm.filters.key()) != (model, filters.key()):
            await self._withdraw(warm)  # the spec names another model now
            await asyncio.to_thread(self._unpin_all, owner)
            warm = None
        if warm is None:
            warm = self.warm[key] = Warm(model, filters, pin)
        warm.pin = pin

        if warm.state == "Ready" and warm.view is not None and not await asyncio.to_thread(self._on_disk, warm):
            log.warning("pre-warm %s: %s is no longer on disk (evicted or failed verification): pulling again",
                        key, model)
            warm.state, warm.view, warm.digest = "Pending", None, None
            await self._sync_labels()  # the label goes now, not after the pull that puts the files back
        if warm.state != "Ready":
            await self._advance(key, warm)
        if warm.state == "Ready":
            await asyncio.to_thread(self._hold, warm, owner)
        entry: dict[str, Any] = {"node": self.node, "state": warm.state, "reason": warm.reason}
        if warm.job is not None and warm.state == "Pulling":
            entry.update(bytesDone=warm.job.stats.bytes_done, bytesTotal=warm.job.stats.bytes_total)
        label = names.warm_label(warm.digest) if warm.state == "Ready" and warm.digest else None
        await asyncio.to_thread(self._write_entry, key, entry, label)

    async def _advance(self, key: str, warm: Warm) -> None:
        """Move a model that is not Ready along: find it in the store, or start, follow and finish its pull."""
        job = warm.job
        if job is None and warm.state == "Failed" and time.monotonic() < warm.retry_at:
            return  # our own status write woke us: the retry is scheduled already
        if job is None:
            try:
                canonical = await self.pulls.admit(warm.model)
                owner = names.pin_owner(*key.split("/", 1)) if warm.pin else None
                cached = await asyncio.to_thread(self._cached, canonical, warm.filters, owner)
                if cached is not None:
                    warm.state, warm.view, warm.digest, warm.reason = "Ready", cached[0], cached[1], ""
                    return
                # The job pins the view for us before its own lease lets go of it: none of gc, the budget or
                # another pull's reservation can evict the model between the pull's end and our pin.
                hold = Hold.pin(owner) if owner is not None else None
                job = warm.job = await self.pulls.start(warm.model, warm.filters, hold=hold)
                warm.hold = hold
            except Busy as e:
                warm.state, warm.reason = "Pending", str(e)
                self._later(e.retry_after or 5.0, key)
                return
            except ModelCacheError as e:
                self._failed(key, warm, str(e))
                return
            assert self._tasks is not None
            self._tasks.create_task(self._follow(key, job))
        if job.state in ("pending", "running"):
            warm.state, warm.reason = "Pulling", ""
        elif job.state == "done" and job.path is not None:
            pulled = await asyncio.to_thread(self.store.index.lookup, job.ref, warm.filters.key())
            warm.job = warm.hold = None  # the pin the job took is ours now: _hold keeps or drops it
            if pulled is None:  # evicted between the pull's end and now (not pinned): pull again
                self.enqueue(key)
                return
            warm.state, warm.view, warm.digest, warm.reason = "Ready", pulled[0], pulled[1], ""
            log.info("pre-warm %s: %s is warm on node %s", key, warm.model, self.node)
        else:
            warm.job = warm.hold = None  # a failed job took no lease for anyone
            self._failed(key, warm, str(job.error or "the pull failed"))

    async def _withdraw(self, warm: Warm) -> None:
        """This model is no longer wanted here: its pull job (which runs on) must not pin it for us."""
        job, hold = warm.job, warm.hold
        warm.job = warm.hold = None
        if job is not None and hold is not None:
            await self.pulls.withdraw(job, hold)

    def _failed(self, key: str, warm: Warm, reason: str) -> None:
        warm.state, warm.reason = "Failed", reason
        warm.retry_at = time.monotonic() + self.config.retry_failed
        self._later(self.config.retry_failed, key)

    async def _follow(self, key: str, job: PullJob) -> None:
        """Requeue ``key`` every progress interval while its pull runs (Pulling bytes), and once it ends."""
        assert job.task is not None
        while not job.task.done():
            await asyncio.wait({job.task}, timeout=self.config.progress_interval)
            self.enqueue(key)

    # -- the node: labels, the startup gate, pins of resources gone -----------------

    async def reconcile_node(self) -> None:
        await asyncio.to_thread(self._drop_stray_pins)
        await self._sync_labels()
        if not self.gate_open:
            await self._check_gate()

    async def _sync_labels(self) -> None:
        node = self.nodes.get(self.node)
        if node is None:
            return
        want = {names.warm_label(w.digest) for w in self.warm.values() if w.state == "Ready" and w.digest}
        have = {k for k, v in (node["metadata"].get("labels") or {}).items()
                if k.startswith(names.LABEL_PREFIX) and v == "true"}
        stale = {k for k in (node["metadata"].get("labels") or {}) if k.startswith(names.LABEL_PREFIX)} - want
        if want == have and not stale:
            return
        labels: dict[str, str | None] = {k: "true" for k in want - have}
        labels.update({k: None for k in stale})
        log.info("node %s: warm labels %s", self.node,
                 ", ".join(f"+{k}" if v else f"-{k}" for k, v in sorted(labels.items())))
        await asyncio.to_thread(self._core.patch_node, self.node, {"metadata": {"labels": labels}},
                                _content_type="application/merge-patch+json", _request_timeout=CALL_TIMEOUT)

    async def _check_gate(self) -> None:
        taint = self.config.startup_taint
        node = self.nodes.get(self.node)
        if node is None or taint is None:
            return
        waiting = [k for k, obj in self.prewarms.items().items()
                   if self.node in self.chosen(obj) and (self.warm.get(k) is None or self.warm[k].state != "Ready")]
        timed_out = time.monotonic() - self._started >= self.config.startup_timeout
        if waiting and not timed_out:
            return
        if waiting:
            log.warning("node %s: startup timeout (%.0fs): removing taint %s with %s not Ready", self.node,
                        self.config.startup_timeout, taint, ", ".join(waiting))
        await asyncio.to_thread(self._remove_taint, taint)
        self.gate_open = True

    # -- in threads -----------------------------------------------------------------

    def _cached(self, canonical: str, filters: Filters, pin_owner: str | None) -> tuple[str, str] | None:
        """(view, model digest) of the model if the store has its tree already; pinned for ``pin_owner`` (if
        any) in the lookup's own transaction, so gc cannot take it between the lookup and the pin."""
        def present(view: str) -> bool:
            return self.store.view_path(view).is_dir()

        if pin_owner is not None:
            return self.store.index.pin_ref(canonical, filters.key(), pin_owner, present)
        found = self.store.index.lookup(canonical, filters.key())
        return found if found is not None and present(found[0]) else None

    def _on_disk(self, warm: Warm) -> bool:
        """A Ready model's view is still recorded and its tree still there (gc, the budget or verify may drop it)."""
        assert warm.view is not None
        return warm.view in self.store.index.views() and self.store.view_path(warm.view).is_dir()

    def _hold(self, warm: Warm, owner: str) -> None:
        assert warm.view is not None
        pinned = {v for lease in self.store.index.leases("pin") if lease.owner == owner for v in lease.views}
        if warm.pin and warm.view not in pinned:
            self.store.index.pin(warm.view, owner=owner)
        for view in pinned - ({warm.view} if warm.pin else set()):
            self.store.index.unpin(view, owner=owner)

    def _unpin_all(self, owner: str) -> None:
        for lease in self.store.index.leases("pin"):
            if lease.owner == owner:
                for view in lease.views:
                    self.store.index.unpin(view, owner=owner)

    def _drop_stray_pins(self) -> None:
        """Pins of ModelPrewarms this node no longer warms (deleted while the daemon was down, say)."""
        mine = {names.pin_owner(*k.split("/", 1)) for k in self.warm}
        for lease in self.store.index.leases("pin"):
            if lease.owner.startswith("prewarm:") and lease.owner not in mine:
                for view in lease.views:
                    self.store.index.unpin(view, owner=lease.owner)
                log.info("dropped the pin of %s: this node does not warm it", lease.owner)

    def _entry(self, obj: dict) -> dict | None:
        for e in (obj.get("status") or {}).get("nodes") or []:
            if e.get("node") == self.node:
                return e
        return None

    def _patch_status(self, key: str, change: Callable[[dict], dict | None]) -> None:
        """Read, ``change(object) -> status patch or None``, merge-patch with the version read; retry on 409."""
        from kubernetes.client.exceptions import ApiException

        ns, _, name = key.partition("/")
        for _ in range(CONFLICT_RETRIES):
            try:
                obj: dict = self._custom.get_namespaced_custom_object(  # type: ignore[assignment]
                    names.GROUP, names.VERSION, ns, names.PLURAL, name, _request_timeout=CALL_TIMEOUT)
                patch = change(obj)
                if patch is None:
                    return
                self._custom.patch_namespaced_custom_object_status(
                    names.GROUP, names.VERSION, ns, names.PLURAL, name,
                    {"metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]}, "status": patch},
                    _content_type="application/merge-patch+json", _request_timeout=CALL_TIMEOUT)
                return
            except ApiException as e:
                if e.status == 404:  # deleted meanwhile: nothing to report on
                    return
                if e.status != 409:
                    raise
                log.debug("status of %s: conflict, reading again", key)
        raise ModelCacheError(f"status of {key}: still conflicting after {CONFLICT_RETRIES} tries")

    def _write_entry(self, key: str, entry: dict | None, label: str | None = None) -> None:
        """Put (or with None remove) this node's entry in status.nodes, others' entries untouched."""
        def change(obj: dict) -> dict | None:
            status = obj.get("status") or {}
            entries = [e for e in status.get("nodes") or [] if e.get("node") != self.node]
            old = self._entry(obj)
            patch: dict[str, Any] = {}
            if entry is not None:
                fresh = {k: v for k, v in entry.items() if v not in ("", None)}
                if old is None or {k: v for k, v in old.items() if k != "updated"} != fresh:
                    entries.append({**fresh, "updated": _now()})
                    patch["nodes"] = sorted(entries, key=lambda e: e["node"])
            elif old is not None:
                patch["nodes"] = entries
            if label and not status.get("nodeLabel"):
                patch["nodeLabel"] = label
            return patch or None

        cached = self.prewarms.get(key)
        if cached is not None and entry is not None:  # skip the read when the cache already agrees
            old = self._entry(cached)
            fresh = {k: v for k, v in entry.items() if v not in ("", None)}
            if (old is not None and {k: v for k, v in old.items() if k != "updated"} == fresh
                    and (not label or (cached.get("status") or {}).get("nodeLabel"))):
                return
        self._patch_status(key, change)

    def _write_aggregate(self, key: str) -> None:
        """The leader's part: ready/desired, the Ready condition, observedGeneration; entries of unchosen nodes go."""
        def change(obj: dict) -> dict | None:
            status = obj.get("status") or {}
            chosen = set(self.chosen(obj))
            entries = status.get("nodes") or []
            kept = [e for e in entries if e.get("node") in chosen]
            ready = sum(1 for e in kept if e.get("state") == "Ready")
            desired = len(chosen)
            failed = [e["node"] for e in kept if e.get("state") == "Failed"]
            if desired == 0:
                cond, reason, message = "False", "NoMatchingNodes", "no node matches the selector"
            elif ready >= desired:
                cond, reason, message = "True", "Warm", f"{ready}/{desired} nodes hold the model warm"
            elif failed:
                cond, reason, message = "False", "PullFailed", f"{ready}/{desired} ready; failed on {', '.join(failed)}"
            else:
                cond, reason, message = "False", "Warming", f"{ready}/{desired} nodes ready"
            generation = obj["metadata"].get("generation", 1)
            old = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
            condition = {"type": "Ready", "status": cond, "reason": reason, "message": message,
                         "observedGeneration": generation,
                         "lastTransitionTime": old["lastTransitionTime"] if old and old.get("status") == cond
                         else _now()}
            patch: dict[str, Any] = {}
            if kept != entries:
                patch["nodes"] = kept
            if status.get("ready") != ready or status.get("desired") != desired:
                patch.update(ready=ready, desired=desired)
            if old != condition:
                others = [c for c in status.get("conditions") or [] if c.get("type") != "Ready"]
                patch["conditions"] = [*others, condition]
            if status.get("observedGeneration") != generation:
                patch["observedGeneration"] = generation
            wanted = names.scale_selector(obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
            if status.get("selector") != wanted:  # the scale subresource's, for HPA (selects no pod)
                patch["selector"] = wanted
            return patch or None

        self._patch_status(key, change)

    def _remove_taint(self, taint: str) -> None:
        """Drop ``taint`` from this node: a JSON patch that first tests the version read (retried on change)."""
        from kubernetes.client.exceptions import ApiException

        for _ in range(CONFLICT_RETRIES):
            node: Any = self._core.read_node(self.node, _preload_content=False, _request_timeout=CALL_TIMEOUT)
            doc = json.loads(node.data)
            taints = (doc.get("spec") or {}).get("taints") or []
            kept = [t for t in taints if t.get("key") != taint]
            if kept == taints:
                return
            try:
                self._core.patch_node(self.node, [
                    {"op": "test", "path": "/metadata/resourceVersion", "value": doc["metadata"]["resourceVersion"]},
                    {"op": "replace", "path": "/spec/taints", "value": kept}],
                    _content_type="application/json-patch+json", _request_timeout=CALL_TIMEOUT)
                log.info("node %s: startup taint %s removed", self.node, taint)
                return
            except ApiException as e:
                if e.status not in (409, 422):  # 422: the test failed, the node changed since we read it
                    raise
        raise ModelCacheError(f"node {self.node}: could not remove taint {taint}: it kept changing")


def prewarm_default(kubeconfig: str | None, environ: Any = os.environ) -> bool:
    """On by default when there is an API to talk to: a kubeconfig given, or the in-cluster config."""
    return bool(kubeconfig) or bool(environ.get("KUBERNETES_SERVICE_HOST"))
