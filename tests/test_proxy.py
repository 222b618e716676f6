"""Origin fetches through a forward proxy (HTTPS_PROXY, HTTP_PROXY, NO_PROXY), as a cluster running Dragonfly's
dfdaemon or squid has them (issue 11), with a tiny proxy written here that records what it can read.

The proxy speaks the two forms clients use (RFC 9110 9.3.6 CONNECT, and the
absolute form of RFC 9112 3.2.2), counts requests and relayed bytes, and
keeps every byte clients sent it: what it could read in the clear. The
guarantees checked: registry, S3 and Hub pulls go through it; NO_PROXY goes
around it; peers never use it; no credential ever crosses it in the clear
(https origins are tunnelled, and an http origin that would need one is
refused with one line).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from aiohttp import web
from support import MP_ARTIFACT, MP_CONFIG, MP_WEIGHT, run_cli, tree_digests
from test_rawget import _tls_contexts

from modelcache.errors import InvalidReference, Unauthorized
from modelcache.sources.proxy import carries_credentials, proxy_for
from modelcache.sources.rawget import RawPool

PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY",
              "all_proxy")


class ForwardProxy:
    """A forward proxy on loopback: CONNECT tunnels and absolute-form requests, everything recorded."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.requests: list[tuple[str, str]] = []  # (method, target) as clients sent them
        self.proxy_auth: list[str] = []  # Proxy-Authorization values received
        self.clear = bytearray()  # every byte clients sent us (tunnelled TLS included: it is all we see)
        self.relayed = 0  # bytes sent back to clients from origins
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> ForwardProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed = True
        self._listener.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def saw_authorization(self) -> bool:
        """Whether an Authorization header crossed in the clear (Proxy-Authorization is the proxy's own)."""
        with self._lock:
            return re.search(rb"(?im)^authorization:", bytes(self.clear)) is not None

    def targets(self, method: str | None = None) -> list[str]:
        with self._lock:
            return [t for m, t in self.requests if method is None or m == method]

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._sockets.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _read_head(self, client: socket.socket, buffer: bytearray) -> bytes | None:
        while b"\r\n\r\n" not in buffer:
            got = client.recv(65536)
            if not got:
                return None
            with self._lock:
                self.clear += got
            buffer += got
        end = buffer.index(b"\r\n\r\n") + 4
        head = bytes(buffer[:end])
        del buffer[:end]
        return head

    def _pump(self, src: socket.socket, dst: socket.socket, *, record: bool) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    if record:
                        self.clear += data
                    else:
                        self.relayed += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _serve(self, client: socket.socket) -> None:
        buffer = bytearray()
        upstream: socket.socket | None = None
        origin = None
        try:
            while (head := self._read_head(client, buffer)) is not None:
                line, *fields = head.decode("latin-1").split("\r\n")
                method, target, version = line.split(" ")
                headers = [f for f in fields if f]
                with self._lock:
                    self.requests.append((method, target))
                    self.proxy_auth += [f.split(":", 1)[1].strip() for f in headers
                                        if f.lower().startswith("proxy-authorization:")]
                if method == "CONNECT":
                    host, _, port = target.rpartition(":")
                    upstream = socket.create_connection((host.strip("[]"), int(port)))
                    self._sockets.append(upstream)
                    client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    threading.Thread(target=self._pump, args=(upstream, client), kwargs={"record": False},
                                     daemon=True).start()
                    if buffer:
                        upstream.sendall(bytes(buffer))
                    self._pump(client, upstream, record=True)
                    return
                parts = urlsplit(target)
                assert parts.scheme == "http", target  # a proxy is asked in absolute form
                if upstream is None or origin != parts.netloc:
                    if upstream is not None:
                        return  # one origin per client connection (our clients pool per origin)
                    origin = parts.netloc
                    upstream = socket.create_connection((parts.hostname, parts.port or 80))
                    self._sockets.append(upstream)
                    threading.Thread(target=self._pump, args=(upstream, client), kwargs={"record": False},
                                     daemon=True).start()
                kept = [f for f in headers if not f.lower().startswith("proxy-")]
                path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                upstream.sendall("\r\n".join([f"{method} {path} {version}", *kept, "", ""]).encode("latin-1"))
                length = next((int(f.split(":", 1)[1]) for f in headers if f.lower().startswith("content-length:")),
                              0)
                while len(buffer) < length:
                    got = client.recv(65536)
                    if not got:
                        return
                    with self._lock:
                        self.clear += got
                    buffer += got
                upstream.sendall(bytes(buffer[:length]))
                del buffer[:length]
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                if s is not None:
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def clean_env(monkeypatch) -> None:
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


