"""Peer discovery through EndpointSlices (issue 11), against the fake API with the real `kubernetes` client.

The fake serves list and watch with resource versions, bookmarks and 410
Gone (tests/fake_k8s_objects.py); :class:`K8sPeers` must follow additions,
removals and readiness changes from the watch, relist after a 410, resume a
watch that ended, never count this node, and never poll.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from urllib.parse import parse_qs

import pytest
from fake_k8s import FakeKubernetes

from modelcache.errors import InvalidReference
from modelcache.p2p.slices import K8sPeers, endpoint_urls, parse_service

NS, SVC = "mc", "modelcache"


def endpoint(ip: str, node: str, ready: bool | None = True) -> dict:
    e: dict = {"addresses": [ip], "nodeName": node}
    if ready is not None:
        e["conditions"] = {"ready": ready}
    return e


def slice_(name: str, endpoints: list[dict], *, service: str = SVC, ports: list[dict] | None = None,
           family: str = "IPv4") -> dict:
    return {"metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
            "addressType": family, "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8470, "protocol": "TCP"}] if ports is None else ports}


def test_urls_from_slices_ready_only_ports_and_self() -> None:
    ready = slice_("a", [endpoint("10.0.0.1", "n1"), endpoint("10.0.0.2", "n2", ready=False),
                         endpoint("10.0.0.3", "n3", ready=None), endpoint("10.0.0.9", "me")])
    peers, selves = endpoint_urls([ready], port=None, default_port=1, node_name="me")
    assert peers == {"http://10.0.0.1:8470", "http://10.0.0.3:8470"}  # not-ready out; unknown counts as ready
    assert selves == {"http://10.0.0.9:8470"}
    v6 = slice_("b", [endpoint("fd00::5", "n5")], family="IPv6", ports=[])
    assert endpoint_urls([v6], port=None, default_port=9000)[0] == {"http://[fd00::5]:9000"}  # no port: ours
    two = slice_("c", [endpoint("10.0.0.7", "n7")], ports=[{"name": "metrics", "port": 9100},
                                                          {"name": "peer", "port": 8471}])
    assert endpoint_urls([two], port="peer", default_port=1)[0] == {"http://10.0.0.7:8471"}
    assert endpoint_urls([two], port="other", default_port=1)[0] == set()  # not our listener
    assert endpoint_urls([two], port="7000", default_port=1)[0] == {"http://10.0.0.7:7000"}
    assert endpoint_urls([two], port=None, default_port=8470)[0] == {"http://10.0.0.7:8470"}
    assert parse_service("mc/modelcache") == ("mc", "modelcache", None)
    assert parse_service("mc/modelcache:http") == ("mc", "modelcache", "http")
    for bad in ("modelcache", "/x", "mc/", "a/b/c"):
        with pytest.raises(InvalidReference):
            parse_service(bad)


def test_flags_one_discovery_at_a_time_and_no_placeholder_secret(tmp_path: Path) -> None:
    from modelcache.p2p.node import from_flags

    good = tmp_path / "secret"
    good.write_text("0123456789abcdef0123456789abcdef\n")
    config = from_flags(secret_file=str(good), peers=None, peers_dns=None, listen="0.0.0.0:8470",
                        peers_k8s_service="mc/modelcache:http", node_name="n1")
    assert config is not None and config.peers_k8s_service == "mc/modelcache:http" and config.node_name == "n1"
    with pytest.raises(InvalidReference, match="one way to find peers"):
        from_flags(secret_file=str(good), peers=None, peers_dns="svc", listen=None, peers_k8s_service="mc/x")
    with pytest.raises(InvalidReference, match="NAMESPACE/NAME"):
        from_flags(secret_file=str(good), peers=None, peers_dns=None, listen=None, peers_k8s_service="x")
    placeholder = tmp_path / "placeholder"
    placeholder.write_text("replace-me-with-openssl-rand-hex-32")  # daemonset/examples/peer-secret.yaml as is
    with pytest.raises(InvalidReference, match="placeholder"):
        from_flags(secret_file=str(placeholder), peers="http://x:1", peers_dns=None, listen=None)
    assert from_flags(secret_file=None, peers=None, peers_dns=None, listen=None, peers_k8s_service="mc/x") is None


@pytest.fixture
def api(tmp_path: Path):
    from kubernetes import config

    with FakeKubernetes() as fake:
        fake.objects.bookmark_interval = 0.2
        client = config.new_client_from_config(config_file=str(fake.write_kubeconfig(tmp_path / "kubeconfig")))
        yield fake, client


async def until(peers: K8sPeers, want: set[str], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while peers.urls() != want:
        assert time.monotonic() < deadline, (peers.urls(), want)
        await asyncio.sleep(0.02)


def test_watch_follows_joins_leaves_readiness_410_and_dropped_watches(api) -> None:
    fake, client = api
    objects = fake.objects
    objects.create("endpointslices", slice_("s1", [endpoint("10.0.0.1", "n1"), endpoint("10.0.0.9", "me")]), NS)
    objects.create("endpointslices", slice_("other", [endpoint("10.9.9.9", "x")], service="not-ours"), NS)
    objects.create("endpointslices", slice_("elsewhere", [endpoint("10.8.8.8", "y")]), "another-namespace")
    selves: list[str] = []

    async def go() -> None:
        peers = K8sPeers(NS, SVC, 8470, node_name="me", api_client=client, watch_timeout=1,
                         on_self=selves.append)
        task = asyncio.create_task(peers.run())
        try:
            await until(peers, {"http://10.0.0.1:8470"})
            # The list's slices are reported as they are read, the informer is synced after the last.
            for _ in range(500):
                if peers.synced:
                    break
                await asyncio.sleep(0.02)
            assert peers.synced and selves and set(selves) == {"http://10.0.0.9:8470"}  # never itself

            # A second slice (the controller splits big Services), then a node joins one.
            objects.create("endpointslices", slice_("s2", [endpoint("10.0.0.2", "n2")]), NS)
            await until(peers, {"http://10.0.0.1:8470", "http://10.0.0.2:8470"})

            def join(s: dict) -> None:
                s["endpoints"].append(endpoint("10.0.0.3", "n3"))

            objects.update("endpointslices", "s1", NS, change=join)
            await until(peers, {f"http://10.0.0.{i}:8470" for i in (1, 2, 3)})

            def unready(s: dict) -> None:  # a daemon draining: not ready (terminating) before it goes
                s["endpoints"][0]["conditions"] = {"ready": False, "terminating": True}

            objects.update("endpointslices", "s1", NS, change=unready)
            await until(peers, {"http://10.0.0.2:8470", "http://10.0.0.3:8470"})

            # The watches end every second (timeoutSeconds=1): they resume from the last version, no relist.
            await asyncio.sleep(2.5)
            assert peers.informer.relists == 0
            objects.delete("endpointslices", "s2", NS)
            await until(peers, {"http://10.0.0.3:8470"})

            # History compacted while a slice changes: the watch gets 410, the informer lists again.
            objects.expire()
            objects.create("endpointslices", slice_("s3", [endpoint("10.0.0.4", "n4")]), NS)
            objects.expire()
            await until(peers, {"http://10.0.0.3:8470", "http://10.0.0.4:8470"})
            assert peers.informer.relists >= 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert not peers.informer._thread.is_alive()  # stopped on cancel

    asyncio.run(go())
    slices = [r for r in fake.requests if r.path == f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"]
    lists = [r for r in slices if "watch=" not in r.query]
    watches = [r for r in slices if "watch=" in r.query]
    assert all(parse_qs(r.query)["labelSelector"] == ["kubernetes.io/service-name=modelcache"] for r in slices)
    # A watch, not polling: one list at the start and one per 410; many watches, each from a version.
    assert 2 <= len(lists) <= 4 and len(watches) >= 3
    for r in watches:
        query = parse_qs(r.query)
        assert int(query["resourceVersion"][0]) > 0 and query["allowWatchBookmarks"] == ["true"]


def test_an_unreachable_api_keeps_the_last_peers(api) -> None:
    """The API failing does not empty the ring: the last set stays while the informer retries, and what
    changed meanwhile is picked up when it answers again."""
    fake, client = api
    fake.objects.create("endpointslices", slice_("s1", [endpoint("10.0.0.1", "n1")]), NS)

    async def go() -> None:
        peers = K8sPeers(NS, SVC, 8470, api_client=client, watch_timeout=1)
        task = asyncio.create_task(peers.run())
        try:
            await until(peers, {"http://10.0.0.1:8470"})
            fake.fail = (500, {"kind": "Status", "code": 500})
            await asyncio.sleep(1.5)  # the watch open before the failure ended (timeoutSeconds=1), none since
            fake.objects.create("endpointslices", slice_("s2", [endpoint("10.0.0.2", "n2")]), NS)
            await asyncio.sleep(0.5)
            assert peers.urls() == {"http://10.0.0.1:8470"}  # failing, the last set stays
            fake.fail = None  # back: the informer's retry lists again and sees what changed meanwhile
            await until(peers, {"http://10.0.0.1:8470", "http://10.0.0.2:8470"}, seconds=15)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(go())


def test_three_daemons_find_each_other_through_endpointslices_and_share_a_pull(registry, tmp_path) -> None:
    """3 `modelcache serve` on 127.0.0.1-3 (one port, as pods have), told only the Service's name: they learn
    each other from the slice's changes (no restart) and pull one model with origin bytes <= 1.1x."""
    from daemon_support import free_port, start_daemon
    from faultproxy import FaultProxy
    from support import run_cli
    from test_p2p_cluster import ENV, assert_exact, model_files, pull_all, push, served, stop_all

    files = model_files(11)
    size = sum(len(d) for d in files.values())
    push(registry, "p2p/slices", files)
    secret = tmp_path / "peer-secret"
    secret.write_text("a-shared-secret-of-enough-bytes\n")
    port = free_port()
    ips = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    with FakeKubernetes() as fake, FaultProxy(registry.host) as proxy:
        fake.objects.bookmark_interval = 0.5
        kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
        # At first only node0 is in the Service (the others' pods are not created yet).
        fake.objects.create("endpointslices", slice_("modelcache-abc", [endpoint(ips[0], "node0")],
                                                     ports=[{"name": "http", "port": port, "protocol": "TCP"}]), NS)
        daemons = []
        try:
            for n, ip in enumerate(ips):
                daemons.append(start_daemon(
                    tmp_path / f"node{n}", "--peers-k8s-service", f"{NS}/{SVC}", "--kubeconfig", str(kubeconfig),
                    "--prewarm", "off", "--node-name", f"node{n}", "--peer-secret-file", str(secret),
                    "--peer-timeout", "1", env=ENV, listen=f"{ip}:{port}"))

            def join(s: dict) -> None:  # the EndpointSlice controller adds the new pods' addresses
                s["endpoints"] += [endpoint(ips[1], "node1"), endpoint(ips[2], "node2")]

            fake.objects.update("endpointslices", "modelcache-abc", NS, change=join)
            deadline = time.monotonic() + 20
            while not all("peers: 2 ready in mc/modelcache" in d.log.read_text() for d in daemons):
                assert time.monotonic() < deadline, [d.log.read_text()[-2000:] for d in daemons]
                time.sleep(0.1)
            ref = f"oci://{proxy.host}/p2p/slices:v1"
            for job in pull_all(daemons, ref):
                assert_exact(job, files)
            origin = sum(e.bytes for e in proxy.blob_gets())
            assert origin <= 1.1 * size, (origin, size)
            assert sum(served(d) for d in daemons) > 0.5 * size  # most bytes went node to node

            # `modelcache pull --peers-k8s-service` (KUBECONFIG, as outside a pod) takes every byte from them.
            proxy.clear()
            proc = run_cli("pull", ref, "--peers-k8s-service", f"{NS}/{SVC}", "--peer-secret-file", str(secret),
                           store=tmp_path / "cli-store", env={**ENV, "KUBECONFIG": str(kubeconfig)}, check=True)
            assert sum(e.bytes for e in proxy.blob_gets()) == 0
            assert f"({size / (1 << 20):.1f} MiB from peers)" in proc.stderr, proc.stderr
        finally:
            stop_all(daemons)
