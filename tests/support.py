"""Test helpers that speak the distribution API directly (not through modelcache).

Images made here are written byte by byte from the OCI specs with urllib, so
a bug in modelcache's own manifest code cannot hide in both the image and the
pull of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MP_WEIGHT = "application/vnd.cncf.model.weight.v1.raw"
MP_CONFIG = "application/vnd.cncf.model.config.v1+json"
MP_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- the transfer engine, one fetch at a time (test_engine.py, test_direct_writes.py) ------------


def blob_of(data: bytes):
    """The blob that names ``data``."""
    from modelcache.model import Blob

    return Blob(sha256(data), len(data))


def fetch_once(content, blobs, router, cfg, **kwargs):
    """One engine, one fetch (``kwargs`` go to it) in a fresh event loop, the engine closed after;
    return its TransferStats."""
    import asyncio

    from modelcache.transfer import Engine

    async def go():
        engine = Engine(content, cfg)
        try:
            return await engine.fetch(blobs, router, **kwargs)
        finally:
            engine.close()

    return asyncio.run(go())


def fetch_interrupted(content, blobs, router, cfg, *, until=None, grace: float = 0.0) -> None:
    """Start a fetch, let it run until ``until()`` holds (if given; checked every 10 ms, 5 s at most)
    and ``grace`` seconds more, then cancel it, as Ctrl-C would: it must end cancelled (not done before)."""
    import asyncio

    import pytest

    from modelcache.transfer import Engine

    async def go() -> None:
        engine = Engine(content, cfg)
        try:
            task = asyncio.create_task(engine.fetch(blobs, router))
            for _ in range(500 if until is not None else 0):
                if until():
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(grace)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            engine.close()

    asyncio.run(go())


@dataclass
class Registry:
    """A running docker-registry on loopback."""

    host: str  # "127.0.0.1:PORT"
    root: Path
    auth: str | None = None  # value of an Authorization header to send, if the registry needs one

    def url(self, path: str) -> str:
        return f"http://{self.host}{path}"

    def _request(self, method: str, url: str, data: bytes | None = None, headers: dict | None = None):
        req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
        if self.auth:
            req.add_header("Authorization", self.auth)
        return urllib.request.urlopen(req, timeout=60)

    def push_blob(self, repo: str, data: bytes) -> dict:
        """Monolithic upload (POST then PUT ?digest=); return a descriptor stub."""
        digest = sha256(data)
        with self._request("POST", self.url(f"/v2/{repo}/blobs/uploads/"), data=b"") as resp:
            location = resp.headers["Location"]
        if location.startswith("/"):
            location = self.url(location)
        sep = "&" if "?" in location else "?"
        with self._request("PUT", f"{location}{sep}digest={digest}", data=data,
                           headers={"Content-Type": "application/octet-stream"}):
            pass
        return {"digest": digest, "size": len(data)}

    def push_manifest(self, repo: str, ref: str, manifest: dict | bytes, media_type: str = OCI_MANIFEST) -> str:
        body = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        with self._request("PUT", self.url(f"/v2/{repo}/manifests/{ref}"), data=body,
                           headers={"Content-Type": media_type}):
            pass
        return sha256(body)

    def push_image(self, repo: str, tag: str, layers: list[tuple[bytes, str, dict | None]], *,
                   config: bytes | None = None, config_type: str = OCI_CONFIG,
                   artifact_type: str | None = None) -> str:
        """Push layers (bytes, media type, annotations) and a manifest; return its digest."""
        config = config if config is not None else json.dumps(
            {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        cfg = self.push_blob(repo, config)
        descs = []
        for data, media_type, notes in layers:
            d = self.push_blob(repo, data)
            d["mediaType"] = media_type
            if notes:
                d["annotations"] = notes
            descs.append(d)
        manifest: dict = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                          "config": {"mediaType": config_type, **cfg}, "layers": descs}
        if artifact_type:
            manifest["artifactType"] = artifact_type
        return self.push_manifest(repo, tag, manifest)


def make_tar(entries: list[tuple[str, bytes | None, dict]], *, fmt=tarfile.PAX_FORMAT) -> bytes:
    """A tar archive from (name, data or None, TarInfo field overrides)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data, fields in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 0
            for key, value in fields.items():
                setattr(info, key, value)
            if data is not None and info.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def write_random(path: Path, size: int, seed: int = 0) -> bytes | None:
    """Write ``size`` pseudo-random bytes (returns them when small)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rnd = __import__("random").Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rnd.randbytes(n))
            left -= n
    return path.read_bytes() if size <= (1 << 20) else None


def run_cli(*args: str, store: Path, env: dict | None = None, timeout: float = 120,
            check: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m modelcache --store STORE ARGS`` as a user would."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "modelcache", "--store", str(store), *args],
                          capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"modelcache {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def tree_digests(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every regular file under ``root`` (symlinks as '-> target')."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = sha256(p.read_bytes())
    return out


def resident(path: Path) -> float:
    """The fraction of ``path``'s pages in the page cache (mincore(2))."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        try:
            vec = (ctypes.c_ubyte * pages)()
            assert libc.mincore(ctypes.c_void_p(addr), size, vec) == 0, ctypes.get_errno()
            return sum(v & 1 for v in vec) / pages
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)


