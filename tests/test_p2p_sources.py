"""Peers for every source (issue 11): packaged piece lists, S3 objects and small Hub files, real daemons.

Same setup as tests/test_p2p_cluster.py: real `modelcache serve` processes
on loopback, a static peer list, 64 KiB pieces; the origin's bytes are
counted by a fault proxy in front of it (or the fake Hub's own logs).
"""

from __future__ import annotations

import hashlib
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web
from daemon_support import DaemonProcess, free_port, free_ports, start_daemon
from faultproxy import BackgroundServer, FaultProxy
from support import run_cli, tree_digests
from test_p2p_cluster import ENV, pull_all, secret, start_peers, stop_all  # noqa: F401 - secret is a fixture

LIED = "failed its digest check after bytes from peers"  # the engine's log line for a commit-time catch


class RandomLiar:
    """A peer that answers every range of every blob with random bytes of the right length."""

    def __init__(self) -> None:
        self.requests = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if "/v1/peer/blobs/" not in request.path:
            return web.Response(status=404)
        self.requests += 1
        first, _, last = request.headers["Range"].removeprefix("bytes=").partition("-")
        return web.Response(status=206, body=os.urandom(int(last) - int(first) + 1))


def bad_pieces(daemons: list[DaemonProcess], peer: str) -> float:
    return sum(d.metric(f'modelcache_peer_bad_pieces_total{{peer="{peer}"}}') for d in daemons)


def logs(daemons: list[DaemonProcess]) -> str:
    return "".join(d.log.read_text(errors="replace") for d in daemons)