def test_which_requests_use_the_proxy(clean_env) -> None:
    env = {"HTTPS_PROXY": "http://squid:3128", "http_proxy": "proxy.corp:8080",
           "NO_PROXY": "localhost, .svc.cluster.local,10.0.0.0/8,internal.example:8443,[fd00::1],192.168.1.5"}
    via = lambda url: proxy_for(url, env)  # noqa: E731
    assert via("https://registry-1.docker.io/v2/").url == "http://squid:3128"
    assert via("http://minio.example:9000/b").url == "http://proxy.corp:8080"  # no scheme: http
    for direct in ("https://localhost/x", "http://modelcache.mc.svc.cluster.local:8470/",
                   "https://svc.cluster.local/", "https://10.1.2.3/", "https://internal.example:8443/",
                   "https://[fd00::1]:5000/", "http://192.168.1.5/"):
        assert via(direct) is None, direct
    for proxied in ("https://11.0.0.1/", "https://internal.example/", "https://notsvc.cluster.localx/",
                    "https://192.168.1.6/"):
        assert via(proxied) is not None, proxied
    assert proxy_for("https://x/", {"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:2"}).port == 1
    assert proxy_for("https://x/", {"HTTPS_PROXY": "http://p:1", "no_proxy": "*"}) is None
    assert proxy_for("https://x/", {"HTTP_PROXY": "http://p:1"}) is None  # each scheme has its own
    auth = proxy_for("https://x/", {"HTTPS_PROXY": "http://us%40er:pa%3Ass@p:1"})
    assert auth.headers() == {"Proxy-Authorization": "Basic dXNAZXI6cGE6c3M="} and "pa" not in auth.url
    with pytest.raises(InvalidReference, match=r"HTTPS_PROXY=socks5://u:\*\*\*@p:1: expected http://"):
        proxy_for("https://x/", {"HTTPS_PROXY": "socks5://u:secret@p:1"})
    assert carries_credentials("http://h/x", {"authorization": "Bearer t"})
    assert carries_credentials("http://h/x?X-Amz-Signature=ab&X-Amz-Credential=c", {})
    assert not carries_credentials("http://h/v2/x/blobs/sha256:ab", {"Range": "bytes=0-1"})


async def _origin(ssl_context=None) -> tuple[web.AppRunner, str, list[dict]]:
    """An origin serving /blob with ranges, recording each request's headers."""
    data = bytes(range(256)) * 4096
    seen: list[dict] = []

    async def blob(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        start, end = (int(x) for x in request.headers["Range"][6:].split("-"))
        return web.Response(status=206, body=data[start:end + 1],
                            headers={"Content-Range": f"bytes {start}-{end}/{len(data)}"})

    app = web.Application()
    app.router.add_get("/blob", blob)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}", seen


async def _read(pool: RawPool, url: str, headers: dict) -> bytes:
    resp = await pool.get(url, headers)
    assert resp.status == 206
    return b"".join([bytes(p) async for p in resp.body()])


def test_https_origins_are_tunnelled_and_credentials_stay_inside_tls(tmp_path, clean_env, monkeypatch) -> None:
    """CONNECT, TLS end to end: the origin gets the Authorization header, the proxy only the host and port
    (and its own login, as Proxy-Authorization on the CONNECT)."""
    server_ctx, client_ctx = _tls_contexts(tmp_path)
    token = "Bearer origin-secret-token-0123456789"

    async def main(proxy: ForwardProxy) -> None:
        runner, base, seen = await _origin(server_ctx)
        pool = RawPool(connect_timeout=5, read_timeout=5, ssl_context=client_ctx)
        try:
            for start, end in ((0, 99), (1000, 300_000)):
                got = await _read(pool, f"{base}/blob", {"Range": f"bytes={start}-{end}", "Authorization": token})
                assert len(got) == end - start + 1 and got[:2] == bytes([start % 256, (start + 1) % 256])
        finally:
            pool.close()
            await runner.cleanup()
        assert [h["Authorization"] for h in seen] == [token, token]
        assert not any("Proxy-Authorization" in h for h in seen)  # the proxy's login stays with the proxy
        assert proxy.targets() == [urlsplit(base).netloc]  # one tunnel, kept alive: CONNECT 127.0.0.1:PORT
        assert proxy.targets("CONNECT") == proxy.targets()
        assert proxy.proxy_auth == ["Basic dXNlcjpwdw=="]
        assert b"origin-secret-token" not in proxy.clear and not proxy.saw_authorization()
        assert proxy.relayed > 300_000

    with ForwardProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url.replace("http://", "http://user:pw@"))
        asyncio.run(main(proxy))


