"""Fixtures that start real servers on loopback: CNCF Distribution (docker-registry)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Registry, free_port

# A suite started as a background job of a non-interactive shell (`cmd &` in a script) inherits SIGINT
# ignored, and so would every CLI it starts: the Ctrl-C tests (test_transfer_faults) would see the pull
# finish as if never interrupted. Put back Python's own handler; the commands started get the default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")




def wait_http(url: str, timeout: float = 20.0, ok=(200, 401)) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status in ok:
                    return
        except urllib.error.HTTPError as e:
            if e.code in ok:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up in {timeout}s")
        time.sleep(0.05)


def start_registry(root: Path, *, extra_config: str = "") -> tuple[subprocess.Popen, str]:
    """Start docker-registry with storage under ``root``; return (process, host:port)."""
    if not shutil.which("docker-registry"):
        pytest.fail("docker-registry is not installed (apt-get install docker-registry)")
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
        + extra_config
    )
    log = open(root / "registry.log", "wb")
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    host = f"127.0.0.1:{port}"
    try:
        wait_http(f"http://{host}/v2/")
    except RuntimeError:
        proc.kill()
        raise RuntimeError((root / "registry.log").read_text()) from None
    return proc, host


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One anonymous registry for the whole session (tests use distinct repositories)."""
    root = tmp_path_factory.mktemp("registry")
    proc, host = start_registry(root)
    try:
        yield Registry(host=host, root=root)
    finally:
        stop(proc)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """An empty store directory."""
    return tmp_path / "store"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """One SeaweedFS S3 server for the session (tests use distinct buckets)."""
    from s3_support import start_seaweed, stop_seaweed

    server = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    try:
        yield server
    finally:
        stop_seaweed(server)
