"""Bad input to `modelcache pull`: a non-zero exit, one clear error line, no traceback, no model left.

Every refusal is checked the same way (:func:`refused`): the exit code of the
error class, exactly one line on stderr (``--quiet``) that starts with
``modelcache: error:`` and names the problem, and a store with no view and no
ref for the model. Bad images are pushed to the real registry through the
distribution API and then corrupted in its storage directory; what the
registry refuses to store (non-JSON or over 4 MiB manifests) is served by a
tiny loopback server or a hand-written OCI layout.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import tarfile
from contextlib import closing
from pathlib import Path

import pytest
from formats_support import (
    compress,
    fake_registry,
    hand_layout,
    image_layer,
    manifest_descriptor,
    pull,
    registry_blob_file,
    umoci_layer,
)
from support import (
    LAYER_GZIP,
    LAYER_TAR,
    MP_ARTIFACT,
    MP_CONFIG,
    MP_WEIGHT,
    OCI_INDEX,
    OCI_MANIFEST,
    make_tar,
    run_cli,
    sha256,
    tree_digests,
)

BIG = random.Random(7).randbytes((2 << 20) + 333)  # three 1 MiB chunks
SYM, LNK = tarfile.SYMTYPE, tarfile.LNKTYPE
BAD_REF, NOT_FOUND, BAD_CONTENT = 2, 3, 5  # exit codes (modelcache/errors.py)
OVER_4_MIB = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [],
                         "annotations": {"pad": "x" * (4 << 20)}}).encode()


def refused(proc, code: int, *words: str) -> str:
    """Assert a clean refusal: exit ``code``, one ``modelcache: error:`` line naming ``words``."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelcache: error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert proc.stdout == ""
    return lines[0]


def nothing_kept(store: Path) -> bool:
    """No view (not even a half-built one) and no ref or view recorded in the store's index."""
    views, index = store / "views", store / "index.sqlite"
    if views.exists() and any(views.iterdir()):
        return False
    if not index.exists():
        return True
    with closing(sqlite3.connect(index)) as db:  # what `ls` reads, without a process per check
        return db.execute("SELECT (SELECT COUNT(*) FROM refs) + (SELECT COUNT(*) FROM views)").fetchone()[0] == 0


def try_pull(ref: str, store: Path, *flags: str):
    return run_cli("pull", "--quiet", "--chunk-size", "1M", *flags, ref, store=store)


def push_raw(registry, repo: str, files: dict[str, bytes], tag: str = "v1") -> str:
    """A ModelPack artifact of .raw layers; return its manifest digest."""
    layers = [(data, MP_WEIGHT, {"org.cncf.model.filepath": path}) for path, data in files.items()]
    return registry.push_image(repo, tag, layers, config=b"{}", config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)


def corrupt(path: Path, at: int) -> None:
    """Flip one byte of a file in place (same size, so only a digest check can tell)."""
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


