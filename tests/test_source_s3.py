"""`modelcache pull s3://…` against a real S3 server (SeaweedFS on loopback)."""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path

import pytest
from support import MP_ARTIFACT, MP_CONFIG, MP_WEIGHT, run_cli, settled_count, sha256, tree_digests

from modelcache.errors import InvalidContent
from modelcache.refs import parse
from modelcache.sources import SourceOptions
from modelcache.sources.s3 import S3Source


def _upload(s3, bucket: str, files: dict[str, bytes], *, multipart: set[str] = frozenset()) -> None:
    from boto3.s3.transfer import TransferConfig

    small_parts = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    for key, data in files.items():
        if key in multipart:
            s3.upload_fileobj(io.BytesIO(data), bucket, key, Config=small_parts)
        else:
            s3.put_object(Bucket=bucket, Key=key, Body=data)


def _pull(s3_server, store: Path, ref: str, *extra: str, check: bool = True, timeout: float = 120):
    return run_cli("pull", "--chunk-size", "1M", ref, *extra, store=store, env=s3_server.env(), check=check,
                   timeout=timeout)


def _fetched(stderr: str) -> str:
    return stderr.split("fetched ")[-1].split(" in ")[0]


def test_pull_prefix_multipart_and_second_pull_is_free(s3_server, tmp_path: Path) -> None:
    """Objects under a prefix become the model; multipart ETags work; pulling again fetches nothing."""
    s3 = s3_server.client()
    s3.create_bucket(Bucket="models-basic")
    files = {"llama/model.safetensors": os.urandom(11 << 20), "llama/config.json": b'{"x": 1}',
             "llama/tok/tokenizer.json": b"{}", "other/ignored.bin": b"nope"}
    _upload(s3, "models-basic", files, multipart={"llama/model.safetensors"})
    etag = s3.head_object(Bucket="models-basic", Key="llama/model.safetensors")["ETag"]
    assert "-" in etag  # a multipart ETag: not an MD5
    first = _pull(s3_server, tmp_path / "store", "s3://models-basic/llama")
    assert tree_digests(Path(first.stdout.split()[-1])) == {
        k.removeprefix("llama/"): sha256(v) for k, v in files.items() if k.startswith("llama/")}
    second = _pull(s3_server, tmp_path / "store", "s3://models-basic/llama/")
    assert second.stdout.split()[-1] == first.stdout.split()[-1]
    assert _fetched(second.stderr) == "0 B"


def test_same_bytes_from_a_registry_are_not_fetched_again(s3_server, registry, tmp_path: Path) -> None:
    """After S3, a registry artifact with the same weights fetches only what is new."""
    s3 = s3_server.client()
    s3.create_bucket(Bucket="models-dedup")
    weights = os.urandom(4 << 20)
    _upload(s3, "models-dedup", {"m/w.bin": weights})
    _pull(s3_server, tmp_path / "store", "s3://models-dedup/m")
    registry.push_image("s3dedup/model", "v1", [(weights, MP_WEIGHT, {"org.cncf.model.filepath": "w.bin"}),
                                                (b"new", MP_WEIGHT, {"org.cncf.model.filepath": "extra.txt"})],
                        config=b"{}", config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)
    proc = run_cli("pull", f"oci://{registry.host}/s3dedup/model:v1", store=tmp_path / "store", check=True)
    assert _fetched(proc.stderr) == "3 B"


def test_listing_paginates(s3_server, tmp_path: Path) -> None:
    """More objects than one listing page (1000) all arrive."""
    s3 = s3_server.client()
    s3.create_bucket(Bucket="models-many")
    files = {f"many/f{n:05d}.txt": str(n).encode() for n in range(1100)}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: s3.put_object(Bucket="models-many", Key=kv[0], Body=kv[1]), files.items()))
    proc = _pull(s3_server, tmp_path / "store", "s3://models-many/many", timeout=240)
    assert len(tree_digests(Path(proc.stdout.split()[-1]))) == 1100


@pytest.mark.parametrize("ref,env,code", [
    ("s3://models-missing-bucket/x", {}, 3),
    ("s3://models-empty/nothing-here", {}, 3),
    ("s3://models-empty/x", {"AWS_SECRET_ACCESS_KEY": "wrong"}, 4),
], ids=["missing-bucket", "empty-prefix", "wrong-credentials"])
def test_refusals(s3_server, tmp_path: Path, ref: str, env: dict, code: int) -> None:
    """Missing bucket, empty prefix, wrong credentials: one clear line and the right exit code."""
    s3 = s3_server.client()
    if "models-empty" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket="models-empty")
    proc = run_cli("pull", ref, store=tmp_path / "store", env={**s3_server.env(), **env})
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("modelcache: error:") and "Traceback" not in proc.stderr


