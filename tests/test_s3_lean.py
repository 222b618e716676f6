"""The lean S3 client: SigV4 signed by modelcache itself, checked against botocore's signer and SeaweedFS."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from support import sha256, tree_digests

from modelcache.sources import s3_client
from modelcache.sources.s3_sigv4 import Keys, presign, query, url


@pytest.mark.parametrize("path,params,token,headers", [
    ("/bucket/model/w.bin", "", None, {}),
    ("/b/a key+x/é?#%.bin", query(**{"list-type": 2, "prefix": "a b/"}), "session/token+=", {}),
    ("/b", query(**{"list-type": 2, "prefix": "", "continuation-token": "1/abc=="}), None, {}),
    ("/b/w.bin", "", None, {"x-amz-checksum-mode": "ENABLED"}),
], ids=["plain", "odd-key-and-token", "continuation", "signed-header"])
def test_signature_is_botocores(path: str, params: str, token: str | None, headers: dict[str, str]) -> None:
    """Same canonical request, same signature as botocore's S3 query signer, for any key, query and
    x-amz header signed beside host."""
    import botocore.auth
    import botocore.awsrequest
    import botocore.credentials

    now = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    mine = presign("GET", "https://s3.example.com:8443", path, Keys("AKID", "SECRET", token),
                   region="eu-west-1", query=params, now=now, headers=headers)
    request = botocore.awsrequest.AWSRequest(method="GET", url=url("https://s3.example.com:8443", path, params),
                                             headers=headers)
    with mock.patch("botocore.auth.get_current_datetime", return_value=now.replace(tzinfo=None)):
        botocore.auth.S3SigV4QueryAuth(botocore.credentials.Credentials("AKID", "SECRET", token), "s3", "eu-west-1",
                                       expires=3600).add_auth(request)
    assert mine.split("X-Amz-Signature=")[1] == request.url.split("X-Amz-Signature=")[1]
    assert mine.startswith(url("https://s3.example.com:8443", path))


def test_region_from_environment_then_config_file(tmp_path: Path, monkeypatch) -> None:
    """AWS_REGION, then AWS_DEFAULT_REGION, then the profile's region in the config file, then us-east-1."""
    config = tmp_path / "config"
    config.write_text("[default]\nregion = eu-north-1\n[profile other]\nregion = ap-south-1\n")
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    assert s3_client.region() == "eu-north-1"
    monkeypatch.setenv("AWS_PROFILE", "other")
    assert s3_client.region() == "ap-south-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    assert s3_client.region() == "us-west-2"
    monkeypatch.setenv("AWS_REGION", "ca-central-1")
    assert s3_client.region() == "ca-central-1"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "missing"))
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name)
    assert s3_client.region() == "us-east-1"


def test_a_pull_at_a_custom_endpoint_loads_no_boto(s3_server, tmp_path: Path) -> None:
    """Odd keys pull byte-exact, and neither boto3 nor botocore is imported (about a second of start-up)."""
    s3 = s3_server.client()
    s3.create_bucket(Bucket="models-lean")
    files = {"m/a key+plus/é?#.bin": os.urandom(3 << 20), "m/config.json": b"{}"}
    for key, data in files.items():
        s3.put_object(Bucket="models-lean", Key=key, Body=data)
    code = ("import sys; from modelcache.cli import main; "
            "rc = main(['--store', sys.argv[1], 'pull', '-q', 's3://models-lean/m']); "
            "print('boto' + 'core' in ' '.join(sys.modules), 'boto3' in sys.modules, file=sys.stderr); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store")], capture_output=True, text=True,
                          env={**os.environ, **s3_server.env()}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.split()[-2:] == ["False", "False"], proc.stderr
    assert tree_digests(Path(proc.stdout.split()[-1])) == {k[2:]: sha256(v) for k, v in files.items()}


def test_keys_from_the_credential_chain_when_the_environment_has_none(s3_server, tmp_path: Path) -> None:
    """No AWS_ACCESS_KEY_ID: the shared credentials file (botocore's chain) signs; none at all is refused (4)."""
    s3 = s3_server.client()
    s3.create_bucket(Bucket="models-chain")
    s3.put_object(Bucket="models-chain", Key="m/w.bin", Body=b"weights")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env = {**clean, "AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(tmp_path / "none")}

    def pull(credentials_file: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "modelcache", "--store", str(tmp_path / "store"), "pull",
                               "s3://models-chain/m"], capture_output=True, text=True, timeout=120,
                              env={**env, "AWS_SHARED_CREDENTIALS_FILE": str(credentials_file)})

    refused = pull(tmp_path / "none")
    assert refused.returncode == 4 and "no AWS credentials" in refused.stderr, refused.stderr
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[default]\naws_access_key_id = {s3_server.access_key}\n"
                           f"aws_secret_access_key = {s3_server.secret_key}\n")
    proc = pull(credentials)
    assert proc.returncode == 0, proc.stderr
    assert (Path(proc.stdout.split()[-1]) / "w.bin").read_bytes() == b"weights"
