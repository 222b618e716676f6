"""A private, bandwidth-capped network of namespaces for peer tests (issue 11) and tools/bench_peers.py.

Topology (every name unique to the run; nothing touches the host's own interfaces):

    namespace <tag>-br    bridge "br0", 10.77.0.254/24: the controller's seat (API calls go from here)
    namespace <tag>-<n>   "eth0" 10.77.0.<n>/24, the peer of veth "v<n>" on br0 in <tag>-br

where ``<tag>`` is ``mc-<pid>-<k>``. Every node gets ``tc`` token-bucket
filters on both ends of its veth pair: the node end's egress is its upload
cap, the bridge end's egress its download cap. Addresses exist only inside
these namespaces, so no packet ever leaves them (the host sees no route to
10.77.0.0/24, and two labs running at once cannot collide: each has its own bridge).

Processes run in a namespace through ``ip netns exec``; Python code that
must talk to them (the controller) runs in threads that entered the bridge
namespace with ``setns(2)``, which moves only the calling thread.
:meth:`Lab.close` kills what the lab started and deletes its namespaces
(deleting a namespace deletes its veth ends and bridge), so a failed test
leaves nothing behind; labs of processes that died without closing are
removed by the next lab.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import itertools
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from daemon_support import DaemonProcess, _daemon_env

T = TypeVar("T")

SUBNET = "10.77.0"
SEAT = f"{SUBNET}.254"  # the bridge's own address, from which the controller talks to nodes
PORT = 8470
_CLONE_NEWNET = 0x40000000
_counter = itertools.count()
_NAME = re.compile(r"^mc-(\d+)-\d+-")


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} (iproute2) is not installed"
    probe = f"mc-{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _tc(ns: str, *args: str) -> None:
    done = subprocess.run(["ip", "netns", "exec", ns, "tc", *args], capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)} in {ns}: {done.stderr.strip()}")


def _cap(ns: str, dev: str, rate: int) -> None:
    """Egress of ``dev`` at ``rate`` bytes/s: a token bucket, bursts of 128 KiB, at most 25 ms queued.

    (tbf alone: the kernels this runs on may have no fair-queueing qdisc to put under it.)
    """
    _tc(ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate * 8}bit", "burst", "128k",
        "latency", "25ms")


def _enter(ns: str) -> None:
    """Move the calling thread into namespace ``ns`` (setns(2) on its /run/netns handle)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
    finally:
        os.close(fd)


