"""Peer-to-peer between real `modelcache serve` processes (issue 11), the real registry (and the fake Hub) as origin.

Each daemon has its own store and port, a static peer list and the shared
secret; the fault proxy in front of the registry logs every blob byte it
serves, so "origin bytes" is measured, not assumed. Pieces are 64 KiB
(MODELCACHE_PEER_PIECE_MIN, the same on every node) so a 4 MiB model has 64.
"""

from __future__ import annotations

import hashlib
import random
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web
from daemon_support import DaemonProcess, free_port, free_ports, start_daemon
from faultproxy import BackgroundServer, FaultProxy
from support import MP_ARTIFACT, MP_CONFIG, MP_WEIGHT, run_cli, tree_digests

from modelcache.p2p import signing

PIECE = 64 << 10
ENV = {"MODELCACHE_PEER_PIECE_MIN": str(PIECE)}
CHUNK_SIZES = ("1M", "256K", "64K", "512K")  # every node cuts pieces the same way whatever its --chunk-size


def model_files(seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {"a.bin": rng.randbytes(2 << 20), "b.bin": rng.randbytes((2 << 20) - 12345)}


def push(registry, repo: str, files: dict[str, bytes]) -> None:
    layers = [(data, MP_WEIGHT, {"org.cncf.model.filepath": name}) for name, data in files.items()]
    registry.push_image(repo, "v1", layers, config=b"{}", config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "peer-secret"
    path.write_text("a-shared-secret-of-enough-bytes\n")
    return path


def start_peers(root: Path, secret: Path, ports: list[int], *, own: list[int] | None = None,
                extra_urls: tuple[str, ...] = (), extra: tuple[str, ...] = ()) -> list[DaemonProcess]:
    """Daemons on ``own`` ports (default all of ``ports``), each listing every port's URL as a peer."""
    urls = ",".join([f"http://127.0.0.1:{p}" for p in ports] + list(extra_urls))
    out = []
    for n, port in enumerate(own or ports):
        out.append(start_daemon(root / f"node{port}", "--peers", urls, "--peer-secret-file", str(secret),
                                "--peer-timeout", "1", "--chunk-size", CHUNK_SIZES[n % len(CHUNK_SIZES)],
                                *extra, env=ENV, listen=f"127.0.0.1:{port}"))
    return out


def pull_all(daemons: list[DaemonProcess], ref: str, timeout: float = 90) -> list[dict]:
    """Start the pull on every daemon at the same moment; wait for all."""
    barrier = threading.Barrier(len(daemons))
    ids: dict[int, str] = {}

    def go(n: int, d: DaemonProcess) -> None:
        barrier.wait()
        status, job = d.call("POST", "/v1/pulls", {"ref": ref})
        assert status == 202, job
        ids[n] = job["id"]

    threads = [threading.Thread(target=go, args=(n, d)) for n, d in enumerate(daemons)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return [d.wait_pull(ids[n], timeout) for n, d in enumerate(daemons)]


def expected(files: dict[str, bytes]) -> dict[str, str]:
    return {name: "sha256:" + hashlib.sha256(data).hexdigest() for name, data in files.items()}


def assert_exact(job: dict, files: dict[str, bytes]) -> None:
    assert job["state"] == "done", job
    assert tree_digests(Path(job["path"])) == expected(files)


def served(d: DaemonProcess) -> float:
    return d.metric("modelcache_peer_served_bytes_total")


def origin_repeats(proxy: FaultProxy) -> list[tuple[str, str | None, int, int, float]]:
    """The blob GETs whose range was asked more than once: (blob, range, status, bytes, when), for a failure's message."""
    gets = proxy.blob_gets()
    seen: dict[tuple[str | None, str | None], int] = {}
    for e in gets:
        seen[(e.digest, e.range)] = seen.get((e.digest, e.range), 0) + 1
    return [((e.digest or "")[:19], e.range, e.status, e.bytes, round(e.start - gets[0].start, 2))
            for e in gets if seen[(e.digest, e.range)] > 1]


def stop_all(daemons: list[DaemonProcess]) -> None:
    for d in daemons:
        if d.process.poll() is None:
            d.stop()


def test_four_nodes_share_one_origin_fetch_and_a_late_node_fetches_nothing(registry, tmp_path, secret) -> None:
    """4 nodes at once: origin bytes <= 1.1x the model, byte-exact everywhere, uploads balanced;
    a 5th node started afterwards takes every byte from peers."""
    files = model_files(1)
    size = sum(len(d) for d in files.values())
    push(registry, "p2p/four", files)
    ports = free_ports(5)
    with FaultProxy(registry.host) as proxy:
        ref = f"oci://{proxy.host}/p2p/four:v1"
        daemons = start_peers(tmp_path, secret, ports, own=ports[:4])
        try:
            jobs = pull_all(daemons, ref)
            for job in jobs:
                assert_exact(job, files)
            origin = sum(e.bytes for e in proxy.blob_gets())
            assert origin <= 1.1 * size, (origin, size)
            uploads = [served(d) for d in daemons]
            mean = sum(uploads) / len(uploads)
            assert mean > 0.5 * size  # most bytes went node to node
            assert max(uploads) <= 2 * mean, uploads
            peer_bytes = sum(d.metric('modelcache_fetched_bytes_total{source="peer"}') for d in daemons)
            assert peer_bytes == pytest.approx(sum(uploads), rel=0.01)

            proxy.clear()
            late = start_peers(tmp_path, secret, ports, own=ports[4:])[0]
            daemons.append(late)
            [job] = pull_all([late], ref)
            assert_exact(job, files)
            assert sum(e.bytes for e in proxy.blob_gets()) == 0
            assert late.metric('modelcache_fetched_bytes_total{source="peer"}') == size
        finally:
            stop_all(daemons)


def test_homes_that_do_not_pull_the_model_still_keep_it_to_one_origin_fetch(registry, tmp_path, secret) -> None:
    """2 of 4 nodes pull: the pieces homed on the 2 that do not (they have no access of their own to
    fetch them) are fetched once, by the requester their home elects, and the other takes them from it."""
    files = model_files(5)
    size = sum(len(d) for d in files.values())
    push(registry, "p2p/some", files)
    ports = free_ports(4)
    with FaultProxy(registry.host) as proxy:
        daemons = start_peers(tmp_path, secret, ports)
        try:
            jobs = pull_all(daemons[:2], f"oci://{proxy.host}/p2p/some:v1")
            for job in jobs:
                assert_exact(job, files)
            origin = sum(e.bytes for e in proxy.blob_gets())
            assert origin <= 1.1 * size, (origin, size, origin_repeats(proxy))
            assert sum(served(d) for d in daemons[2:]) == 0  # the bystanders hold nothing and served nothing
        finally:
            stop_all(daemons)


def test_a_home_asked_before_its_own_pull_began_does_not_fetch_its_pieces_again(registry, tmp_path,
                                                                                 secret) -> None:
    """3 nodes pull, and the 4th only after they asked it as a home (on a loaded machine a pull request can
    reach a daemon well after its peers' first asks). Not pulling yet, the 4th elected requesters to fetch
    its pieces; its own pull then asks them first instead of the origin, so origin bytes stay <= 1.1x.
    The origin holds every blob GET until all four have asked, so every piece is still in flight."""
    rng = random.Random(6)
    files = {"a.bin": rng.randbytes(512 << 10), "b.bin": rng.randbytes((512 << 10) - 999)}  # 16 pieces
    size = sum(len(d) for d in files.values())
    push(registry, "p2p/late-home", files)
    ports = free_ports(4)
    with FaultProxy(registry.host) as proxy:
        ref = f"oci://{proxy.host}/p2p/late-home:v1"
        # A slot for every piece: the early nodes reach the 4th's pieces while theirs are held.
        daemons = start_peers(tmp_path, secret, ports, extra=("--concurrency", "16"))
        try:
            proxy.hold()
            early = [d.call("POST", "/v1/pulls", {"ref": ref})[1]["id"] for d in daemons[:3]]
            late = daemons[3]
            deadline = time.monotonic() + 30
            while late.log.read_text().count("mode=home") < 4 and time.monotonic() < deadline:
                time.sleep(0.1)  # the 4th answers (elects) without pulling
            late_id = late.call("POST", "/v1/pulls", {"ref": ref})[1]["id"]
            time.sleep(2.0)  # its own pull starts, and asks for its home pieces
            proxy.hold(False)
            jobs = [d.wait_pull(i, 90) for d, i in zip(daemons, [*early, late_id], strict=True)]
            for job in jobs:
                assert_exact(job, files)
            origin = sum(e.bytes for e in proxy.blob_gets())
            assert origin <= 1.1 * size, (origin, size)
        finally:
            proxy.hold(False)
            stop_all(daemons)


class Liar:
    """A fake peer that signs nothing and checks nothing: it answers every range with flipped bytes."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.blobs = {"sha256:" + hashlib.sha256(d).hexdigest(): d for d in files.values()}
        self.requests = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if "/v1/peer/blobs/" not in request.path:
            return web.Response(status=404)
        self.requests += 1
        data = self.blobs[request.path.rsplit("/", 1)[-1]]
        first, _, last = request.headers["Range"].removeprefix("bytes=").partition("-")
        body = bytes(b ^ 0x5A for b in data[int(first):int(last) + 1])
        return web.Response(status=206, body=body)


def test_lying_dead_stalled_and_killed_peers_cost_time_never_bytes(registry, tmp_path, secret) -> None:
    """Every pull completes byte-exact with a peer serving flipped bytes, one killed mid-transfer, one that
    accepts and never answers and an address nobody listens on; the run takes seconds more, not minutes."""
    files = model_files(2)
    push(registry, "p2p/faults", files)
    ref = f"oci://{registry.host}/p2p/faults:v1"
    liar = Liar(files)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # the kernel completes handshakes; nobody ever reads or answers
    nobody = free_port()
    with BackgroundServer(liar.handle) as liar_server:
        fakes = (f"http://{liar_server.host}", f"http://127.0.0.1:{silent.getsockname()[1]}",
                 f"http://127.0.0.1:{nobody}")
        ports = free_ports(4)  # seed, to-be-killed, two requesters
        seed, doomed = start_peers(tmp_path, secret, ports, own=ports[:2], extra_urls=fakes,
                                   extra=("--peer-upload-limit", "1M"))
        requesters = start_peers(tmp_path, secret, ports, own=ports[2:], extra_urls=fakes)
        daemons = [seed, doomed, *requesters]
        try:
            for d in (seed, doomed):  # both hold the model (each pulls its own copy: the others are not ready)
                assert_exact(d.wait_pull(d.call("POST", "/v1/pulls", {"ref": ref})[1]["id"]), files)
            started = time.monotonic()
            killer = threading.Timer(0.7, lambda: doomed.stop(signal.SIGKILL))
            killer.start()
            jobs = pull_all(requesters, ref)
            elapsed = time.monotonic() - started
            killer.join()
            for job in jobs:
                assert_exact(job, files)
            assert elapsed < 20, elapsed  # timeouts of a second each, paid once per bad peer, not per piece
            assert liar.requests > 0
            bad = sum(d.metric(f'modelcache_peer_bad_pieces_total{{peer="{fakes[0]}"}}') for d in requesters)
            assert bad >= 1
            gone = f"http://{doomed.http}"
            failed = [sum(d.metric(f'modelcache_peer_failures_total{{peer="{u}"}}') for d in requesters)
                      for u in (*fakes[1:], gone)]
            assert all(n >= 1 for n in failed), failed
        finally:
            silent.close()
            stop_all(daemons)


def _get(url: str, headers: dict[str, str]) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_peer_requests_need_a_fresh_signature(registry, tmp_path, secret) -> None:
    """No signature, a wrong one, a stale (replayed) one: 401 and no bytes; a good one: the bytes.
    The API's bearer auth still guards everything else; a daemon with no secret serves no peer."""
    files = model_files(3)
    push(registry, "p2p/auth", files)
    [d] = start_peers(tmp_path, secret, [free_port()])
    plain = start_daemon(tmp_path / "plain")
    try:
        assert_exact(d.wait_pull(d.call("POST", "/v1/pulls", {"ref": f"oci://{registry.host}/p2p/auth:v1"})[1]["id"]),
                     files)
        data = files["a.bin"]
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = f"/v1/peer/blobs/{digest}?mode=have"
        rng = "bytes=0-99"
        key = secret.read_bytes().strip()
        url = f"http://{d.http}{path}"
        cases = {
            "none": {"Range": rng},
            "wrong": {"Range": rng, signing.HEADER: signing.sign(b"not-the-secret-at-all", "GET", path, rng)},
            "stale": {"Range": rng, signing.HEADER: signing.sign(key, "GET", path, rng, now=time.time() - 600)},
            "other-range": {"Range": "bytes=0-999999", signing.HEADER: signing.sign(key, "GET", path, rng)},
        }
        for name, headers in cases.items():
            status, body = _get(url, headers)
            assert status == 401, name
            assert data[:100] not in body, name
        status, body = _get(url, {"Range": rng, signing.HEADER: signing.sign(key, "GET", path, rng)})
        assert (status, body) == (206, data[:100])
        assert d.call("GET", "/v1/models", token=None)[0] == 401  # the API stays closed
        signed = {"Range": rng, signing.HEADER: signing.sign(key, "GET", path, rng)}
        assert _get(f"http://{plain.http}{path}", signed)[0] in (401, 404)  # no secret: no peer routes
    finally:
        stop_all([d, plain])


def test_cli_pull_takes_bytes_from_peers_and_says_how_many(registry, tmp_path, secret) -> None:
    """`modelcache pull --peers` resolves at the origin, takes the blobs from a daemon, prints the share."""
    files = model_files(4)
    size = sum(len(d) for d in files.values())
    push(registry, "p2p/cli", files)
    [d] = start_peers(tmp_path, secret, [free_port()])
    try:
        with FaultProxy(registry.host) as proxy:
            ref = f"oci://{proxy.host}/p2p/cli:v1"
            assert_exact(d.wait_pull(d.call("POST", "/v1/pulls", {"ref": ref})[1]["id"]), files)
            proxy.clear()
            proc = run_cli("pull", ref, "--peers", f"http://{d.http}", "--peer-secret-file", str(secret),
                           store=tmp_path / "cli-store", env=ENV, check=True)
            assert sum(e.bytes for e in proxy.blob_gets()) == 0
            assert proxy.requests("/manifests/")  # access is decided at the origin, with our credentials
        assert tree_digests(Path(proc.stdout.strip())) == expected(files)
        assert f"({size / (1 << 20):.1f} MiB from peers)" in proc.stderr, proc.stderr
    finally:
        d.stop()


def test_hub_models_are_shared_too(tmp_path, secret) -> None:
    """The same with the Hugging Face Hub as the origin (the fake Hub, its CDN counting ranges served):
    3 nodes at once fetch the LFS files' bytes from the CDN about once; small files come from the Hub."""
    from fake_hub import FakeHub

    files = {"config.json": b'{"model": "p2p"}', **model_files(5)}
    lfs = sum(len(d) for n, d in files.items() if n.endswith(".bin"))
    with FakeHub() as hub:
        hub.repo("org/shared").commit(files)
        env = {**ENV, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1",
               "HF_TOKEN": ""}
        ports = free_ports(3)
        urls = ",".join(f"http://127.0.0.1:{p}" for p in ports)
        daemons = [start_daemon(tmp_path / f"hub{p}", "--peers", urls, "--peer-secret-file", str(secret),
                                "--peer-timeout", "1", env=env, listen=f"127.0.0.1:{p}") for p in ports]
        try:
            for job in pull_all(daemons, "hf://org/shared"):
                assert_exact(job, files)
            ranges = [h.get("Range", "") for h in hub.cdn_requests]
            served_bytes = 0
            for r in ranges:
                first, _, last = r.removeprefix("bytes=").partition("-")
                served_bytes += int(last) - int(first) + 1
            assert served_bytes <= 1.1 * lfs, (served_bytes, lfs)
            assert sum(served(d) for d in daemons) >= lfs  # about 2/3 of each node's bytes came from peers
        finally:
            stop_all(daemons)
