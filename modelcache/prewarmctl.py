"""``modelcache prewarm``: create, update, watch, list and delete ModelPrewarm resources.

A ModelPrewarm (``modelprewarms.modelcache.io/v1alpha1``, namespaced) asks
the node daemons to keep a model warm on the nodes its selector matches; the
daemons report per-node status (README: "Pre-warming models"). This module
is the user's side of it, over the user's kubeconfig:

- apply: the spec given on the command line *replaces* the resource's spec
  (a flag left out is removed), written with the object's resourceVersion
  and retried on conflict, so a concurrent writer is never overwritten blind;
- wait: reads the object once per ``interval`` until its status has caught
  up with the spec just written (``observedGeneration``) and its ``Ready``
  condition is True; a node in state Failed, or the deadline, ends the wait
  with an error. A GET a second of one object costs the API server less than
  a watch connection kept open, and needs no relist logic on expiry;
- errors are one line: no cluster reachable, the CRD not installed (with the
  command that installs it), RBAC refusals, validation messages.

The ``kubernetes`` client is synchronous; so is this command.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from .errors import (
    Forbidden,
    InvalidReference,
    ModelCacheError,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from .kube.names import GROUP, KIND, PLURAL, VERSION
from .progress import duration, human

INSTALL_HINT = "install the CRD with: kubectl apply -k daemonset/"
REQUEST_TIMEOUT = 15.0  # seconds per API call
CONFLICT_RETRIES = 5
LINE_INTERVAL = 5.0  # seconds between progress lines for one pulling node, off a terminal

_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")  # RFC 1123 subdomain, as metadata.name
_LABEL_NAME_RE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE_RE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


# -- the object ----------------------------------------------------------------------


def name_arg(text: str) -> str:
    """A resource name (RFC 1123 subdomain), checked before the API server would."""
    if len(text) > 253 or not _NAME_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}: a name is lower-case letters, digits, '-' and '.'")
    return text


def parse_selector(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` of a node label (the label syntax of the Kubernetes API conventions)."""
    key, sep, value = text.partition("=")
    prefix, _, name = key.rpartition("/")
    if (not sep or len(name) > 63 or not _LABEL_NAME_RE.fullmatch(name) or len(value) > 63
            or not _LABEL_VALUE_RE.fullmatch(value) or (prefix and not _NAME_RE.fullmatch(prefix))):
        raise InvalidReference(f"--selector {text!r}: expected a node label as KEY=VALUE")
    return key, value


def check_ref(text: str) -> None:
    """A syntax error in the model is the user's to fix now, not a Failed status on every node later.

    Each node resolves the reference, so it needs its scheme; the paths of ``file://`` and
    ``oci-layout://`` are on the nodes (allowed there with ``serve --allow-local``), not checked here.
    """
    from .refs import lower_scheme, parse

    text = lower_scheme(text.strip())
    if "://" not in text:
        raise InvalidReference(f"{text!r}: the nodes resolve the model, so give its scheme: oci://, s3://, hf:// "
                               "(or file:///PATH for a directory on the nodes)")
    if not text.startswith(("file://", "oci-layout://")):
        parse(text)


def build_spec(model: str, *, include: Sequence[str] = (), exclude: Sequence[str] = (),
               selector: Sequence[tuple[str, str]] = (), count: int | None = None, pin: bool = True) -> dict:
    """The resource's ``spec``: what was asked for, and ``pin`` always.

    ``pin`` is written even at its default (true) because the API server fills defaults in:
    left out, the stored spec would differ from ours and every re-run would rewrite it.
    """
    spec: dict[str, Any] = {"model": model, "pin": pin}
    if include:
        spec["include"] = list(include)
    if exclude:
        spec["exclude"] = list(exclude)
    if selector:
        spec["nodeSelector"] = {"matchLabels": dict(selector)}
    if count is not None:
        spec["count"] = count
    return spec