def prune_stale() -> None:
    """Delete labs left by processes that are gone (a run killed before it could close its lab)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME.match(name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            _delete(name)


@dataclass
class Lab:
    """One bridge and ``nodes`` capped namespaces; see the module docstring. Use as a context manager."""

    nodes: int
    rate: int  # bytes per second, each direction of every node
    tag: str = field(default_factory=lambda: f"mc-{os.getpid()}-{next(_counter)}")
    processes: list[subprocess.Popen] = field(default_factory=list)
    _made: list[str] = field(default_factory=list)
    _seat: concurrent.futures.ThreadPoolExecutor | None = None

    def ns(self, n: int) -> str:
        """Node ``n``'s namespace (1-based)."""
        return f"{self.tag}-{n}"

    @staticmethod
    def address(n: int) -> str:
        """Node ``n``'s address."""
        return f"{SUBNET}.{n}"

    def __enter__(self) -> Lab:
        prune_stale()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        br = f"{self.tag}-br"
        for name in [br] + [self.ns(n) for n in range(1, self.nodes + 1)]:
            _ip("netns", "add", name)
            self._made.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", br, "link", "add", "br0", "type", "bridge")
        _ip("-n", br, "addr", "add", f"{SEAT}/24", "dev", "br0")
        _ip("-n", br, "link", "set", "br0", "up")
        for n in range(1, self.nodes + 1):
            _ip("-n", br, "link", "add", f"v{n}", "type", "veth", "peer", "name", "eth0", "netns", self.ns(n))
            _ip("-n", br, "link", "set", f"v{n}", "master", "br0")
            _ip("-n", br, "link", "set", f"v{n}", "up")
            _ip("-n", self.ns(n), "addr", "add", f"{self.address(n)}/24", "dev", "eth0")
            _ip("-n", self.ns(n), "link", "set", "eth0", "up")
            _cap(self.ns(n), "eth0", self.rate)  # the node's upload
            _cap(br, f"v{n}", self.rate)  # the node's download
        # Enough threads for a request and a wait per node at once: a queued wait would misdate a finish.
        self._seat = concurrent.futures.ThreadPoolExecutor(2 * self.nodes + 8, thread_name_prefix=br,
                                                           initializer=_enter, initargs=(br,))

    def seat(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Run ``fn(*args)`` in a thread inside the bridge namespace (it reaches every node's address)."""
        assert self._seat is not None
        return self._seat.submit(fn, *args)

    def inside(self, n: int, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a thread inside node ``n``'s namespace (its loopback is its own)."""
        with concurrent.futures.ThreadPoolExecutor(1, initializer=_enter, initargs=(self.ns(n),)) as one:
            return one.submit(fn, *args).result()

    def spawn(self, n: int, argv: list[str], *, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``argv`` in node ``n``'s namespace (``ip netns exec`` execs it: the pid is the program's)."""
        with open(log, "wb") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns(n), *argv], stdout=out,
                                    stderr=subprocess.STDOUT, env=env)
        self.processes.append(proc)
        return proc

    def sent_bytes(self, n: int) -> int:
        """Bytes node ``n`` has sent so far (its veth's counter: payload plus TCP/IP headers)."""
        out = subprocess.run(["ip", "netns", "exec", self.ns(n), "cat", "/sys/class/net/eth0/statistics/tx_bytes"],
                             capture_output=True, text=True, timeout=10).stdout
        return int(out.strip() or 0)

    def close(self) -> None:
        """Kill every process started here, then delete the namespaces (and with them every interface)."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._seat is not None:
            self._seat.shutdown(wait=True, cancel_futures=True)  # its threads hold the bridge namespace
            self._seat = None
        for name in reversed(self._made):
            _delete(name)
        self._made.clear()


def _delete(name: str) -> None:
    """Kill what still runs in namespace ``name`` (only a lab's own children can), then delete it."""
    for pid in subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def start_registry(lab: Lab, n: int, root: Path) -> str:
    """docker-registry in node ``n``'s namespace on port 5000 (access log on); return its host:port there."""
    if shutil.which("docker-registry") is None:
        raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: false\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        "http:\n  addr: 0.0.0.0:5000\n")
    lab.spawn(n, ["docker-registry", "serve", str(config)], log=root / "registry.log")
    host = f"{lab.address(n)}:5000"
    lab.seat(_wait_http, f"http://{host}/v2/", 20.0).result()
    return host


def blob_bytes_served(log: Path) -> int:
    """Bytes of blob bodies the registry sent, from its access log (combined format: status, then size)."""
    total = 0
    for line in log.read_text(errors="replace").splitlines():
        m = re.search(r'"GET [^"]*/blobs/sha256:[0-9a-f]{64} [^"]*" (\d{3}) (\d+)', line)
        if m and m.group(1) in ("200", "206"):
            total += int(m.group(2))
    return total


def start_daemon(lab: Lab, n: int, root: Path, *extra: str, env: dict[str, str] | None = None) -> DaemonProcess:
    """``modelcache serve`` in node ``n``'s namespace on its address, started (see :func:`wait_ready`)."""
    root.mkdir(parents=True, exist_ok=True)
    store, sock = root / "store", root / "csi" / "csi.sock"
    http = f"{lab.address(n)}:{PORT}"
    log = root / f"daemon-{time.monotonic_ns()}.log"
    proxyless = {k: None for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY")}
    proc = lab.spawn(n, [sys.executable, "-m", "modelcache", "serve", "--store", str(store), "--listen", http,
                         "--csi-socket", str(sock), "--node-name", f"node{n}", *extra],
                     log=log, env=_daemon_env({**proxyless, **(env or {})}))
    return DaemonProcess(store, sock, http, proc, log)


def wait_ready(lab: Lab, daemons: list[DaemonProcess]) -> None:
    """Wait until every daemon answers /readyz (from the seat, all at once); learn their API tokens."""
    for waiting in [lab.seat(_wait_ready, d) for d in daemons]:
        waiting.result(60)


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up in {timeout}s") from None
            time.sleep(0.05)


def _wait_ready(daemon: DaemonProcess, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            raise RuntimeError("daemon exited:\n" + daemon.log.read_text())
        try:
            if daemon.call("GET", "/readyz")[0] == 200:
                daemon.token = (daemon.store / "api-token").read_text().strip()
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("daemon did not become ready:\n" + daemon.log.read_text())


def timed_pulls(lab: Lab, daemons: list[DaemonProcess], ref: str, timeout: float = 60.0) -> tuple[float, list[dict]]:
    """Start a pull of ``ref`` on every daemon at once (from the seat); wait for all.

    Returns the makespan, from just before the first request to the moment the
    last job was seen done (polled every 50 ms), and the finished jobs.
    """
    started = time.monotonic()
    posts = [lab.seat(d.call, "POST", "/v1/pulls", {"ref": ref}) for d in daemons]
    ids = []
    for post in posts:
        status, job = post.result(30)
        assert status == 202, job
        ids.append(job["id"])
    waits = [lab.seat(_wait_timed, d, job_id, timeout) for d, job_id in zip(daemons, ids, strict=True)]
    finished = [w.result(timeout + 10) for w in waits]
    return max(at for at, _ in finished) - started, [job for _, job in finished]


def _wait_timed(daemon: DaemonProcess, job_id: str, timeout: float) -> tuple[float, dict]:
    job = daemon.wait_pull(job_id, timeout)
    return time.monotonic(), job


@dataclass
class PeerRun:
    """What one scenario measured (seconds and bytes)."""

    model_bytes: int
    solo: list[float]  # one node alone, each run with a fresh store
    makespan: float  # every node at once, first start to last finish
    origin_bytes: int  # blob bytes the registry sent during the all-nodes run
    jobs: list[dict]  # the all-nodes run's finished pull jobs
    expected: dict[str, str]  # file -> sha256 of the model pushed
    logs: list[Path]
    cpu: float = 0.0  # CPU seconds the daemons used during the all-nodes run (all of them together)

    @property
    def solo_median(self) -> float:
        """The median solo time."""
        return statistics.median(self.solo)

    @property
    def ratio(self) -> float:
        """All nodes' makespan over one node alone."""
        return self.makespan / self.solo_median

    @property
    def origin_ratio(self) -> float:
        """Origin bytes over the model's size."""
        return self.origin_bytes / self.model_bytes


def peer_scenario(root: Path, *, nodes: int, rate: int, file_sizes: list[int], solo_runs: int = 1,
                  timeout: float = 60.0, extra: tuple[str, ...] = ()) -> PeerRun:
    """Push a model of random files to a registry in a lab of ``nodes`` + 1 namespaces, each capped at ``rate``
    bytes/s both ways; time one node alone pulling it (``solo_runs`` times, fresh store each), then all
    ``nodes`` at once with peer sharing (fresh stores). The registry is node 1, the daemons nodes 2.."""
    import hashlib
    import random

    from support import MP_ARTIFACT, MP_CONFIG, MP_WEIGHT, Registry

    rng = random.Random(11)
    files = {f"w{i}.bin": rng.randbytes(size) for i, size in enumerate(file_sizes)}
    expected = {name: "sha256:" + hashlib.sha256(data).hexdigest() for name, data in files.items()}
    secret = root / "peer-secret"
    secret.write_text("a-shared-secret-of-enough-bytes\n")
    with Lab(nodes + 1, rate) as lab:
        host = start_registry(lab, 1, root / "registry")
        local = Registry(host="127.0.0.1:5000", root=root / "registry")  # inside its namespace: not capped
        layers = [(data, MP_WEIGHT, {"org.cncf.model.filepath": name}) for name, data in files.items()]
        lab.inside(1, partial(local.push_image, "models/big", "v1", layers, config=b"{}", config_type=MP_CONFIG,
                              artifact_type=MP_ARTIFACT))
        del layers, files  # 200 MB less in this process while the daemons run
        ref = f"oci://{host}/models/big:v1"
        logs: list[Path] = []
        solo = []
        for run in range(solo_runs):
            alone = start_daemon(lab, 2, root / f"solo{run}", "--plain-http", *extra)
            wait_ready(lab, [alone])
            logs.append(alone.log)
            took, [job] = timed_pulls(lab, [alone], ref, timeout)
            assert job["state"] == "done", job
            solo.append(took)
            alone.stop()
            shutil.rmtree(root / f"solo{run}", ignore_errors=True)
        urls = ",".join(f"http://{lab.address(n)}:{PORT}" for n in range(2, nodes + 2))
        before = blob_bytes_served(root / "registry" / "registry.log")
        started = [start_daemon(lab, n, root / f"node{n}", "--plain-http", "--peers", urls,
                                "--peer-secret-file", str(secret), *extra) for n in range(2, nodes + 2)]
        wait_ready(lab, started)
        logs += [d.log for d in started]
        cpu = sum(cpu_seconds(d.process.pid) for d in started)
        makespan, jobs = timed_pulls(lab, started, ref, timeout)
        cpu = sum(cpu_seconds(d.process.pid) for d in started) - cpu
        origin = blob_bytes_served(root / "registry" / "registry.log") - before
    return PeerRun(model_bytes=sum(file_sizes), solo=solo, makespan=makespan, origin_bytes=origin, jobs=jobs,
                   expected=expected, logs=logs, cpu=cpu)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds process ``pid`` has used (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_TRACE = re.compile(r"peertrace t=([\d.]+) ev=(\S+) d=(\S+) at=(\d+) n=(\d+) who=(\S+)")


@dataclass(frozen=True)
class Span:
    """One range moved, from a daemon's trace (``MODELCACHE_PEER_TRACE``, :mod:`modelcache.p2p.trace`)."""

    node: int  # index of the log it came from
    kind: str  # origin | get | serve
    digest: str
    at: int
    start: float
    end: float
    n: int  # bytes moved
    who: str


def spans(logs: list[Path]) -> list[Span]:
    """The ranges the daemons' traces show, start and end paired per (node, kind, blob, offset, peer)."""
    out = []
    for node, path in enumerate(logs):
        opened: dict[tuple[str, str, int, str], list[float]] = {}
        for line in path.read_text(errors="replace").splitlines():
            m = _TRACE.search(line)
            if not m:
                continue
            t, ev, digest, at, n, who = float(m[1]), m[2], m[3], int(m[4]), int(m[5]), m[6]
            kind, _, edge = ev.partition("-")
            key = (kind, digest, at, who if kind != "origin" else "-")
            if edge == "start":
                opened.setdefault(key, []).append(t)
            elif edge == "end" and opened.get(key):
                out.append(Span(node, kind, digest, at, opened[key].pop(0), t, n, who))
    return out


def timeline(logs: list[Path], *, step: float = 0.5) -> str:
    """A table of MB/s per ``step`` seconds, origin and peer bytes received by each node, from their traces
    (a range's bytes spread evenly over its span), and when each node's origin and peer traffic began and ended."""
    got = [s for s in spans(logs) if s.kind in ("origin", "get") and s.n]
    if not got:
        return "no trace (run the daemons with MODELCACHE_PEER_TRACE=1)"
    t0 = min(s.start for s in got)
    bins = int((max(s.end for s in got) - t0) / step) + 1
    nodes = sorted({s.node for s in got})
    rate = {(node, kind): [0.0] * bins for node in nodes for kind in ("origin", "get")}
    for s in got:
        length = max(s.end - s.start, 1e-6)
        for b in range(int((s.start - t0) / step), int((s.end - t0) / step) + 1):
            lo, hi = max(s.start, t0 + b * step), min(s.end, t0 + (b + 1) * step)
            if hi > lo and b < bins:
                rate[(s.node, s.kind)][b] += s.n * (hi - lo) / length / step / 1e6
    head = "  t(s) " + " ".join(f"n{node}:origin/peer" for node in nodes)
    rows = [head]
    for b in range(bins):
        rows.append(f"{b * step:6.1f} " + " ".join(
            f"{rate[(node, 'origin')][b]:7.1f}/{rate[(node, 'get')][b]:<6.1f}" for node in nodes))
    for node in nodes:
        mine = [s for s in got if s.node == node]
        for kind in ("origin", "get"):
            of = [s for s in mine if s.kind == kind]
            if of:
                rows.append(f"n{node} {kind:6s} {len(of):3d} ranges {sum(s.n for s in of) / 1e6:6.1f} MB "
                            f"from {min(s.start for s in of) - t0:5.2f} to {max(s.end for s in of) - t0:5.2f} s")
    return "\n".join(rows)