def test_http_origins_go_in_absolute_form_without_credentials_and_no_proxy_goes_around(clean_env,
                                                                                        monkeypatch) -> None:
    async def main(proxy: ForwardProxy) -> None:
        runner, base, seen = await _origin()
        pool = RawPool(connect_timeout=5, read_timeout=5)
        try:
            assert len(await _read(pool, f"{base}/blob", {"Range": "bytes=0-9"})) == 10
            assert proxy.targets("GET") == [f"{base}/blob"]  # the absolute form
            # A credential for an http origin would be read by the proxy: refused before anything is sent.
            sent = len(proxy.clear)
            for headers, url in (({"Authorization": "Bearer t0ken"}, f"{base}/blob"),
                                 ({}, f"{base}/blob?X-Amz-Credential=AKIA&X-Amz-Signature=beef")):
                with pytest.raises(Unauthorized, match="refusing to send credentials .* NO_PROXY"):
                    await pool.get(url, {"Range": "bytes=0-9", **headers})
            assert len(proxy.clear) == sent and b"t0ken" not in proxy.clear and len(seen) == 1
            monkeypatch.setenv("no_proxy", "127.0.0.1")  # the origin in NO_PROXY: direct, credentials and all
            assert len(await _read(pool, f"{base}/blob", {"Range": "bytes=0-9", "Authorization": "Bearer t0ken"}))
            assert seen[-1]["Authorization"] == "Bearer t0ken" and len(proxy.requests) == 1
        finally:
            pool.close()
            await runner.cleanup()

    with ForwardProxy() as proxy:
        monkeypatch.setenv("http_proxy", proxy.url)
        asyncio.run(main(proxy))


def _push(registry, repo: str, files: dict[str, bytes]) -> None:
    layers = [(data, MP_WEIGHT, {"org.cncf.model.filepath": name}) for name, data in files.items()]
    registry.push_image(repo, "v1", layers, config=b"{}", config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)


def _digests(files: dict[str, bytes]) -> dict[str, str]:
    return {name: "sha256:" + hashlib.sha256(data).hexdigest() for name, data in files.items()}


def test_registry_pull_goes_through_the_proxy_unless_no_proxy(registry, tmp_path, clean_env) -> None:
    files = {"w.bin": os.urandom(3 << 20), "c.json": b"{}"}
    _push(registry, "proxy/model", files)
    ref = f"oci://{registry.host}/proxy/model:v1"
    with ForwardProxy() as proxy:
        proc = run_cli("pull", ref, store=tmp_path / "a", env={"HTTP_PROXY": proxy.url}, check=True)
        assert tree_digests(Path(proc.stdout.strip())) == _digests(files)
        gets = proxy.targets("GET")
        assert any("/manifests/v1" in t for t in gets) and any("/blobs/sha256:" in t for t in gets)
        assert all(t.startswith(f"http://{registry.host}/v2/") for t in gets)
        assert proxy.relayed >= 3 << 20  # every byte of the model came through it
        before = len(proxy.requests)
        proc = run_cli("pull", ref, store=tmp_path / "b", env={"HTTP_PROXY": proxy.url, "NO_PROXY": "127.0.0.1"},
                       check=True)
        assert tree_digests(Path(proc.stdout.strip())) == _digests(files)
        assert len(proxy.requests) == before  # NO_PROXY: straight to the registry


class TlsFront:
    """TLS in front of a plain TCP server (an https endpoint for SeaweedFS): bytes relayed both ways."""

    def __init__(self, backend: tuple[str, int], server_ctx) -> None:
        self.backend, self.ctx = backend, server_ctx
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.peers: list[tuple] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                raw, peer = self._listener.accept()
            except OSError:
                return
            self.peers.append(peer)
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            tls = self.ctx.wrap_socket(raw, server_side=True)
            back = socket.create_connection(self.backend)
        except OSError:
            raw.close()
            return

        def pump(src, dst) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pump, args=(back, tls), daemon=True).start()
        pump(tls, back)