def test_packaged_piece_lists_catch_a_lying_peer_per_piece(registry, tmp_path, secret) -> None:  # noqa: F811
    """`modelcache package` records each layer's piece list; 3 daemons and a peer serving random bytes pull
    the package at once: the liar's pieces fail their check as they arrive (never at blob commit), it is
    benched, the registry serves the model about once, every tree is byte-exact."""
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(11)
    files = {"big.bin": rng.randbytes(1536 << 10), "other.bin": rng.randbytes((1 << 20) + 4321),
             "config.json": b'{"model": "lists"}', "tokenizer.json": rng.randbytes(70 << 10)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    expected = tree_digests(src)
    liar = RandomLiar()
    with FaultProxy(registry.host) as proxy, BackgroundServer(liar.handle) as liar_server:
        run_cli("package", str(src), "--to", f"oci://{registry.host}/p2p/lists:v1", "--large-file", "512K",
                store=tmp_path / "pkg", env=ENV, check=True)
        ref = f"oci://{proxy.host}/p2p/lists:v1"
        size = sum(len(d) for d in files.values())  # big files come by range out of their layers
        lying = f"http://{liar_server.host}"
        ports = free_ports(3)
        daemons = start_peers(tmp_path, secret, ports, extra_urls=(lying,))
        try:
            for job in pull_all(daemons, ref):
                assert job["state"] == "done", job
                assert tree_digests(Path(job["path"])) == expected
            assert liar.requests > 0
            assert bad_pieces(daemons, lying) >= 1  # caught and blamed
            assert LIED not in logs(daemons)  # per piece: no blob ever failed at commit
            origin = sum(e.bytes for e in proxy.blob_gets())
            assert origin <= 1.1 * size, (origin, size)
        finally:
            stop_all(daemons)


def start_nodes(root: Path, secret: Path, ports: list[int], env: dict[str, str], *,  # noqa: F811
                extra_urls: tuple[str, ...] = (), timeout: str = "3") -> list[DaemonProcess]:
    """Daemons on ``ports`` that list each other (and ``extra_urls``), with ``env`` for their origin.

    The peer timeout also bounds how long a piece's home waits for its own pull to start before it
    sends a requester away (80% of it): resolving at S3 or the Hub (boto3, huggingface_hub in threads)
    takes a second or more on a busy machine, so the default 1 s would send some pieces to the origin twice.
    """
    urls = ",".join([f"http://127.0.0.1:{p}" for p in ports] + list(extra_urls))

    def start(port: int) -> DaemonProcess:
        return start_daemon(root / f"node{port}", "--peers", urls, "--peer-secret-file", str(secret),
                            "--peer-timeout", timeout, env={**ENV, **env}, listen=f"127.0.0.1:{port}")

    with ThreadPoolExecutor(len(ports)) as pool:  # side by side: each start waits for its daemon's readiness
        futures = [pool.submit(start, p) for p in ports]
    errors = [e for e in (f.exception() for f in futures) if e is not None]
    if errors:  # none left running behind a failed start
        stop_all([f.result() for f in futures if f.exception() is None])
        raise errors[0]
    return [f.result() for f in futures]


def origin_bytes(proxy: FaultProxy, fragment: str) -> int:
    return sum(e.bytes for e in proxy.requests(fragment) if e.method == "GET")


def put_in_parts(s3, bucket: str, key: str, data: bytes, sizes: list[int]) -> str:
    """Upload ``data`` in parts of ``sizes`` (SeaweedFS, as S3, wants 5 MiB but for the last); its ETag."""
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    done, at = [], 0
    for n, size in enumerate(sizes, 1):
        etag = s3.upload_part(Bucket=bucket, Key=key, PartNumber=n, UploadId=upload, Body=data[at:at + size])["ETag"]
        done.append({"PartNumber": n, "ETag": etag})
        at += size
    assert at == len(data)
    s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": done})
    return str(s3.head_object(Bucket=bucket, Key=key)["ETag"]).strip('"')


def s3_model(s3_server, bucket: str, seed: int, *, multipart: bool = False) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {"w1.safetensors": rng.randbytes(2 << 20), "w2.safetensors": rng.randbytes((2 << 20) - 777),
             "config.json": b'{"model": "s3-peers"}'}
    s3 = s3_server.client()
    s3.create_bucket(Bucket=bucket)
    for name, data in files.items():  # single-part uploads: each ETag is the object's MD5
        s3.put_object(Bucket=bucket, Key=f"m/{name}", Body=data)
    if multipart:  # its ETag is the MD5 of its parts' MD5s: checked with the part size two HEADs tell
        files["w0.safetensors"] = data = rng.randbytes((5 << 20) + (300 << 10))
        assert put_in_parts(s3, bucket, "m/w0.safetensors", data, [5 << 20, 300 << 10]).endswith("-2")
    return files


def digests(files: dict[str, bytes]) -> dict[str, str]:
    return {name: "sha256:" + hashlib.sha256(data).hexdigest() for name, data in files.items()}


def test_s3_objects_are_shared_between_four_daemons(s3_server, tmp_path, secret) -> None:  # noqa: F811
    """4 daemons pull one S3 prefix at once: the bucket serves the model's bytes about once (each object is
    keyed by bucket, key and ETag and checked at commit against its MD5, or for the one uploaded in parts
    its multipart ETag), every tree is byte-exact."""
    files = s3_model(s3_server, "p2p-four", 21, multipart=True)
    size = sum(len(d) for d in files.values())
    with FaultProxy(s3_server.endpoint.removeprefix("http://"), blobs="/p2p-four/m/") as proxy:
        env = {**s3_server.env(), "AWS_ENDPOINT_URL": f"http://{proxy.host}"}
        daemons = start_nodes(tmp_path, secret, free_ports(4), env)
        try:
            for job in pull_all(daemons, "s3://p2p-four/m"):
                assert job["state"] == "done", job
                assert tree_digests(Path(job["path"])) == digests(files)
            origin = origin_bytes(proxy, "/p2p-four/m/")
            assert origin <= 1.1 * size, (origin, size)
            assert sum(d.metric('modelcache_fetched_bytes_total{source="peer"}') for d in daemons) >= 2 * size
        finally:
            stop_all(daemons)


def test_a_peer_lying_about_an_s3_object_is_caught(s3_server, tmp_path, secret) -> None:  # noqa: F811
    """A peer serving random bytes for S3 objects: the MD5 check at commit throws them away, the object is
    fetched again from the bucket alone, the peer is blamed; the tree is byte-exact."""
    files = s3_model(s3_server, "p2p-liar", 22)
    liar = RandomLiar()
    with BackgroundServer(liar.handle) as liar_server:
        lying = f"http://{liar_server.host}"
        [d] = start_nodes(tmp_path, secret, [free_port()], s3_server.env(), extra_urls=(lying,))
        try:
            [job] = pull_all([d], "s3://p2p-liar/m")
            assert job["state"] == "done", job
            assert tree_digests(Path(job["path"])) == digests(files)
            assert liar.requests > 0  # it was asked: S3 objects do go through peers
            assert bad_pieces([d], lying) >= 1
            assert LIED in logs([d])  # caught at commit by the MD5 (no sha256 is known to check)
        finally:
            stop_all([d])


def test_a_multipart_etag_never_fails_a_pull_from_the_origin(s3_server, tmp_path) -> None:
    """Parts of several sizes whose first and last still look like one part size: the ETag check fails,
    the object is fetched again from the bucket without it, and the pull succeeds byte-exact."""
    s3 = s3_server.client()
    s3.create_bucket(Bucket="p2p-uneven")
    sizes = [(11 << 20) // 2, 5 << 20, 6 << 20, 100 << 10]  # 3 x 5.5 MiB + 100 KiB: the same total
    data = random.Random(24).randbytes(sum(sizes))
    put_in_parts(s3, "p2p-uneven", "m/w.bin", data, sizes)
    with FaultProxy(s3_server.endpoint.removeprefix("http://"), blobs="/p2p-uneven/m/") as proxy:
        env = {**s3_server.env(), "AWS_ENDPOINT_URL": f"http://{proxy.host}"}
        proc = run_cli("pull", "s3://p2p-uneven/m", store=tmp_path / "store", env=env, check=True)
        fetched = origin_bytes(proxy, "/p2p-uneven/m/")
    assert (Path(proc.stdout.split()[-1]) / "w.bin").read_bytes() == data
    assert fetched == 2 * len(data)  # the check did run (and failed): once with it, once more without


def test_small_hub_files_are_shared_too(tmp_path, secret) -> None:  # noqa: F811
    """Files the Hub keeps in git (no sha256 listed, only their git blob id, checked at commit) go through
    peers too: 3 daemons at once fetch them from the Hub about once, every tree byte-exact."""
    from fake_hub import FakeHub

    rng = random.Random(23)
    files = {"config.json": b'{"model": "git"}', "vocab.txt": rng.randbytes(900 << 10),
             "merges.txt": rng.randbytes((700 << 10) + 5)}
    size = sum(len(d) for d in files.values())
    with FakeHub(lfs_threshold=8 << 20) as hub:
        hub.repo("org/git-files").commit(files)
        with FaultProxy(hub.endpoint.removeprefix("http://")) as proxy:
            env = {"HF_ENDPOINT": f"http://{proxy.host}", "HF_HUB_DISABLE_TELEMETRY": "1",
                   "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": ""}
            daemons = start_nodes(tmp_path, secret, free_ports(3), env)
            try:
                for job in pull_all(daemons, "hf://org/git-files"):
                    assert job["state"] == "done", job
                    assert tree_digests(Path(job["path"])) == digests(files)
                origin = origin_bytes(proxy, "/resolve/")
                assert origin <= 1.1 * size, (origin, size)
                assert sum(d.metric('modelcache_fetched_bytes_total{source="peer"}') for d in daemons) >= size
            finally:
                stop_all(daemons)
