"""A private containerd (Debian's), as kubelet's runtime would mount an Image VolumeSource.

Started by the test with its own root, state and sockets in a temp dir and the
CRI plugin disabled; `ctr image pull --plain-http` then `ctr image mount`.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path


class Containerd:
    """``with Containerd(tmp) as ctd: ctd.mount(ref, dir)``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "containerd.sock"
        self.mounts: list[Path] = []

    def __enter__(self) -> Containerd:
        if not shutil.which("containerd"):
            raise RuntimeError("containerd is not installed (apt-get install containerd)")
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.root / "root"}"\nstate = "{self.root / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.socket}"\n'
            f'[ttrpc]\n  address = "{self.root / "ttrpc.sock"}"\n'
            f'[debug]\n  address = "{self.root / "debug.sock"}"\n'
            '[metrics]\n  address = ""\n')
        self.process = subprocess.Popen(["containerd", "--config", str(config)],
                                        stdout=open(self.root / "containerd.log", "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError("containerd did not start:\n" + (self.root / "containerd.log").read_text()[-2000:])
            time.sleep(0.1)
        return self

    def _ready(self) -> bool:
        return self.socket.exists() and self.ctr("version", check=False).returncode == 0

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ctr", "--address", str(self.socket), *args], capture_output=True, text=True,
                              timeout=120, check=check)

    def mount(self, ref: str, target: Path) -> Path:
        """Pull ``ref`` over plain HTTP and mount its rootfs read-only at ``target``."""
        self.ctr("image", "pull", "--plain-http", ref)
        target.mkdir(parents=True, exist_ok=True)
        self.ctr("image", "mount", ref, str(target))
        self.mounts.append(target)
        return target

    def __exit__(self, *exc: object) -> None:
        for target in self.mounts:
            self.ctr("image", "unmount", str(target), check=False)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # containerd leaves its snapshot mounts behind only on a crash; be sure.
        subprocess.run(["umount", "-R", "-l", str(self.root / "root")], capture_output=True, check=False)