def test_s3_pull_is_tunnelled_and_the_proxy_reads_no_signature(s3_server, tmp_path, clean_env) -> None:
    """boto3's signed listing and our presigned ranged GETs both go through CONNECT to an https endpoint."""
    server_ctx, _ = _tls_contexts(tmp_path)
    s3 = s3_server.client()
    s3.create_bucket(Bucket="models-proxied")
    files = {"w.bin": os.urandom(2 << 20), "config.json": b'{"a": 1}'}
    for name, data in files.items():
        s3.put_object(Bucket="models-proxied", Key=f"m/{name}", Body=data)
    backend = urlsplit(s3_server.endpoint)
    front = TlsFront((backend.hostname, backend.port), server_ctx)
    try:
        with ForwardProxy() as proxy:
            env = {**s3_server.env(), "AWS_ENDPOINT_URL": f"https://127.0.0.1:{front.port}",
                   "AWS_CA_BUNDLE": str(tmp_path / "cert.pem"), "SSL_CERT_FILE": str(tmp_path / "cert.pem"),
                   "HTTPS_PROXY": proxy.url}
            proc = run_cli("pull", "s3://models-proxied/m", store=tmp_path / "store", env=env, check=True)
            assert tree_digests(Path(proc.stdout.strip())) == _digests(files)
            assert proxy.targets() and set(proxy.targets()) == {f"127.0.0.1:{front.port}"}
            assert set(proxy.targets("CONNECT")) == set(proxy.targets())
            assert proxy.relayed >= 2 << 20
            assert not proxy.saw_authorization()
            for secret in (b"X-Amz-Signature", b"X-Amz-Credential",
                           s3_server.access_key.encode(), s3_server.secret_key.encode()):
                assert secret not in proxy.clear, secret
            assert len(front.peers) == len(proxy.targets())  # every connection to the endpoint came via the proxy

            # The same bucket at its plain http endpoint: boto3 would sign in the clear through the proxy.
            env = {**s3_server.env(), "HTTP_PROXY": proxy.url}
            before = len(proxy.clear)
            proc = run_cli("pull", "s3://models-proxied/m", store=tmp_path / "plain", env=env)
            assert proc.returncode == 4, proc.stderr
            assert "refusing to send credentials" in proc.stderr and "NO_PROXY" in proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
            assert len(proxy.clear) == before
    finally:
        front.close()


def test_hub_token_never_crosses_a_plain_proxy(tmp_path, clean_env) -> None:
    """An http Hub with HF_TOKEN behind a proxy: refused with one line before huggingface_hub sends anything;
    in NO_PROXY it works."""
    from fake_hub import FakeHub

    files = {"config.json": b'{"model": "x"}', "w.bin": os.urandom(1 << 20)}
    with FakeHub() as hub, ForwardProxy() as proxy:
        hub.repo("org/proxied").commit(files)
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1",
               "HF_TOKEN": "hf_secret_token_value", "HTTP_PROXY": proxy.url}
        proc = run_cli("pull", "hf://org/proxied", store=tmp_path / "a", env=env)
        assert proc.returncode == 4 and "refusing to send credentials" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert proxy.requests == [] and b"hf_secret" not in proxy.clear
        host = urlsplit(hub.endpoint).hostname
        proc = run_cli("pull", "hf://org/proxied", store=tmp_path / "b", env={**env, "NO_PROXY": host}, check=True)
        assert tree_digests(Path(proc.stdout.strip())) == _digests(files)
        # The Hub itself direct; its CDN (another host, sent no token) through the proxy.
        assert proxy.requests and not any(urlsplit(t).hostname == host for _, t in proxy.requests)
        assert b"hf_secret" not in proxy.clear and not proxy.saw_authorization()
        # Without a token the Hub's files come through the proxy like any public origin's.
        proc = run_cli("pull", "hf://org/proxied", store=tmp_path / "c", env={**env, "HF_TOKEN": ""}, check=True)
        assert tree_digests(Path(proc.stdout.strip())) == _digests(files)
        assert proxy.targets("GET") and proxy.relayed >= 1 << 20


def test_peers_never_use_the_proxy(registry, tmp_path, clean_env) -> None:
    """Two daemons with HTTP_PROXY set: the registry is reached through it, the other daemon never."""
    from daemon_support import free_port, start_daemon
    from test_p2p_cluster import ENV, assert_exact, pull_all, served, stop_all

    files = {"a.bin": os.urandom(2 << 20), "b.bin": os.urandom(1 << 20)}
    _push(registry, "proxy/peers", files)
    secret = tmp_path / "secret"
    secret.write_text("a-shared-secret-of-enough-bytes")
    ports = [free_port(), free_port()]
    urls = ",".join(f"http://127.0.0.1:{p}" for p in ports)
    with ForwardProxy() as proxy:
        daemons = [start_daemon(tmp_path / f"n{p}", "--peers", urls, "--peer-secret-file", str(secret),
                                "--peer-timeout", "1", env={**ENV, "HTTP_PROXY": proxy.url},
                                listen=f"127.0.0.1:{p}") for p in ports]
        try:
            for job in pull_all(daemons, f"oci://{registry.host}/proxy/peers:v1"):
                assert_exact(job, files)
            assert sum(served(d) for d in daemons) > 0  # peers did share
            targets = proxy.targets()
            assert targets and all(registry.host in t for t in targets), targets
            assert not any(f":{p}" in t for t in targets for p in ports)
        finally:
            stop_all(daemons)
