"""The lean blob reader (sources/rawget.py) against a real aiohttp server on loopback."""

from __future__ import annotations

import asyncio
import os

import pytest
from aiohttp import web

from modelcache.errors import ModelCacheError, Unavailable
from modelcache.sources.rawget import BUFFER, RawPool

DATA = os.urandom(BUFFER * 2 + 12345)


async def _server(handlers: dict) -> tuple[web.AppRunner, str]:
    app = web.Application()
    for path, handler in handlers.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


async def _collect(resp) -> bytes:
    return b"".join([bytes(p) async for p in resp.body()])


def test_bodies_arrive_whole_and_connections_are_reused() -> None:
    """Content-Length bodies of any size come back byte for byte over one kept-alive connection."""
    peers: set = set()

    async def blob(request: web.Request) -> web.Response:
        peers.add(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        size = int(request.query["n"])
        return web.Response(body=DATA[:size])

    async def main() -> None:
        runner, base = await _server({"/blob": blob})
        pool = RawPool(connect_timeout=5, read_timeout=5)
        try:
            for size in (0, 1, 1000, BUFFER, len(DATA)):
                resp = await pool.get(f"{base}/blob?n={size}", {})
                assert resp.status == 200 and resp.content_length == size
                assert await _collect(resp) == DATA[:size]
        finally:
            pool.close()
            await runner.cleanup()

    asyncio.run(main())
    assert len(peers) == 1


def test_chunked_bodies_are_left_to_the_general_client() -> None:
    """A response without Content-Length has no body here: the caller takes its other path."""
    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"abc")
        await resp.write_eof()
        return resp

    async def main() -> None:
        runner, base = await _server({"/chunked": chunked})
        pool = RawPool(connect_timeout=5, read_timeout=5)
        try:
            resp = await pool.get(f"{base}/chunked", {})
            assert resp.status == 200 and resp.content_length is None
        finally:
            pool.close()
            await runner.cleanup()

    asyncio.run(main())


@pytest.mark.parametrize("mode", ["reset", "stall"])
def test_broken_bodies_keep_what_arrived_then_fail(mode: str) -> None:
    """A body cut short (reset) or gone quiet (stall) yields the bytes received, then Unavailable."""
    async def broken(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(len(DATA))})
        await resp.prepare(request)
        await resp.write(DATA[:300_000])
        if mode == "stall":
            await asyncio.sleep(3)
        request.transport.abort()  # type: ignore[union-attr]
        return resp

    async def main() -> None:
        runner, base = await _server({"/broken": broken})
        pool = RawPool(connect_timeout=5, read_timeout=0.5)
        got = bytearray()
        try:
            resp = await pool.get(f"{base}/broken", {})
            with pytest.raises(Unavailable):
                async for piece in resp.body():
                    got += piece
        finally:
            pool.close()
            await runner.cleanup()
        assert 0 < len(got) <= 300_000 and DATA.startswith(bytes(got))

    asyncio.run(main())


def test_connection_refused_is_unavailable() -> None:
    """Nothing listening: a retryable Unavailable, not an OSError."""
    async def main() -> None:
        pool = RawPool(connect_timeout=2, read_timeout=2)
        with pytest.raises(Unavailable, match="cannot connect"):
            await pool.get("http://127.0.0.1:9/x", {})

    asyncio.run(main())


def test_abandoned_body_frees_its_thread_and_connection_at_once() -> None:
    """A caller cancelled while a thread waits on a quiet body: the wait ends now, not at the
    read timeout, and the connection is dropped (the server sees it go), never reused."""
    gone = asyncio.Event()

    async def quiet(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(len(DATA))})
        await resp.prepare(request)
        await resp.write(DATA[:1000])
        for _ in range(600):  # quiet for up to 30 s, watching for the client to hang up
            transport = request.transport
            if transport is None or transport.is_closing():
                gone.set()
                break
            await asyncio.sleep(0.05)
        return resp

    async def main() -> None:
        runner, base = await _server({"/quiet": quiet})
        pool = RawPool(connect_timeout=5, read_timeout=30)
        try:
            resp = await pool.get(f"{base}/quiet", {})
            reader = asyncio.create_task(_collect(resp))
            await asyncio.sleep(0.2)  # the fill thread is now blocked in recv
            reader.cancel()
            async with asyncio.timeout(3):
                with pytest.raises(asyncio.CancelledError):
                    await reader
                await gone.wait()
            assert not pool._idle.get(("http", "127.0.0.1", int(base.rsplit(":", 1)[1])))
        finally:
            pool.close()
            await runner.cleanup()

    asyncio.run(main())


def _tls_contexts(tmp_path) -> tuple:
    """A server context with a fresh self-signed certificate for 127.0.0.1, and a client trusting it."""
    import datetime
    import ipaddress
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "modelcache test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
    return server, client


def test_tls_bodies_ranges_and_abandonment(tmp_path) -> None:
    """Over TLS: ranged bodies arrive whole on one kept-alive connection, an abandoned body is
    dropped at once, and a certificate the client does not trust is a final error, not a retry."""
    import ssl

    server_ctx, client_ctx = _tls_contexts(tmp_path)
    peers: set = set()

    async def blob(request: web.Request) -> web.StreamResponse:
        peers.add(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        if "quiet" in request.query:
            resp = web.StreamResponse(headers={"Content-Length": str(len(DATA))})
            await resp.prepare(request)
            await resp.write(DATA[:1000])
            await asyncio.sleep(10)
            return resp
        start, end = (int(x) for x in request.headers["Range"][6:].split("-"))
        return web.Response(status=206, body=DATA[start:end + 1],
                            headers={"Content-Range": f"bytes {start}-{end}/{len(DATA)}"})

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/blob", blob)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
        await site.start()
        base = f"https://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        pool = RawPool(connect_timeout=5, read_timeout=5, ssl_context=client_ctx)
        try:
            for start, end in ((0, len(DATA) - 1), (5, 5), (BUFFER - 3, BUFFER + 70_000)):
                resp = await pool.get(f"{base}/blob", {"Range": f"bytes={start}-{end}"})
                assert resp.status == 206
                assert await _collect(resp) == DATA[start:end + 1]
            assert len(peers) == 1
            resp = await pool.get(f"{base}/blob?quiet=1", {})
            reader = asyncio.create_task(_collect(resp))
            await asyncio.sleep(0.2)
            reader.cancel()
            async with asyncio.timeout(2):  # not the 5 s read timeout: the socket was shut down
                with pytest.raises(asyncio.CancelledError):
                    await reader
            untrusting = RawPool(connect_timeout=5, read_timeout=5, ssl_context=ssl.create_default_context())
            try:
                with pytest.raises(ModelCacheError, match="certificate not trusted") as refused:
                    await untrusting.get(f"{base}/blob", {"Range": "bytes=0-1"})
                assert not isinstance(refused.value, Unavailable)  # final: retrying cannot help
            finally:
                untrusting.close()
        finally:
            pool.close()
            await runner.cleanup()

    asyncio.run(main())