# -- talking to the API server --------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where the resources live: a client for custom objects, the namespace, the server's URL."""

    api: Any  # kubernetes.client.CustomObjectsApi
    namespace: str
    server: str


def connect(kubeconfig: str | None, namespace: str | None) -> Target:
    """A client from ``kubeconfig`` (else $KUBECONFIG, ~/.kube/config, or the in-cluster config).

    The namespace is ``namespace``, else the kubeconfig context's, else ``default``.
    """
    from kubernetes import client
    from kubernetes import config as kube_config

    configuration = client.Configuration()
    path = os.path.expanduser(kubeconfig) if kubeconfig else None
    try:
        if path is None and not _has_kubeconfig() and os.environ.get("KUBERNETES_SERVICE_HOST"):
            kube_config.load_incluster_config(client_configuration=configuration)
            context_ns = _incluster_namespace()
        else:
            kube_config.load_kube_config(config_file=path, client_configuration=configuration)
            _, active = kube_config.list_kube_config_contexts(config_file=path)
            context_ns = (active or {}).get("context", {}).get("namespace")
    except (kube_config.ConfigException, OSError, ValueError, TypeError) as e:
        where = path or os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise InvalidReference(f"cannot load the kubeconfig {where}: {e} (pass --kubeconfig PATH)") from e
    configuration.retries = 1  # a refused connection is reported, not retried for long
    return Target(client.CustomObjectsApi(client.ApiClient(configuration)), namespace or context_ns or "default",
                  configuration.host)


def _has_kubeconfig() -> bool:
    paths = os.environ.get("KUBECONFIG", "").split(os.pathsep)
    return any(p and os.path.exists(os.path.expanduser(p)) for p in paths) or os.path.exists(
        os.path.expanduser("~/.kube/config"))


def _incluster_namespace() -> str | None:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip() or None
    except OSError:
        return None


_CONFLICT = object()  # what _call returns for a 409 when the caller retries conflicts


def _call(target: Target, what: str, fn: Callable[..., Any], *args: Any, missing_ok: bool = False,
          conflict_ok: bool = False) -> Any:
    """One API call; its failures as our errors, with what to do about them.

    ``missing_ok``: a 404 for the object (the CRD being installed) returns None.
    ``conflict_ok``: a 409 returns :data:`_CONFLICT`, for the caller to read again and retry.
    """
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return fn(*args, _request_timeout=REQUEST_TIMEOUT)
    except ApiException as e:
        if e.status == 404 and not crd_installed(target):
            raise NotFound(f"the API server at {target.server} has no {PLURAL}.{GROUP} resource: "
                           f"{INSTALL_HINT}") from e
        if e.status == 404 and missing_ok:
            return None
        if e.status == 409 and conflict_ok:
            return _CONFLICT
        raise _api_error(e, what) from e
    except (HTTPError, OSError) as e:
        raise Unavailable(f"cannot reach the Kubernetes API at {target.server}: {_reason(e)}") from e


def _reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None)
    return str(reason or e).splitlines()[0][:200]


def _api_error(e: Any, what: str) -> ModelCacheError:
    import json

    try:
        message = json.loads(e.body or "{}").get("message") or e.reason
    except (ValueError, AttributeError):
        message = e.reason
    text = f"{what}: {message}"
    if e.status == 401:
        return Unauthenticated(f"{text} (the kubeconfig's credentials were refused)")
    if e.status == 403:
        return Forbidden(f"{text} (ask for RBAC on {PLURAL}.{GROUP} in this namespace)")
    if e.status == 404:
        return NotFound(text)
    if e.status in (400, 422):
        return InvalidReference(text)
    if e.status in (429, 500, 502, 503, 504):
        return Unavailable(text)
    return ModelCacheError(f"{text} (HTTP {e.status})")


