"""Helpers for tests/test_formats.py and tests/test_bad_input.py.

Images are built here with umoci and skopeo, or by hand from the OCI specs
(tar files from :func:`support.make_tar`, manifests pushed through the
distribution API), never with modelcache's own packaging code.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import zstandard
from aiohttp import web
from faultproxy import BackgroundServer
from support import (
    LAYER_GZIP,
    LAYER_TAR,
    LAYER_ZSTD,
    OCI_MANIFEST,
    Registry,
    make_tar,
    run_cli,
    sha256,
)

IMAGE_LAYER_TYPES = {"tar": LAYER_TAR, "gzip": LAYER_GZIP, "zstd": LAYER_ZSTD}
REF_NAME = "org.opencontainers.image.ref.name"


def compress(raw: bytes, kind: str) -> bytes:
    """``raw`` as is ("tar"), gzip'd or zstd'd."""
    if kind == "gzip":
        return gzip.compress(raw, mtime=0)
    if kind == "zstd":
        return zstandard.ZstdCompressor().compress(raw)
    assert kind == "tar", kind
    return raw


def image_layer(entries: list, kind: str = "tar") -> tuple[bytes, str, None]:
    """A (bytes, media type, annotations) image layer for :meth:`Registry.push_image`."""
    return compress(make_tar(entries), kind), IMAGE_LAYER_TYPES[kind], None


def pull(ref: str, store: Path, *flags: str) -> Path:
    """``modelcache pull --chunk-size 1M FLAGS REF``; must succeed; return the view."""
    proc = run_cli("pull", "--chunk-size", "1M", *flags, ref, store=store)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    view = Path(proc.stdout.strip().splitlines()[-1])
    assert view.is_absolute() and view.is_dir(), proc.stdout
    return view


def ls(store: Path) -> list[dict]:
    """``modelcache ls --json``."""
    return json.loads(run_cli("ls", "--json", store=store, check=True).stdout)


def store_blobs(store: Path) -> set[str]:
    """Digests of the blobs committed in a store."""
    blobs = store / "blobs" / "sha256"
    return {"sha256:" + p.name for p in blobs.iterdir()} if blobs.is_dir() else set()


def registry_blob_file(registry: Registry, digest: str) -> Path:
    """Where CNCF Distribution's filesystem driver keeps a blob (layers and manifests alike)."""
    hex_ = digest.partition(":")[2]
    return registry.root / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256" / hex_[:2] / hex_ / "data"