def test_layout_in_a_bucket(s3_server, tmp_path: Path) -> None:
    """A prefix holding an OCI layout (as `package --to s3://` writes it) is read as one, by --tag."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(os.urandom(2 << 20))
    (src / "config.json").write_text("{}")
    s3_server.client().create_bucket(Bucket="models-layout")
    for tag in ("v1", "v2"):
        run_cli("package", str(src), "--to", f"s3://models-layout/llama:{tag}", store=tmp_path / "pkg",
                env=s3_server.env(), check=True)
    proc = _pull(s3_server, tmp_path / "store", "s3://models-layout/llama", "--tag", "v2")
    assert tree_digests(Path(proc.stdout.split()[-1])) == tree_digests(src)
    untagged = _pull(s3_server, tmp_path / "store", "s3://models-layout/llama", check=False)
    assert untagged.returncode == 5 and "--tag" in untagged.stderr
    assert "(v1, v2)" in untagged.stderr  # the tags to choose from, as for a layout on disk


def test_object_changed_during_a_pull_is_an_error(s3_server, tmp_path: Path, monkeypatch) -> None:
    """Ranges are asked with If-Match: an object rewritten after listing is refused, not mixed."""
    s3 = s3_server.client()
    s3.create_bucket(Bucket="models-changing")
    _upload(s3, "models-changing", {"m/w.bin": os.urandom(1 << 20)})
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)

    async def main() -> None:
        source = S3Source(parse("s3://models-changing/m"), SourceOptions())
        try:
            model = await source.resolve()
            s3.put_object(Bucket="models-changing", Key="m/w.bin", Body=os.urandom(1 << 20))
            with pytest.raises(InvalidContent, match="changed during the pull"):
                async for _ in source.read(model.parts[0].blob, 0, 1000):
                    pass
        finally:
            await source.close()

    asyncio.run(main())


def _object_gets(proxy, key: str, *, since: int = 0) -> list[str]:
    """Ranges of the object GETs answered with data, among requests for ``key`` from the ``since``-th on."""
    return [e.range or "" for e in proxy.requests(key)[since:] if e.method == "GET" and e.status in (200, 206)]


def test_faults_are_retried_and_a_killed_pull_resumes(s3_server, tmp_path: Path) -> None:
    """The engine's rules hold for S3 (through a fault proxy, presigned URLs and all): 503s and a
    reset mid-range are retried, and a pull killed midway fetches only its non-durable chunks."""
    import signal
    import subprocess
    import sys
    import time

    from faultproxy import FaultProxy, http_error, reset_after

    from modelcache.store.content import _RECORD_HEADER

    s3 = s3_server.client()
    s3.create_bucket(Bucket="models-faults")
    data = os.urandom(8 << 20)
    s3.put_object(Bucket="models-faults", Key="m/model.safetensors", Body=data)
    upstream = s3_server.endpoint.removeprefix("http://")
    with FaultProxy(upstream, blobs="/models-faults/m/", rate=3 << 20) as proxy:
        proxy.inject(http_error(503, retry_after="0"), times=2)
        proxy.inject(reset_after(100_000))
        env = {**s3_server.env(), "AWS_ENDPOINT_URL": f"http://{proxy.host}"}
        store = tmp_path / "store"
        cmd = [sys.executable, "-m", "modelcache", "--store", str(store), "pull", "-q", "--chunk-size", "1M",
               "--concurrency", "2", "s3://models-faults/m"]
        first = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        records = store / "ingest"
        while not any(b"\x01" in r.read_bytes()[_RECORD_HEADER.size:] for r in records.glob("*/chunks")):
            assert time.monotonic() < deadline and first.poll() is None, "the pull made no progress"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert proxy.pending_faults() == 0  # the faults were met, and the pull went on past them
        [record] = [r.read_bytes() for r in records.glob("*/chunks")]
        durable = [i for i, done in enumerate(record[_RECORD_HEADER.size:]) if done]
        before = settled_count(lambda: len(proxy.requests("model.safetensors")))  # the killed pull's last in
        proxy.rate = None
        proc = run_cli("pull", "--chunk-size", "1M", "s3://models-faults/m", store=store, env=env, check=True)
        again = _object_gets(proxy, "model.safetensors", since=before)
    assert (Path(proc.stdout.split()[-1]) / "model.safetensors").read_bytes() == data
    assert durable and len(again) == 8 - len(durable), (durable, again)
    assert not {f"bytes={i << 20}-{((i + 1) << 20) - 1}" for i in durable} & set(again)


def test_s3_and_hub_sources_do_not_import_the_general_http_client() -> None:
    """Their bytes come through the lean reader: importing aiohttp (0.2 s) would only slow start-up."""
    import subprocess
    import sys

    code = ("import sys, modelcache.cli, modelcache.pull, modelcache.sources.s3, modelcache.sources.hf; "
            "print('aiohttp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