def crd_installed(target: Target) -> bool:
    """Whether the API server serves ``modelprewarms`` in ``modelcache.io/v1alpha1`` (discovery)."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        found = target.api.get_api_resources(GROUP, VERSION, _request_timeout=REQUEST_TIMEOUT)
    except ApiException as e:
        if e.status == 404:
            return False
        return True  # cannot tell (e.g. 403 on discovery): let the original error speak
    except (HTTPError, OSError):
        return True  # the same
    return any(r.name == PLURAL for r in (found.resources or []))


def get(target: Target, name: str) -> dict:
    """The resource ``name``; ``NotFound`` when it does not exist."""
    return _call(target, f"{KIND} {target.namespace}/{name}", target.api.get_namespaced_custom_object,
                 GROUP, VERSION, target.namespace, PLURAL, name)


def apply(target: Target, name: str, spec: dict) -> tuple[dict, str]:
    """Create the resource, or replace its spec; return it and ``created``, ``configured`` or ``unchanged``."""
    what, api, ns = f"{KIND} {target.namespace}/{name}", target.api, target.namespace
    for _ in range(CONFLICT_RETRIES):
        current = _call(target, what, api.get_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, name,
                        missing_ok=True)
        if current is None:
            body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
                    "metadata": {"name": name, "namespace": ns}, "spec": spec}
            created = _call(target, what, api.create_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, body,
                            conflict_ok=True)
            if created is not _CONFLICT:  # else created meanwhile by someone else: update it instead
                return created, "created"
            continue
        if current.get("spec") == spec:
            return current, "unchanged"
        current["spec"] = spec  # resourceVersion stays: a concurrent change makes this a 409, and we read again
        replaced = _call(target, what, api.replace_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, name,
                         current, conflict_ok=True)
        if replaced is not _CONFLICT:
            return replaced, "configured"
    raise Unavailable(f"{what}: kept changing under us ({CONFLICT_RETRIES} conflicts in a row); try again")


def delete(target: Target, name: str) -> None:
    """Delete the resource (the daemons unpin the model and remove their labels)."""
    _call(target, f"{KIND} {target.namespace}/{name}", target.api.delete_namespaced_custom_object,
          GROUP, VERSION, target.namespace, PLURAL, name)


def list_all(target: Target) -> list[dict]:
    """Every ModelPrewarm of the namespace."""
    found = _call(target, f"{PLURAL} in {target.namespace}", target.api.list_namespaced_custom_object,
                  GROUP, VERSION, target.namespace, PLURAL)
    return list(found.get("items") or [])


# -- status ----------------------------------------------------------------------------


def is_current(obj: dict) -> bool:
    """Whether the status describes the spec as it is now (the controller saw this generation)."""
    generation = (obj.get("metadata") or {}).get("generation")
    observed = (obj.get("status") or {}).get("observedGeneration")
    return generation is None or (observed is not None and observed >= generation)


def is_ready(obj: dict) -> bool:
    """The ``Ready`` condition is True."""
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def failed_nodes(obj: dict) -> list[dict]:
    """Status entries in state Failed."""
    return [n for n in (obj.get("status") or {}).get("nodes") or [] if n.get("state") == "Failed"]


class LineDisplay:
    """Progress off a terminal: a line per node when its state changes, and every few seconds while pulling."""

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.clock = stream, clock
        self._last: dict[str, tuple[str, float]] = {}

    def update(self, obj: dict) -> None:
        for entry in (obj.get("status") or {}).get("nodes") or []:
            node, state = entry.get("node", "?"), entry.get("state", "Pending")
            seen = self._last.get(node)
            if seen and seen[0] == state and (state != "Pulling" or self.clock() - seen[1] < LINE_INTERVAL):
                continue
            self._last[node] = (state, self.clock())
            print(f"{node}  {_describe(entry)}", file=self.stream, flush=True)

    def close(self) -> None:
        pass


class BarDisplay:
    """Progress on a terminal: one rich bar per node, bytes done of bytes total, and its state."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

        self._progress = Progress(TextColumn("{task.fields[node]}"), BarColumn(), DownloadColumn(binary_units=True),
                                  TextColumn("{task.fields[state]}"), console=Console(file=stream))
        self._tasks: dict[str, Any] = {}
        self._progress.start()

    def update(self, obj: dict) -> None:
        for entry in (obj.get("status") or {}).get("nodes") or []:
            node = entry.get("node", "?")
            if node not in self._tasks:
                self._tasks[node] = self._progress.add_task(node, node=node, state="", total=None)
            total = entry.get("bytesTotal") or None
            done = total if entry.get("state") == "Ready" and total else entry.get("bytesDone") or 0
            self._progress.update(self._tasks[node], total=total, completed=done, state=_state_text(entry))

    def close(self) -> None:
        self._progress.stop()


