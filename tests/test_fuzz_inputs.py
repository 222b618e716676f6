"""Hostile input, fuzzed with hypothesis: manifests, indexes, tar layers and names.

Whatever a registry, a layout, a bucket or the Hub hands us, the outcome is
one of two: a model whose every path lies inside its own directory, or a
refusal (:class:`~modelcache.errors.InvalidContent`, exit code 5). Never
another exception, never a byte written outside the store.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support import write_layout

from modelcache.cli import main
from modelcache.errors import InvalidContent, UnsafePath
from modelcache.model import Archive, FileEntry
from modelcache.sources.oci_manifest import model_from_manifest, parse_json, select_from_index
from modelcache.tree import safe_path

DIGEST = "sha256:" + "ab" * 32
MEDIA_TYPES = [
    "application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd", "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.cncf.model.weight.v1.raw", "application/vnd.cncf.model.weight.v1.tar",
    "application/vnd.cnai.model.weight.v1.tar+gzip", "application/json", "", "text/x-nonsense",
]
ANNOTATION_KEYS = [
    "org.opencontainers.image.title", "org.cncf.model.filepath", "org.cnai.model.filepath",
    "io.deis.oras.content.unpack", "io.modelcache.file.path", "io.modelcache.file.digest",
    "io.modelcache.file.size", "io.modelcache.file.offset",
]
# Paths as a hostile producer writes them: climbing, absolute, NUL, overlong, odd unicode.
HOSTILE_PATHS = st.one_of(
    st.lists(st.sampled_from(["a", "..", ".", "", "b.bin", "x" * 300, "é", "\x00", "~"]), max_size=8).map("/".join),
    st.text(max_size=40),
    st.sampled_from(["/etc/passwd", "../../../../etc/shadow", "a/../../b", "//..//a", "C:\\x", "a" * 5000]),
)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**70), st.text(max_size=12), st.floats())


def _descriptor() -> st.SearchStrategy:
    return st.fixed_dictionaries(
        {},
        optional={
            "mediaType": st.sampled_from(MEDIA_TYPES) | SCALARS,
            "digest": st.sampled_from([DIGEST, "sha256:zz", "md5:" + "0" * 32, ""]) | SCALARS,
            "size": st.integers(-5, 10**30) | SCALARS,
            "annotations": st.dictionaries(st.sampled_from(ANNOTATION_KEYS), HOSTILE_PATHS | SCALARS, max_size=5)
            | SCALARS,
            "platform": st.fixed_dictionaries({}, optional={"os": st.sampled_from(["linux", "windows"]) | SCALARS,
                                                             "architecture": st.sampled_from(["amd64"]) | SCALARS}),
            "artifactType": st.sampled_from(["application/vnd.cncf.model.manifest.v1+json"]) | SCALARS,
        },
    )


def _inside(path: str) -> bool:
    parts = path.split("/")
    return (bool(path) and not path.startswith("/") and "\x00" not in path
            and all(p not in ("", ".", "..") and len(p.encode()) <= 255 for p in parts))


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional={"layers": st.lists(_descriptor(), max_size=6) | SCALARS,
                                           "annotations": SCALARS | st.dictionaries(st.text(), st.text())}))
def test_manifests_give_safe_models_or_a_refusal(doc: dict) -> None:
    try:
        model = model_from_manifest(doc, ref="oci://r/x", digest=DIGEST)
    except InvalidContent:
        return
    for part in model.parts:
        if isinstance(part, FileEntry):
            assert _inside(part.path), part
            assert part.blob.size >= 0
        else:
            assert isinstance(part, Archive)
            assert part.prefix == "" or _inside(part.prefix), part


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries({}, optional={"manifests": st.lists(_descriptor(), max_size=5) | SCALARS}))
def test_indexes_choose_a_valid_descriptor_or_refuse(doc: dict) -> None:
    try:
        blob = select_from_index(doc, what="index")
    except InvalidContent:
        return
    assert blob.digest == DIGEST and blob.size >= 0


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | st.recursive(SCALARS, lambda c: st.lists(c) | st.dictionaries(st.text(), c))
       .map(lambda v: json.dumps(v).encode()))
@example(b"[" * 100_000)
@example(b'{"a":' * 50_000)
def test_manifest_bodies_parse_or_refuse(body: bytes) -> None:
    try:
        doc = parse_json(body, what="manifest")
    except InvalidContent:
        return
    assert isinstance(doc, dict)


@given(HOSTILE_PATHS)
@example("x" * 256)
@example("a/" + "b" * 256 + "/c")
@example("/".join(["d" * 200] * 25))
def test_names_are_normalised_inside_or_refused(raw: str) -> None:
    """S3 keys, Hub file names, titles and tar entries all go through safe_path."""
    try:
        out = safe_path(raw, context="t")
    except UnsafePath:
        return
    assert _inside(out), out
    assert len(out.encode()) < 4096


# -- tar layers, end to end: a hostile layer in an OCI layout, pulled by the CLI ----------------------

_ENTRY_TYPES = [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
                tarfile.FIFOTYPE]
_ENTRY = st.tuples(HOSTILE_PATHS, st.sampled_from(_ENTRY_TYPES), HOSTILE_PATHS, st.binary(max_size=64))


def _tar(entries: list[tuple[str, bytes, str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, link, data in entries:
            if "\x00" in name or "\x00" in link or not name:
                continue  # tarfile itself cannot write these; the raw-header tests in test_bad_input cover NUL
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = 0o644
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = link
            if kind == tarfile.REGTYPE:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def _layout(root: Path, layer: bytes) -> Path:
    return write_layout(root, [(layer, "application/vnd.oci.image.layer.v1.tar")])


def _snapshot(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_ENTRY, min_size=1, max_size=6))
@example([("a", tarfile.SYMTYPE, "/etc", b""), ("a/passwd", tarfile.REGTYPE, "", b"x")])
@example([("l", tarfile.SYMTYPE, "../../..", b""), ("l/escape", tarfile.REGTYPE, "", b"x")])
@example([("h", tarfile.LNKTYPE, "/etc/hostname", b"")])
@example([("x" * 300, tarfile.REGTYPE, "", b"long")])
@example([("0", tarfile.SYMTYPE, "x" * 300, b"")])  # found by CI: a link no lookup can follow
@example([("dev", tarfile.CHRTYPE, "", b"")])
def test_hostile_tar_layers_land_inside_the_store_or_are_refused(tmp_path: Path, entries: list) -> None:
    case = Path(os.path.realpath(tmp_path)) / f"case-{os.urandom(4).hex()}"
    outside = case / "outside"
    outside.mkdir(parents=True)
    (outside / "sentinel").write_text("keep")
    layout = _layout(case / "layout", _tar(entries))
    store = case / "store"
    before = _snapshot(outside)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["--store", str(store), "pull", "-q", f"oci-layout://{layout}:v1"])
    assert code in (0, 3, 5), (code, stderr.getvalue())  # 3: a layer with no files in it
    assert "Traceback" not in stderr.getvalue()
    assert _snapshot(outside) == before and (outside / "sentinel").read_text() == "keep"
    if code != 0:
        return
    view = Path(stdout.getvalue().strip().splitlines()[-1])
    for path in view.rglob("*"):
        # Every entry of the model resolves inside the model (a symlink may only lead elsewhere in it).
        resolved = Path(os.path.realpath(path))
        assert resolved == view or view in resolved.parents or store in resolved.parents, (path, resolved)
        if path.is_file() and not path.is_symlink():
            assert path.stat().st_nlink >= 2  # a hardlink to a verified blob, never a file of its own


@pytest.mark.parametrize("name", ["x" * 256, "d/" + "y" * 300])
def test_overlong_names_are_refused_content(tmp_path: Path, name: str) -> None:
    layout = _layout(tmp_path / "layout", _tar([(name, tarfile.REGTYPE, "", b"data")]))
    stderr = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        code = main(["--store", str(tmp_path / "store"), "pull", "-q", f"oci-layout://{layout}:v1"])
    assert code == 5, stderr.getvalue()
    assert "too long" in stderr.getvalue()


# -- names from a bucket or a Hub: the same rules as a layer's ----------------------------------------


@pytest.mark.parametrize("name", ["../../../outside.txt", "a/../../outside.txt", "w/" + "z" * 300])
def test_hostile_hub_file_names_are_refused(tmp_path: Path, name: str) -> None:
    """HF_ENDPOINT may be any server; a file name that leaves the model is refused content (5)."""
    from fake_hub import FakeHub
    from support import run_cli

    with FakeHub() as hub:
        hub.repo("evil/names").commit({"config.json": b"{}", name: b"escaped"})
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1",
               "HF_TOKEN": ""}
        proc = run_cli("pull", "-q", "hf://evil/names", store=tmp_path / "store", env=env)
    assert proc.returncode == 5, proc.stderr
    assert "escapes the model directory" in proc.stderr or "too long" in proc.stderr
    assert not any(p.name == "outside.txt" for p in tmp_path.rglob("*"))


def test_a_view_never_links_outside_itself(tmp_path: Path) -> None:
    """The store's last line of defence, whatever a source let through."""
    from modelcache.store.views import ViewEntry, build_view

    blob = tmp_path / "blob"
    blob.write_bytes(b"x")
    with pytest.raises(UnsafePath):
        build_view(tmp_path / "views", [ViewEntry("../escaped", "file", digest="d", size=1)], lambda d: blob)
    assert not (tmp_path / "escaped").exists()


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/blob", "gopher://127.0.0.1:70/x"])
def test_redirects_to_other_schemes_are_refused_content(tmp_path: Path, location: str) -> None:
    """A registry that sends a manifest to file:, ftp: or any non-HTTP URL is refused (5), not retried."""
    from aiohttp import web
    from faultproxy import BackgroundServer
    from support import run_cli

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/v2/":
            return web.json_response({})
        return web.Response(status=302, headers={"Location": location})

    with BackgroundServer(handle) as server:
        proc = run_cli("pull", "-q", "--retries", "2", f"oci://{server.host}/evil/redirect:v1",
                       store=tmp_path / "store", timeout=60)
    assert proc.returncode == 5, proc.stderr
    assert "only http and https are followed" in proc.stderr
    assert "Traceback" not in proc.stderr