# -- references ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ref,words", [
    ("ftp://x", ["unsupported reference scheme 'ftp'"]),
    ("https://registry.example/models/m:v1", ["unsupported reference scheme 'https'"]),
    ("oci://", ["expected oci://HOST"]),
    ("oci://registry.example", ["expected oci://HOST"]),
    ("oci://registry.example/", ["expected oci://HOST"]),
    ("oci://bad host/models/m", ["invalid registry host"]),
    ("oci://registry.example/Models/M:v1", ["invalid repository name"]),
    ("oci://registry.example/models//m:v1", ["invalid repository name"]),
    ("oci://registry.example/models/m:bad tag", ["invalid tag 'bad tag'"]),
    ("oci://registry.example/models/m:-v1", ["invalid tag '-v1'"]),
    ("oci://registry.example/models/m:v1!", ["invalid tag 'v1!'"]),
    ("oci://registry.example/models/m:", ["invalid tag ''"]),
    ("oci://registry.example/models/m:" + "v" * 129, ["invalid tag"]),
    ("oci://registry.example/models/m@sha256:1234", ["invalid digest"]),
    ("oci://registry.example/models/m@md5:" + "0" * 32, ["invalid digest"]),
    ("oci-layout://", ["missing layout path"]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_unknown_reference_syntax(store: Path, ref: str, words: list[str]) -> None:
    """References that do not parse are refused before any I/O (exit 2)."""
    refused(try_pull(ref, store), BAD_REF, *words)
    assert nothing_kept(store)


def test_missing_tag_and_repository(registry, store: Path) -> None:
    """A tag the repository lacks, or a repository the registry lacks: exit 3, naming what is missing."""
    push_raw(registry, "bad/exists", {"w.bin": b"w"})
    refused(try_pull(f"oci://{registry.host}/bad/exists:v2", store), NOT_FOUND, "tag 'v2' not found",
            "bad/exists")
    refused(try_pull(f"oci://{registry.host}/bad/no-such-repo:v1", store), NOT_FOUND, "not found",
            "bad/no-such-repo")
    refused(try_pull(f"oci://{registry.host}/bad/exists@sha256:{'0' * 64}", store), NOT_FOUND, "not found")
    assert nothing_kept(store)


def test_missing_tag_in_a_layout(store: Path, tmp_path: Path) -> None:
    """A tag an OCI layout does not hold: exit 3."""
    umoci_layer(tmp_path / "layout", "v1", files={"models/w.bin": b"w"})
    refused(try_pull(f"oci-layout://{tmp_path / 'layout'}:v9", store), NOT_FOUND, "tag 'v9' not found")
    assert nothing_kept(store)


def test_layout_with_several_images_and_no_tag(store: Path, tmp_path: Path) -> None:
    """A umoci layout holding two tags needs one named: the error lists them; naming one works."""
    layout = tmp_path / "layout"
    umoci_layer(layout, "v1", files={"models/w.bin": b"one"})
    umoci_layer(layout, "v2", files={"models/w.bin": b"two"})
    for ref in (str(layout), f"oci-layout://{layout}", f"file://{layout}"):
        refused(try_pull(ref, store), BAD_CONTENT, "holds 2 images", "name one with :TAG", "v1, v2")
    assert nothing_kept(store)
    assert (pull(f"{layout}:v2", store) / "models" / "w.bin").read_bytes() == b"two"
    assert not nothing_kept(store)  # the check sees a model when there is one


def test_index_without_a_usable_manifest(registry, store: Path) -> None:
    """An index with neither a ModelPack artifact nor linux/amd64 (and several entries) is refused, listing them."""
    repo = "bad/no-amd64"
    entries = []
    for arch in ("arm64", "s390x"):
        config = json.dumps({"architecture": arch, "os": "linux"}).encode()
        digest = registry.push_image(repo, arch, [image_layer([("f", arch.encode(), {})])], config=config)
        entries.append(manifest_descriptor(registry, repo, digest, platform={"os": "linux", "architecture": arch}))
    registry.push_manifest(repo, "v1", {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries},
                           OCI_INDEX)
    refused(try_pull(f"oci://{registry.host}/{repo}:v1", store), BAD_CONTENT, "linux/arm64, linux/s390x")
    assert nothing_kept(store)


# -- bytes that do not match their digest --------------------------------------------------------------


@pytest.mark.parametrize("asked_by", ["digest", "tag", "index"])
def test_manifest_bytes_that_do_not_match_their_digest(registry, store: Path, asked_by: str) -> None:
    """A manifest whose stored bytes were altered is refused, asked by digest, by tag or through an index."""
    repo = f"bad/manifest-{asked_by}"
    digest = push_raw(registry, repo, {"w.bin": asked_by.encode()})  # a manifest of its own per case
    if asked_by == "index":
        entry = manifest_descriptor(registry, repo, digest, artifactType=MP_ARTIFACT)
        registry.push_manifest(repo, "v1", {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]},
                               OCI_INDEX)
    stored = registry_blob_file(registry, digest)
    body = stored.read_bytes()
    stored.write_bytes(body.replace(b'"schemaVersion": 2', b'"schemaVersion":  2'))  # still valid JSON
    assert stored.read_bytes() != body
    ref = f"oci://{registry.host}/{repo}" + (f"@{digest}" if asked_by == "digest" else ":v1")
    refused(try_pull(ref, store), BAD_CONTENT, "manifest digest is", f"expected {digest}")
    assert nothing_kept(store)


