"""Running `modelcache serve` as a real process, and talking to it as kubelet and users do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import EllipsisType

import grpc
from support import free_port, free_ports  # noqa: F401 - the p2p tests take them from here

from modelcache.csi import csi_pb2 as pb
from modelcache.csi import csi_pb2_grpc as rpc


@dataclass
class DaemonProcess:
    """A daemon subprocess with its store, HTTP address and CSI socket."""

    store: Path
    socket: Path
    http: str
    process: subprocess.Popen
    log: Path
    token: str | None = None  # the bearer credential call() sends by default (token mode: the daemon's own)

    def call(self, method: str, path: str, body: dict | None = None, *, raw: bytes | None = None,
             token: str | None | EllipsisType = ...,
             response_headers: dict[str, str] | None = None) -> tuple[int, dict]:
        """One API request: ``body`` as JSON (or ``raw`` bytes as they are); ``token``: the bearer token to
        send (default :attr:`token`, None: none); ``response_headers`` is filled in."""
        status, doc, headers = self.call_full(method, path, body, raw=raw, token=token)
        if response_headers is not None:
            response_headers.update(headers)
        return status, doc

    def call_full(self, method: str, path: str, body: dict | None = None, *, raw: bytes | None = None,
                  token: str | None | EllipsisType = ...) -> tuple[int, dict, dict[str, str]]:
        """As :meth:`call`, with the response's headers too."""
        data = raw if raw is not None else json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data else {}
        bearer = self.token if token is ... else token
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        req = urllib.request.Request(f"http://{self.http}{path}", data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                answer = resp.read()
                return resp.status, json.loads(answer) if resp.headers.get_content_type() == "application/json" \
                    else {"text": answer.decode()}, dict(resp.headers)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}"), dict(e.headers)

    def metric(self, sample: str) -> float:
        """The value of one sample of /metrics, e.g. ``modelcache_cache_misses_total``; 0 if absent."""
        text = self.call("GET", "/metrics")[1]["text"]
        values = [float(line[len(sample) + 1:]) for line in text.splitlines() if line.startswith(sample + " ")]
        return values[0] if values else 0.0

    def wait_pull(self, job_id: str, timeout: float = 60) -> dict:
        """Poll GET /v1/pulls/{id} until the job is done or failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, job = self.call("GET", f"/v1/pulls/{job_id}")
            assert status == 200, job
            if job["state"] in ("done", "failed"):
                return job
            time.sleep(0.05)
        raise AssertionError(f"pull {job_id} did not finish in {timeout}s")

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"unix://{self.socket}")

    def node(self) -> rpc.NodeStub:
        return rpc.NodeStub(self.channel())

    def identity(self) -> rpc.IdentityStub:
        return rpc.IdentityStub(self.channel())

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_daemon(root: Path, *extra: str, store: Path | None = None, token: str | None = None,
                 env: dict[str, str | None] | None = None, listen: str | None = None) -> DaemonProcess:
    """Start a daemon with its own store and socket under ``root``; wait until ready.

    API authentication is token mode unless ``extra`` says otherwise (or ``env``
    sets ``MODELCACHE_API_AUTH``); ``env`` adds variables (None removes one).
    The returned process sends ``token`` with every call, by default the
    daemon's own: the ``--api-token-file`` passed, else ``<store>/api-token``.
    """
    root.mkdir(parents=True, exist_ok=True)
    store = store or root / "store"
    sock = root / "csi" / "csi.sock"
    http = listen or f"127.0.0.1:{free_port()}"  # given: peers must know each other's address before start
    log = root / f"daemon-{time.monotonic_ns()}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelcache", "serve", "--store", str(store), "--listen", http,
         "--csi-socket", str(sock), "--node-name", "test-node", "--chunk-size", "1M", *extra],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=_daemon_env(env))
    daemon = DaemonProcess(store, sock, http, proc, log, token)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("daemon exited:\n" + log.read_text())
        try:
            if daemon.call("GET", "/readyz")[0] == 200:
                if token is None:
                    daemon.token = _own_token(store, extra)
                return daemon
        except OSError:
            pass
        time.sleep(0.05)
    daemon.stop(signal.SIGKILL)
    raise RuntimeError("daemon did not become ready:\n" + log.read_text())


def _daemon_env(overrides: dict[str, str | None] | None) -> dict[str, str]:
    # Token mode unless a test asks for another: a suite run inside a pod must not turn kubernetes mode on.
    env = {k: v for k, v in os.environ.items() if k not in ("KUBERNETES_SERVICE_HOST", "MODELCACHE_API_AUTH")}
    env["MODELCACHE_API_AUTH"] = "token"
    for name, value in (overrides or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def _own_token(store: Path, extra: tuple[str, ...]) -> str | None:
    """The token a token-mode daemon accepts: its --api-token-file, else the one it made in the store."""
    args = list(extra)
    path = Path(args[args.index("--api-token-file") + 1]) if "--api-token-file" in args else store / "api-token"
    return path.read_text().strip() if path.exists() else None


def publish_request(volume_id: str, target: Path, model: str, **attrs: str) -> pb.NodePublishVolumeRequest:
    """NodePublishVolume as kubelet sends it for an inline ephemeral volume."""
    context = {
        "model": model,
        "csi.storage.k8s.io/ephemeral": "true",
        "csi.storage.k8s.io/pod.name": f"pod-{volume_id}",
        "csi.storage.k8s.io/pod.namespace": "default",
        "csi.storage.k8s.io/pod.uid": f"uid-{volume_id}",
        "csi.storage.k8s.io/serviceAccount.name": "default",
        **attrs,
    }
    capability = pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(),
        access_mode=pb.VolumeCapability.AccessMode(mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY))
    return pb.NodePublishVolumeRequest(volume_id=volume_id, target_path=str(target), volume_capability=capability,
                                       readonly=True, volume_context=context)


def mountinfo() -> dict[str, list[str]]:
    """Mount point -> its mount options, from /proc/self/mountinfo."""
    out = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            out[fields[4]] = fields[5].split(",")
    return out


def unmount_all_below(root: Path) -> None:
    """Lazily unmount anything a failed test left mounted under ``root``."""
    for point in sorted(mountinfo(), key=len, reverse=True):
        if point.startswith(str(root) + os.sep):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