def _state_text(entry: dict) -> str:
    state = entry.get("state", "Pending")
    return f"{state}: {entry['reason']}" if state == "Failed" and entry.get("reason") else state


def _describe(entry: dict) -> str:
    text = _state_text(entry)
    if entry.get("state") == "Pulling" and entry.get("bytesTotal"):
        text += f"  {human(entry.get('bytesDone') or 0)} / {human(entry['bytesTotal'])}"
    return text


def wait(target: Target, name: str, *, timeout: float, interval: float, display: LineDisplay | BarDisplay,
         clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> dict:
    """Until the resource is Ready for its current spec; ``ModelCacheError`` on Failed, ``Unavailable`` on timeout."""
    deadline = clock() + timeout
    try:
        while True:
            obj = get(target, name)
            display.update(obj)
            if is_current(obj):
                if is_ready(obj):
                    return obj
                failed = failed_nodes(obj)
                if failed:
                    reasons = "; ".join(f"{n.get('node')}: {n.get('reason') or 'no reason given'}" for n in failed)
                    raise ModelCacheError(f"{KIND} {target.namespace}/{name} failed on {len(failed)} "
                                          f"node(s): {reasons}")
            if clock() >= deadline:
                status = obj.get("status") or {}
                raise Unavailable(f"{KIND} {target.namespace}/{name} not Ready after {duration(timeout)}: "
                                  f"{status.get('ready', 0)}/{status.get('desired', '?')} nodes ready")
            sleep(min(interval, max(0.0, deadline - clock())))
    finally:
        display.close()


# -- the command ----------------------------------------------------------------------------


def add_parser(sub: Any, env: Callable[..., object], env_list: Callable[[str], list[str]],
               env_bool: Callable[[str], bool], positive: Callable[[str], int],
               seconds: Callable[[str], float]) -> argparse.ArgumentParser:
    """``modelcache prewarm``'s arguments (the CLI's helpers read MODELCACHE_* defaults)."""
    p = sub.add_parser("prewarm", help="ask the node daemons to keep a model warm (a ModelPrewarm resource)")
    p.add_argument("ref", nargs="?", help="the model: any reference `pull` takes (oci://, s3://, hf://)")
    p.add_argument("--name", type=name_arg, default=env("name"), help="the ModelPrewarm's name")
    p.add_argument("-n", "--namespace", default=env("namespace"),
                   help="namespace (default: the kubeconfig context's, else default)")
    p.add_argument("--kubeconfig", default=env("kubeconfig"), metavar="PATH",
                   help="default: $KUBECONFIG, ~/.kube/config, or the in-cluster config")
    # Checked in run(), so a bad MODELCACHE_SELECTOR is a usage error there, not a crash building the parser.
    p.add_argument("--selector", action="append", metavar="KEY=VALUE", default=env_list("selector"),
                   help="only nodes with this label (repeatable: all must match); default: every node")
    p.add_argument("--count", type=positive, default=env("count"),
                   help="warm exactly N of the matching nodes (default: all of them)")
    p.add_argument("--include", action="append", default=env_list("include"), metavar="GLOB",
                   help="only files matching GLOB (repeatable)")
    p.add_argument("--exclude", action="append", default=env_list("exclude"), metavar="GLOB",
                   help="skip files matching GLOB (repeatable)")
    p.add_argument("--no-pin", action="store_true", default=env_bool("no_pin"),
                   help="let the nodes evict the model under disk pressure (default: pinned while it exists)")
    p.add_argument("--wait", action="store_true", default=env_bool("wait"),
                   help="show each node's progress until Ready; exit non-zero if a node fails")
    p.add_argument("--timeout", type=seconds, default=env("timeout", "1800"),
                   help="--wait: give up after this many seconds (default %(default)s)")
    p.add_argument("--interval", type=seconds, default=env("interval", "1"),
                   help="--wait: seconds between reads of the status (default %(default)s)")
    # No MODELCACHE_DELETE here: that variable is verify's yes/no, and a deletion is asked for in words.
    p.add_argument("--delete", type=name_arg, metavar="NAME", default=None,
                   help="delete the ModelPrewarm NAME (its nodes unpin the model and drop its label)")
    p.add_argument("--list", action="store_true", default=env_bool("list"),
                   help="list the namespace's ModelPrewarms")
    return p


def run(args: argparse.Namespace, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> int:
    """``modelcache prewarm``: one of apply (with ``--wait``), ``--delete`` or ``--list``."""
    modes = [m for m, on in (("REF", args.ref), ("--delete", args.delete), ("--list", args.list)) if on]
    if len(modes) != 1:
        raise InvalidReference("prewarm takes a model REF with --name, or --delete NAME, or --list"
                               + (f" (not {' and '.join(modes)})" if modes else ""))
    target = connect(args.kubeconfig, args.namespace)
    if args.list:
        _print_list(list_all(target), stdout)
        return 0
    if args.delete:
        delete(target, args.delete)
        print(f"{PLURAL}.{GROUP}/{args.delete} deleted from {target.namespace}", file=stdout)
        return 0
    if not args.name:
        raise InvalidReference("prewarm REF needs --name NAME (the ModelPrewarm's name)")
    check_ref(args.ref)
    selector = [parse_selector(text) for text in args.selector]
    spec = build_spec(args.ref, include=args.include, exclude=args.exclude, selector=selector,
                      count=int(args.count) if args.count is not None else None, pin=not args.no_pin)
    _, outcome = apply(target, args.name, spec)
    print(f"{PLURAL}.{GROUP}/{args.name} {outcome} in {target.namespace}", file=stdout, flush=True)
    if not args.wait:
        return 0
    display: LineDisplay | BarDisplay = BarDisplay(stderr) if stderr.isatty() else LineDisplay(stderr)
    obj = wait(target, args.name, timeout=args.timeout, interval=args.interval, display=display)
    status = obj.get("status") or {}
    label = f"; pods can prefer nodes labelled {status['nodeLabel']}=true" if status.get("nodeLabel") else ""
    print(f"{KIND} {target.namespace}/{args.name} Ready on {status.get('ready', 0)}/{status.get('desired', 0)} "
          f"nodes{label}", file=stdout)
    return 0


def _print_list(items: list[dict], stdout: TextIO) -> None:
    rows = [("NAME", "MODEL", "READY", "AGE")]
    now = datetime.now(UTC)
    for obj in items:
        meta, status = obj.get("metadata") or {}, obj.get("status") or {}
        age = "?"
        if meta.get("creationTimestamp"):
            created = datetime.fromisoformat(str(meta["creationTimestamp"]).replace("Z", "+00:00"))
            age = duration(max(0.0, (now - created).total_seconds()))
        rows.append((meta.get("name", "?"), (obj.get("spec") or {}).get("model", "?"),
                     f"{status.get('ready', 0)}/{status.get('desired', '?')}", age))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3], file=stdout)