def test_manifest_served_for_another_digest(store: Path) -> None:
    """A registry answering @sha256:X with some other manifest (and no digest header) is caught."""
    honest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
    other = "sha256:" + "ab" * 32
    with fake_registry({f"bad/liar:{other}": (honest, {"Content-Type": OCI_MANIFEST})}) as host:
        refused(try_pull(f"oci://{host}/bad/liar@{other}", store), BAD_CONTENT, f"expected {other}")
    assert nothing_kept(store)


def test_layout_manifest_that_does_not_match_its_digest(store: Path, tmp_path: Path) -> None:
    """A layout whose manifest blob was altered after index.json named it is refused."""
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
    layout = hand_layout(tmp_path / "layout", [(body, {})])
    (layout / "blobs" / "sha256" / sha256(body)[7:]).write_bytes(body + b" ")
    refused(try_pull(str(layout), store), BAD_CONTENT, sha256(body))
    assert nothing_kept(store)


@pytest.mark.parametrize("kind", ["raw", "tar+gzip"])
def test_layer_bytes_that_do_not_match_their_digest(registry, store: Path, kind: str) -> None:
    """A layer corrupted in the registry's storage is refused (chunked fetch), and nothing of it is kept."""
    repo = "bad/rotten-" + kind.replace("+", "-")
    if kind == "raw":
        push_raw(registry, repo, {"w.bin": BIG})
        layer = BIG
    else:
        layer = compress(make_tar([("models/w.bin", BIG, {})]), "gzip")
        registry.push_image(repo, "v1", [(layer, LAYER_GZIP, None)])
    corrupt(registry_blob_file(registry, sha256(layer)), (1 << 20) + 5)  # inside the second chunk
    refused(try_pull(f"oci://{registry.host}/{repo}:v1", store), BAD_CONTENT, sha256(layer), "refusing it")
    assert not (store / "blobs" / "sha256" / sha256(layer)[7:]).exists()
    assert not (store / "ingest" / sha256(layer)[7:]).exists()  # the bad download is not kept to resume
    assert nothing_kept(store)


@pytest.mark.parametrize("delta,words", [(-1000, ["arrived as"]), (1000, ["not satisfiable", "size differs"])],
                         ids=["size-too-small", "size-too-large"])
def test_layer_size_that_does_not_match_the_blob(registry, store: Path, delta: int, words: list[str]) -> None:
    """A manifest naming blob A's digest with another size is refused whichever way the size is wrong."""
    repo = "bad/size-" + ("small" if delta < 0 else "large")
    data = os.urandom(5000)
    config, layer = registry.push_blob(repo, b"{}"), registry.push_blob(repo, data)
    layer.update(size=len(data) + delta, mediaType=MP_WEIGHT, annotations={"org.cncf.model.filepath": "w.bin"})
    registry.push_manifest(repo, "v1", {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": MP_ARTIFACT,
                                        "config": {"mediaType": MP_CONFIG, **config}, "layers": [layer]})
    refused(try_pull(f"oci://{registry.host}/{repo}:v1", store), BAD_CONTENT, *words)
    assert nothing_kept(store)


# -- layers that would escape the model directory --------------------------------------------------------


@pytest.mark.parametrize("entries,words", [
    ([("../escape", b"x", {})], ["'../escape' escapes the model directory"]),
    ([("models/../../escape", b"x", {})], ["escapes the model directory"]),
    ([("/../escape", b"x", {})], ["escapes the model directory"]),
    ([("passwd", None, {"type": SYM, "linkname": "../../etc/passwd"})], ["points outside"]),
    ([("models/up", None, {"type": SYM, "linkname": "../.."})], ["points outside"]),
    ([("models/root", None, {"type": SYM, "linkname": "/../../etc"})], ["points outside"]),
    ([("models/l", None, {"type": SYM, "linkname": ".."}), ("x", None, {"type": SYM, "linkname": "models/l/.."})],
     ["leads outside the model"]),
    ([("hard", None, {"type": LNK, "linkname": "etc/passwd"})], ["names no earlier file"]),
    ([("hard", None, {"type": LNK, "linkname": "later.txt"}), ("later.txt", b"x", {})], ["names no earlier file"]),
    ([("hard", None, {"type": LNK, "linkname": "../../etc/passwd"})], ["escapes the model directory"]),
    ([("dev/null", None, {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3})], ["device file"]),
    ([("dev/sda", None, {"type": tarfile.BLKTYPE, "devmajor": 8, "devminor": 0})], ["device file"]),
    ([("pipe", None, {"type": tarfile.FIFOTYPE})], ["device file or FIFO"]),
], ids=["dotdot", "nested-dotdot", "root-dotdot", "symlink-out", "symlink-up", "symlink-abs-up",
        "symlink-chain-out", "hardlink-missing", "hardlink-forward",
        "hardlink-dotdot", "chardev", "blockdev", "fifo"])