def registry_get(registry: Registry, path: str, accept: str = OCI_MANIFEST) -> bytes:
    """GET ``path`` from the registry (manifests: with ``accept``)."""
    req = urllib.request.Request(registry.url(path), headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read()


def manifest_descriptor(registry: Registry, repo: str, digest: str, media_type: str = OCI_MANIFEST,
                        **fields: object) -> dict:
    """An index entry for a manifest already in ``repo``."""
    size = len(registry_get(registry, f"/v2/{repo}/manifests/{digest}", media_type))
    return {"mediaType": media_type, "digest": digest, "size": size, **fields}


def run(*cmd: str | Path) -> str:
    """Run a tool (umoci, skopeo); fail the test with its stderr if it fails."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}: {proc.stderr}"
    return proc.stdout


def umoci_layer(layout: Path, tag: str, *, files: dict[str, bytes] | None = None,
                symlinks: dict[str, str] | None = None, remove: tuple[str, ...] = ()) -> None:
    """Add one layer to ``layout:tag`` with umoci (unpack, change the rootfs, repack).

    The layout and the image are created on first use. Paths are relative to
    the image's root; ``remove`` deletes paths, which umoci records as
    whiteouts.
    """
    if not (layout / "oci-layout").exists():
        run("umoci", "init", "--layout", layout)
    index = json.loads((layout / "index.json").read_text())
    if not any((m.get("annotations") or {}).get(REF_NAME) == tag for m in index.get("manifests") or []):
        run("umoci", "new", "--image", f"{layout}:{tag}")
    bundle = layout.parent / f"bundle-{layout.name}-{tag}"
    run("umoci", "unpack", "--rootless", "--image", f"{layout}:{tag}", bundle)
    rootfs = bundle / "rootfs"
    for path in remove:
        target = rootfs / path
        if target.is_dir() and not target.is_symlink():
            subprocess.run(["rm", "-rf", str(target)], check=True)
        else:
            target.unlink()
    for path, data in (files or {}).items():
        (rootfs / path).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / path).write_bytes(data)
    for path, target in (symlinks or {}).items():
        (rootfs / path).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / path).symlink_to(target)
    run("umoci", "repack", "--image", f"{layout}:{tag}", bundle)
    subprocess.run(["rm", "-rf", str(bundle)], check=True)


def layout_manifest(layout: Path, tag: str) -> tuple[str, dict]:
    """(digest, document) of the manifest tagged ``tag`` in an OCI layout."""
    index = json.loads((layout / "index.json").read_text())
    [entry] = [m for m in index["manifests"] if (m.get("annotations") or {}).get(REF_NAME) == tag]
    return entry["digest"], json.loads((layout / "blobs" / "sha256" / entry["digest"][7:]).read_bytes())


def skopeo_copy(src: str, dest: str, *flags: str) -> None:
    """``skopeo copy`` to or from the loopback registry (plain HTTP)."""
    tls = ["--dest-tls-verify=false"] if dest.startswith("docker://") else []
    tls += ["--src-tls-verify=false"] if src.startswith("docker://") else []
    run("skopeo", "copy", *tls, *flags, src, dest)


def skopeo_raw(ref: str) -> dict:
    """The manifest skopeo sees at ``ref``."""
    tls = ["--tls-verify=false"] if ref.startswith("docker://") else []
    return json.loads(run("skopeo", "inspect", "--raw", *tls, ref))


def hand_layout(root: Path, manifests: list[tuple[bytes, dict]], blobs: tuple[bytes, ...] = ()) -> Path:
    """An OCI layout written by hand: manifest bodies with their index entry fields, and blobs."""
    (root / "blobs" / "sha256").mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    entries = []
    for body, fields in manifests:
        (root / "blobs" / "sha256" / sha256(body)[7:]).write_bytes(body)
        entries.append({"mediaType": OCI_MANIFEST, "digest": sha256(body), "size": len(body), **fields})
    for blob in blobs:
        (root / "blobs" / "sha256" / sha256(blob)[7:]).write_bytes(blob)
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": entries}))
    return root


@contextmanager
def fake_registry(manifests: dict[str, tuple[bytes, dict[str, str]]], *, chunked: bool = False,
                  blobs: dict[str, bytes] | None = None) -> Iterator[str]:
    """A tiny registry on loopback serving fixed manifests: ``{"repo:ref": (body, headers)}``.

    For bodies a real registry refuses to store (over 4 MiB, not JSON), or
    sends in ways it does not: ``chunked`` sends manifests without a
    Content-Length. ``blobs`` (by digest, any repository) answer ranged GETs.
    Yields ``host:port``.
    """
    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/v2/":
            return web.json_response({})
        digest = request.path.rpartition("/blobs/")[2]
        if "/blobs/" in request.path and digest in (blobs or {}):
            return _ranged((blobs or {})[digest], request.headers.get("Range"))
        repo, sep, ref = request.path.removeprefix("/v2/").partition("/manifests/")
        if not sep or f"{repo}:{ref}" not in manifests:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        body, headers = manifests[f"{repo}:{ref}"]
        if not chunked:
            return web.Response(body=body, headers=headers)
        resp = web.StreamResponse(headers=headers)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for start in range(0, len(body), 1 << 20):
            await resp.write(body[start:start + (1 << 20)])
        await resp.write_eof()
        return resp

    with BackgroundServer(handle) as server:
        yield server.host


def _ranged(data: bytes, header: str | None) -> web.Response:
    """A blob answer honouring a ``bytes=START-END`` Range header."""
    if not header:
        return web.Response(body=data)
    start, _, end = header.removeprefix("bytes=").partition("-")
    first, last = int(start), min(int(end or len(data) - 1), len(data) - 1)
    return web.Response(status=206, body=data[first:last + 1],
                        headers={"Content-Range": f"bytes {first}-{last}/{len(data)}"})