class FetchingNeverReady:
    """A peer server's engine that is fetching every piece and never has it ready: asks wait out their wait."""

    learned: dict[str, str] = {}

    def fetches(self, digest: str) -> bool:
        return True

    async def ensure_piece(self, digest: str, offset: int, *, wait: float) -> bool:
        await asyncio.sleep(wait)
        return False


def write_layout(root: Path, layers: list[tuple[bytes, str]], *, tag: str = "v1") -> Path:
    """An OCI image layout at ``root`` holding one image tagged ``tag``: these (bytes, media type) layers."""
    def put(data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "blobs" / "sha256" / digest).write_bytes(data)
        return {"digest": "sha256:" + digest, "size": len(data)}

    config = put(json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": []}}).encode())
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                           "layers": [{"mediaType": media_type, **put(data)} for data, media_type in layers]})
    desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", **put(manifest.encode()),
            "annotations": {"org.opencontainers.image.ref.name": tag}}
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    return root


def held_unlinks(monkeypatch) -> threading.Event:
    """From now on the store's background unlinks (store/unlinker.py) wait for the returned event; an rm it
    hands off does not."""
    from modelcache.store import unlinker

    go_on = threading.Event()
    real = unlinker._unlink

    def held(path: Path) -> None:
        go_on.wait(60)
        real(path)

    monkeypatch.setattr(unlinker, "_unlink", held)
    return go_on


def settled_count(count: Callable[[], int], *, quiet: float = 0.3, most: float = 10.0) -> int:
    """``count()`` once it has not changed for ``quiet`` seconds (at most ``most``): after a client is killed,
    a request it sent just before can still be on its way to the server that logs it."""
    last, since, deadline = count(), time.monotonic(), time.monotonic() + most
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.05)
        if (now := count()) != last:
            last, since = now, time.monotonic()
    return last


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now, for daemons that must know each other's before they start.

    Taken below the kernel's ephemeral range: a port from it, once released, could be handed to an outgoing
    connection or to a server binding port 0 (a proxy) before the daemon binds it.
    """
    import random
    import socket

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    held: list[socket.socket] = []
    try:
        candidates = range(max(1024, low - 12000), low)
        for port in random.sample(candidates, min(200, len(candidates))):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)
            if len(held) == n:
                return [h.getsockname()[1] for h in held]
        while len(held) < n:  # no room below the ephemeral range: ports from it, still distinct while held
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            held.append(s)
        return [h.getsockname()[1] for h in held]
    finally:
        for s in held:
            s.close()


def free_port() -> int:
    """One port free on 127.0.0.1 now (see :func:`free_ports`)."""
    return free_ports(1)[0]