def test_unsafe_tar_layers(registry, store: Path, entries: list, words: list[str]) -> None:
    """Tar layers that would write or point outside the model, or make devices, are refused whole."""
    layer = make_tar([("models/ok.txt", b"fine", {}), *entries])
    repo = "bad/unsafe-" + sha256(layer)[7:19]
    registry.push_image(repo, "v1", [(layer, LAYER_TAR, None)])
    refused(try_pull(f"oci://{registry.host}/{repo}:v1", store), BAD_CONTENT, *words)
    assert nothing_kept(store)


def test_hardlink_to_a_file_of_a_lower_layer(registry, store: Path) -> None:
    """A hardlink may only name a file of its own layer, even when a lower layer has that path."""
    lower = image_layer([("models/w.bin", b"w", {})])
    upper = image_layer([("models/link.bin", None, {"type": LNK, "linkname": "models/w.bin"})], "gzip")
    registry.push_image("bad/hardlink-lower", "v1", [lower, upper])
    refused(try_pull(f"oci://{registry.host}/bad/hardlink-lower:v1", store), BAD_CONTENT, "names no earlier file")
    assert nothing_kept(store)


@pytest.mark.parametrize("annotations,media_type,words", [
    ({"org.cncf.model.filepath": "../escape.bin"}, MP_WEIGHT, ["escapes the model directory"]),
    ({"org.opencontainers.image.title": "../../escape.bin"}, "application/json", ["escapes the model directory"]),
    ({"org.opencontainers.image.title": "..", "io.deis.oras.content.unpack": "true"}, LAYER_GZIP,
     ["escapes the model directory"]),
    ({}, MP_WEIGHT, ["without org.cncf.model.filepath"]),
    ({}, "application/x-unknown", ["unsupported layer media type 'application/x-unknown' without a file name"]),
    ({}, "application/vnd.oci.image.layer.v1.tar+bzip2", ["unsupported layer media type"]),
], ids=["modelpack-dotdot", "title-dotdot", "oras-dir-dotdot", "raw-without-path", "unknown-type",
        "bzip2"])
def test_bad_layer_descriptors(registry, store: Path, annotations: dict, media_type: str, words: list[str]) -> None:
    """Layer paths from annotations that escape, and layers of unknown type without a title, are refused."""
    data = compress(make_tar([("a.txt", b"a", {})]), "gzip")
    repo = "bad/desc-" + sha256(json.dumps([annotations, media_type]).encode())[7:19]
    registry.push_image(repo, "v1", [(data, media_type, annotations)])
    refused(try_pull(f"oci://{registry.host}/{repo}:v1", store), BAD_CONTENT, *words)
    assert nothing_kept(store)


@pytest.mark.parametrize("media_type,data", [
    (LAYER_GZIP, b"\x1f\x8b not really gzip"),
    ("application/vnd.oci.image.layer.v1.tar+zstd", b"not zstd at all"),
    (LAYER_TAR, b"x" * 1024),
], ids=["gzip", "zstd", "tar"])
def test_layer_that_is_not_the_archive_it_claims(registry, store: Path, media_type: str, data: bytes) -> None:
    """A layer whose bytes are not a valid (compressed) tar is refused, naming the compression."""
    repo = "bad/not-an-archive-" + media_type.rpartition(".")[2].replace("+", "-")
    registry.push_image(repo, "v1", [(data, media_type, None)])
    refused(try_pull(f"oci://{registry.host}/{repo}:v1", store), BAD_CONTENT, "not a valid")
    assert nothing_kept(store)


def test_absolute_paths_are_relative_to_the_layer_root(registry, store: Path) -> None:
    """'/etc/x' in a tar layer, or as a ModelPack filepath, lands at etc/x inside the view."""
    registry.push_image("bad/absolute", "v1", [
        image_layer([("/etc/x", b"from tar", {}), ("/models/", None, {"type": tarfile.DIRTYPE}),
                     ("/models/w.bin", b"w", {})]),
        (b"from raw", MP_WEIGHT, {"org.cncf.model.filepath": "/etc/y"}),
    ])
    view = pull(f"oci://{registry.host}/bad/absolute:v1", store)
    assert tree_digests(view) == {"etc/x": sha256(b"from tar"), "etc/y": sha256(b"from raw"),
                                  "models/w.bin": sha256(b"w")}


# -- manifests that are not manifests ---------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_manifest_over_4_mib_from_a_registry(store: Path, chunked: bool) -> None:
    """A registry serving a manifest over 4 MiB (announced or not) is refused; the real registry will not store one."""
    headers = {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": sha256(OVER_4_MIB)}
    with fake_registry({"bad/huge:v1": (OVER_4_MIB, headers)}, chunked=chunked) as host:
        refused(try_pull(f"oci://{host}/bad/huge:v1", store), BAD_CONTENT, "over the 4 MiB limit")
    assert nothing_kept(store)


def test_the_real_registry_refuses_to_store_a_manifest_over_4_mib(registry) -> None:
    """Why the 4 MiB cases above are served by a fake: CNCF Distribution refuses the push."""
    import urllib.error

    with pytest.raises(urllib.error.HTTPError):
        registry.push_manifest("bad/huge", "v1", OVER_4_MIB)


@pytest.mark.parametrize("size", ["true", "small"])
def test_manifest_over_4_mib_in_a_layout(store: Path, tmp_path: Path, size: str) -> None:
    """A layout manifest over 4 MiB is refused, whether its descriptor tells the size or lies about it."""
    layout = hand_layout(tmp_path / "layout", [(OVER_4_MIB, {"size": 100} if size == "small" else {})])
    refused(try_pull(str(layout), store), BAD_CONTENT, "4 MiB")
    assert nothing_kept(store)


@pytest.mark.parametrize("body,words", [
    (b"not json at all", ["not valid JSON"]),
    (b'{"schemaVersion": 2, "layers": [', ["not valid JSON"]),
    (b"\xff\xfe\x00garbage", ["not valid JSON"]),
    (b"[1, 2, 3]", ["not a JSON object"]),
    (json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST}).encode(), ["no layers list"]),
    (json.dumps({"schemaVersion": 1, "mediaType": "application/vnd.docker.distribution.manifest.v1+json",
                 "fsLayers": []}).encode(), ["unsupported manifest media type"]),
    (json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [
        {"mediaType": MP_WEIGHT, "digest": "sha256:" + "a" * 64, "size": -1}]}).encode(), ["invalid size"]),
    (json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [
        {"mediaType": MP_WEIGHT, "digest": "md5:abc", "size": 1}]}).encode(), ["invalid digest"]),
], ids=["garbage", "truncated", "binary", "array", "no-layers", "schema1", "negative-size", "md5-digest"])
def test_manifests_that_are_not_manifests(store: Path, tmp_path: Path, body: bytes, words: list[str]) -> None:
    """Non-JSON and malformed manifests are refused, from a registry (asked by digest) and from a layout."""
    with fake_registry({f"bad/garbage:{sha256(body)}": (body, {"Content-Type": OCI_MANIFEST})}) as host:
        refused(try_pull(f"oci://{host}/bad/garbage@{sha256(body)}", store), BAD_CONTENT, *words)
    refused(try_pull(str(hand_layout(tmp_path / "layout", [(body, {})])), store), BAD_CONTENT, *words)
    assert nothing_kept(store)


# -- the error line without --quiet ---------------------------------------------------------------------


def test_error_is_the_last_line_after_progress(registry, store: Path) -> None:
    """Without --quiet, stderr holds progress lines and then the one error line, never a traceback."""
    push_raw(registry, "bad/progress", {"w.bin": BIG})
    corrupt(registry_blob_file(registry, sha256(BIG)), 10)
    proc = run_cli("pull", "--chunk-size", "1M", f"oci://{registry.host}/bad/progress:v1", store=store)
    assert proc.returncode == BAD_CONTENT and "Traceback" not in proc.stderr
    *progress, last = proc.stderr.splitlines()
    assert last.startswith("modelcache: error: ") and sha256(BIG) in last
    assert all(line.startswith(f"pull oci://{registry.host}/bad/progress:v1") for line in progress), progress
    assert nothing_kept(store)
