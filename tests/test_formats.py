"""What `modelcache pull` reads from a real registry and from OCI layouts, format by format.

Images are made with umoci and skopeo, or by hand from the OCI specs through
the distribution API (tests/support.py), never with modelcache's packaging
code; pulled trees are compared byte for byte with what went in.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import tarfile
from pathlib import Path

import pytest
from faultproxy import FaultProxy
from formats_support import (
    compress,
    fake_registry,
    image_layer,
    layout_manifest,
    ls,
    manifest_descriptor,
    pull,
    skopeo_copy,
    skopeo_raw,
    store_blobs,
    umoci_layer,
)
from support import (
    LAYER_GZIP,
    LAYER_TAR,
    MP_ARTIFACT,
    MP_CONFIG,
    MP_WEIGHT,
    OCI_INDEX,
    make_tar,
    run_cli,
    sha256,
    tree_digests,
)

_rnd = random.Random(20240611)
WEIGHTS = _rnd.randbytes((2 << 20) + 12345)  # over two 1 MiB chunks
SHARDS = [_rnd.randbytes((1 << 20) + 7 * n) for n in range(1, 3)]
CONFIG = b'{"model_type": "llama", "hidden_size": 64}'
TOKENIZER = b'{"version": "1.0", "model": {"type": "BPE"}}'
DIR = {"type": tarfile.DIRTYPE}

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
TITLE = "org.opencontainers.image.title"
ORAS_UNPACK = "io.deis.oras.content.unpack"


def oci(registry, repo: str) -> str:
    return f"oci://{registry.host}/{repo}"


def digests(files: dict[str, bytes]) -> dict[str, str]:
    """path -> sha256, the shape of support.tree_digests for regular files."""
    return {path: sha256(data) for path, data in files.items()}


def modelpack(files: dict[str, bytes], media_type: str = MP_WEIGHT,
              key: str = "org.cncf.model.filepath") -> list[tuple[bytes, str, dict]]:
    """One ModelPack .raw layer per file."""
    return [(data, media_type, {key: path}) for path, data in files.items()]


def push_modelpack(registry, repo: str, files: dict[str, bytes], **kwargs) -> str:
    return registry.push_image(repo, "v1", modelpack(files, **kwargs), config=b'{"descriptor": {}}',
                               config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)


def push_platform_image(registry, repo: str, os_: str, arch: str) -> dict:
    """An image whose models/platform.txt names its platform; return its index entry."""
    config = json.dumps({"architecture": arch, "os": os_, "rootfs": {"type": "layers", "diff_ids": []}})
    layer = image_layer([("models/platform.txt", f"{os_}/{arch}".encode(), {})], "gzip")
    digest = registry.push_image(repo, f"{os_}-{arch}", [layer], config=config.encode())
    return manifest_descriptor(registry, repo, digest, platform={"os": os_, "architecture": arch})


# -- image layers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tar", "gzip", "zstd"])
def test_image_layers_tar_gzip_zstd(registry, store: Path, kind: str) -> None:
    """Plain, gzip and zstd image layers unpack to the files put in them; the layer blobs are not kept."""
    files = {"models/model.safetensors": WEIGHTS, "models/config.json": CONFIG,
             "models/tokenizer/tokenizer.json": TOKENIZER}
    lower = image_layer([("models/", None, DIR), ("models/model.safetensors", WEIGHTS, {"mode": 0o600})], kind)
    upper = image_layer([("./models/config.json", CONFIG, {}), ("models/tokenizer/", None, DIR),
                         ("models/tokenizer/tokenizer.json", TOKENIZER, {})], kind)
    registry.push_image(f"fmt/layers-{kind}", "v1", [lower, upper])
    view = pull(oci(registry, f"fmt/layers-{kind}:v1"), store)
    assert tree_digests(view) == digests(files)
    assert all(not p.stat().st_mode & 0o222 for p in [view, *view.rglob("*")])
    # Each file is a blob named by its own sha256; the compressed layers themselves are dropped.
    assert store_blobs(store) == set(digests(files).values())


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_umoci_modelcar_copied_by_skopeo(registry, store: Path, tmp_path: Path, compression: str) -> None:
    """A KServe-style modelcar built by umoci (files under /models) and pushed by skopeo pulls intact."""
    layout = tmp_path / "modelcar"
    files = {"models/model-00001-of-00002.safetensors": SHARDS[0],
             "models/model-00002-of-00002.safetensors": SHARDS[1],
             "models/config.json": CONFIG, "models/tokenizer/tokenizer.json": TOKENIZER}
    umoci_layer(layout, "v1", files=files, symlinks={"models/tokenizer.json": "tokenizer/tokenizer.json"})
    source = f"oci:{layout}:v1"
    if compression == "zstd":
        skopeo_copy(source, f"oci:{tmp_path / 'zstd'}:v1", "--dest-compress", "--dest-compress-format=zstd")
        source = f"oci:{tmp_path / 'zstd'}:v1"
    skopeo_copy(source, f"docker://{registry.host}/fmt/modelcar-{compression}:v1")
    pushed = skopeo_raw(f"docker://{registry.host}/fmt/modelcar-{compression}:v1")
    assert {layer["mediaType"] for layer in pushed["layers"]} == {
        f"application/vnd.oci.image.layer.v1.tar+{compression}"}
    view = pull(oci(registry, f"fmt/modelcar-{compression}:v1"), store)
    assert tree_digests(view) == {**digests(files), "models/tokenizer.json": "-> tokenizer/tokenizer.json"}
    assert (view / "models" / "tokenizer.json").read_bytes() == TOKENIZER


def test_umoci_whiteouts_delete_files_and_directories(registry, store: Path, tmp_path: Path) -> None:
    """Files and directories deleted in a later umoci layer (real .wh. entries) are gone from the view."""
    layout = tmp_path / "layout"
    umoci_layer(layout, "v1", files={"models/old.bin": b"old", "models/keep.bin": b"keep",
                                     "models/stale/a.bin": b"a", "models/stale/deep/b.bin": b"b"})
    umoci_layer(layout, "v1", files={"models/new.bin": b"new"}, remove=("models/old.bin", "models/stale"))
    _, manifest = layout_manifest(layout, "v1")
    upper = (layout / "blobs" / "sha256" / manifest["layers"][1]["digest"][7:]).read_bytes()
    names = {m.name for m in tarfile.open(fileobj=gzip.GzipFile(fileobj=io.BytesIO(upper)))}
    assert {"models/.wh.old.bin", "models/.wh.stale"} <= names  # umoci really wrote whiteouts
    skopeo_copy(f"oci:{layout}:v1", f"docker://{registry.host}/fmt/umoci-whiteout:v1")
    view = pull(oci(registry, "fmt/umoci-whiteout:v1"), store)
    assert tree_digests(view) == digests({"models/keep.bin": b"keep", "models/new.bin": b"new"})
    assert not (view / "models" / "stale").exists()


def test_docker_v2_schema2_manifest(registry, store: Path, tmp_path: Path) -> None:
    """skopeo --format v2s2 writes a Docker schema 2 manifest with Docker layer types; it pulls the same."""
    layout = tmp_path / "layout"
    files = {"models/model.safetensors": WEIGHTS, "models/config.json": CONFIG}
    umoci_layer(layout, "v1", files=files)
    skopeo_copy(f"oci:{layout}:v1", f"docker://{registry.host}/fmt/docker:v1", "--format", "v2s2")
    pushed = skopeo_raw(f"docker://{registry.host}/fmt/docker:v1")
    assert pushed["mediaType"] == DOCKER_MANIFEST
    assert {layer["mediaType"] for layer in pushed["layers"]} == {DOCKER_LAYER}
    assert tree_digests(pull(oci(registry, "fmt/docker:v1"), store)) == digests(files)


# -- indexes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("platforms", [
    [("linux", "arm64"), ("linux", "amd64")],
    [("linux", "amd64"), ("linux", "arm64")],
    [("windows", "amd64"), ("linux", "arm64"), ("linux", "amd64"), ("linux", "s390x")],
], ids=["amd64-last", "amd64-first", "amd64-among-others"])
def test_index_chooses_linux_amd64(registry, store: Path, platforms: list[tuple[str, str]]) -> None:
    """From a multi-platform OCI index the linux/amd64 image is pulled, wherever it is listed."""
    repo = "fmt/index-" + "-".join(f"{o}{a}" for o, a in platforms)
    entries = [push_platform_image(registry, repo, o, a) for o, a in platforms]
    registry.push_manifest(repo, "v1", {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries},
                           OCI_INDEX)
    view = pull(oci(registry, f"{repo}:v1"), store)
    assert tree_digests(view) == digests({"models/platform.txt": b"linux/amd64"})


def test_docker_manifest_list_chooses_linux_amd64(registry, store: Path) -> None:
    """A Docker manifest list of schema 2 images resolves to linux/amd64 too."""
    repo = "fmt/docker-list"
    entries = []
    for arch in ("arm64", "amd64"):
        config = registry.push_blob(repo, json.dumps({"architecture": arch, "os": "linux"}).encode())
        layer = registry.push_blob(repo, compress(make_tar([("models/arch.txt", arch.encode(), {})]), "gzip"))
        body = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                           "config": {"mediaType": DOCKER_CONFIG, **config},
                           "layers": [{"mediaType": DOCKER_LAYER, **layer}]}).encode()
        digest = registry.push_manifest(repo, arch, body, DOCKER_MANIFEST)
        entries.append({"mediaType": DOCKER_MANIFEST, "digest": digest, "size": len(body),
                        "platform": {"os": "linux", "architecture": arch}})
    registry.push_manifest(repo, "v1", {"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": entries},
                           DOCKER_LIST)
    assert tree_digests(pull(oci(registry, f"{repo}:v1"), store)) == digests({"models/arch.txt": b"amd64"})


@pytest.mark.parametrize("artifact_type", [MP_ARTIFACT, "application/vnd.cnai.model.manifest.v1+json"],
                         ids=["cncf", "cnai"])
def test_index_chooses_the_modelpack_artifact(registry, store: Path, artifact_type: str) -> None:
    """An index listing linux/amd64 and arm64 images and a ModelPack artifact resolves to the artifact."""
    repo = "fmt/index-artifact-" + artifact_type.split(".")[2]
    images = [push_platform_image(registry, repo, "linux", arch) for arch in ("amd64", "arm64")]
    files = {"model.safetensors": WEIGHTS, "config.json": CONFIG}
    digest = registry.push_image(repo, "artifact", modelpack(files), config=b"{}", config_type=MP_CONFIG,
                                 artifact_type=artifact_type)
    artifact = manifest_descriptor(registry, repo, digest, artifactType=artifact_type)
    registry.push_manifest(repo, "v1", {"schemaVersion": 2, "mediaType": OCI_INDEX,
                                        "manifests": [*images, artifact]}, OCI_INDEX)
    assert tree_digests(pull(oci(registry, f"{repo}:v1"), store)) == digests(files)
    [row] = ls(store)
    assert row["digest"] == digest  # the artifact's manifest is what was materialised


# -- ModelPack -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("media_type,key", [
    ("application/vnd.cncf.model.weight.v1.raw", "org.cncf.model.filepath"),
    ("application/vnd.cnai.model.weight.v1.raw", "org.cncf.model.filepath"),
    ("application/vnd.cnai.model.weight.v1.raw", "org.cnai.model.filepath"),
], ids=["cncf", "cnai-type", "cnai-type-and-key"])
def test_modelpack_raw_layers(registry, store: Path, media_type: str, key: str) -> None:
    """ModelPack .raw layers, in the cncf and the older cnai spellings, are files at their filepath."""
    repo = f"fmt/mp-raw-{media_type.split('.')[2]}-{key.split('.')[1]}"
    files = {"model-00001.safetensors": SHARDS[0], "shards/model-00002.safetensors": SHARDS[1],
             "config.json": CONFIG, "empty.txt": b""}
    registry.push_image(repo, "v1", modelpack(files, media_type, key), config=b"{}", config_type=MP_CONFIG,
                        artifact_type=MP_ARTIFACT)
    assert tree_digests(pull(oci(registry, f"{repo}:v1"), store)) == digests(files)
    # Raw layers are stored verbatim: the blobs are the layers themselves.
    assert store_blobs(store) == set(digests(files).values())


@pytest.mark.parametrize("kind", ["tar", "tar+gzip", "tar+zstd"])
def test_modelpack_tar_layers(registry, store: Path, kind: str) -> None:
    """ModelPack .tar / .tar+gzip / .tar+zstd layers are unpacked beside .raw files."""
    repo = "fmt/mp-" + kind.replace("+", "-")
    code = compress(make_tar([("code/", None, DIR), ("code/modeling.py", b"import torch\n", {}),
                              ("code/README.md", b"# model\n", {})]), kind.partition("+")[2] or "tar")
    layers = [*modelpack({"model.safetensors": WEIGHTS}),
              (code, f"application/vnd.cncf.model.code.v1.{kind}", None)]
    registry.push_image(repo, "v1", layers, config=b"{}", config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)
    assert tree_digests(pull(oci(registry, f"{repo}:v1"), store)) == digests(
        {"model.safetensors": WEIGHTS, "code/modeling.py": b"import torch\n", "code/README.md": b"# model\n"})


# -- ORAS ----------------------------------------------------------------------------------------------


def test_oras_files_keep_their_bytes_whatever_the_media_type(registry, store: Path) -> None:
    """ORAS-style titled layers are files stored verbatim, even when their media type says tar."""
    a_tarball = compress(make_tar([("inner.txt", b"not to be unpacked", {})]), "gzip")
    files = {"model.gguf": WEIGHTS, "cfg/config.json": CONFIG, "weights.tar.gz": a_tarball,
             "notes.bin": b"\x00\x01binary"}
    registry.push_image("fmt/oras-files", "v1", [
        (WEIGHTS, LAYER_TAR, {TITLE: "model.gguf"}),  # oras push's default file media type
        (CONFIG, "application/json", {TITLE: "cfg/config.json"}),
        (a_tarball, LAYER_GZIP, {TITLE: "weights.tar.gz"}),
        (b"\x00\x01binary", "application/vnd.example.anything", {TITLE: "notes.bin"}),
    ], config=b"{}", config_type="application/vnd.oras.config.v1+json")
    assert tree_digests(pull(oci(registry, "fmt/oras-files:v1"), store)) == digests(files)


def test_oras_directory_unpacks_under_its_title(registry, store: Path) -> None:
    """An ORAS directory (tar+gzip, unpack=true, entries named under the title) lands at title/..."""
    # As oras-go's tarDirectory writes it: the directory itself, then everything below, under its name.
    layer = compress(make_tar([("tokenizer", None, DIR), ("tokenizer/tokenizer.json", TOKENIZER, {}),
                               ("tokenizer/extra", None, DIR), ("tokenizer/extra/vocab.txt", b"a\nb\n", {})]),
                     "gzip")
    registry.push_image("fmt/oras-dir", "v1", [
        (layer, LAYER_GZIP, {TITLE: "tokenizer", ORAS_UNPACK: "true"}),
        (CONFIG, "application/json", {TITLE: "config.json"}),
    ], config=b"{}", config_type="application/vnd.oras.config.v1+json")
    assert tree_digests(pull(oci(registry, "fmt/oras-dir:v1"), store)) == digests(
        {"tokenizer/tokenizer.json": TOKENIZER, "tokenizer/extra/vocab.txt": b"a\nb\n", "config.json": CONFIG})


# -- trees: whiteouts, symlinks, hardlinks -----------------------------------------------------------


def test_whiteouts_across_layers(registry, store: Path) -> None:
    """.wh.NAME deletes a file or directory below it, .wh..wh..opq empties a directory; upper layers re-add."""
    base = [("a/old", b"old", {}), ("a/keep", b"keep", {}), ("b/x", b"x", {}), ("b/sub/y", b"y", {}),
            ("gone/deep/f", b"f", {}), ("top.txt", b"top", {}), ("c/f", b"c1", {})]
    middle = [("a/.wh.old", b"", {}), ("b/.wh..wh..opq", b"", {}), ("b/new", b"new", {}),
              (".wh.gone", b"", {}), (".wh.top.txt", b"", {}),
              ("c/f", b"c2", {}), ("c/.wh.f", b"", {})]  # a whiteout never hides its own layer's entry
    top = [("a/old", b"old again", {}), ("gone/back", b"back", {})]
    registry.push_image("fmt/whiteouts", "v1", [image_layer(base), image_layer(middle, "gzip"),
                                                image_layer(top, "zstd")])
    view = pull(oci(registry, "fmt/whiteouts:v1"), store)
    assert tree_digests(view) == digests({"a/keep": b"keep", "a/old": b"old again", "b/new": b"new",
                                          "gone/back": b"back", "c/f": b"c2"})
    assert not any(p.name.startswith(".wh.") for p in view.rglob("*"))


def test_symlinks_inside_the_tree_are_kept(registry, store: Path) -> None:
    """Relative, upward, directory and absolute (rewritten relative) symlinks are kept and resolve."""
    sym = tarfile.SYMTYPE
    layer = image_layer([("models/w.bin", WEIGHTS, {}), ("models/sub/cfg.json", CONFIG, {}),
                         ("models/latest", None, {"type": sym, "linkname": "w.bin"}),
                         ("models/sub/up", None, {"type": sym, "linkname": "../w.bin"}),
                         ("models/dir", None, {"type": sym, "linkname": "sub"}),
                         ("models/abs", None, {"type": sym, "linkname": "/models/sub/cfg.json"})], "gzip")
    registry.push_image("fmt/symlinks", "v1", [layer])
    view = pull(oci(registry, "fmt/symlinks:v1"), store)
    assert tree_digests(view) == {
        **digests({"models/w.bin": WEIGHTS, "models/sub/cfg.json": CONFIG}),
        "models/latest": "-> w.bin", "models/sub/up": "-> ../w.bin", "models/dir": "-> sub",
        "models/abs": "-> sub/cfg.json"}
    assert (view / "models" / "latest").read_bytes() == WEIGHTS
    assert (view / "models" / "sub" / "up").read_bytes() == WEIGHTS
    assert (view / "models" / "dir" / "cfg.json").read_bytes() == CONFIG
    assert (view / "models" / "abs").resolve().is_relative_to(view)


@pytest.mark.parametrize("kind", ["tar", "gzip", "zstd"])
def test_hardlinks_in_a_tar_layer(registry, store: Path, kind: str) -> None:
    """A hardlink in a layer becomes the same file: same bytes, one blob, one inode."""
    layer = image_layer([("models/a.safetensors", WEIGHTS, {}),
                         ("models/b.safetensors", None, {"type": tarfile.LNKTYPE,
                                                         "linkname": "models/a.safetensors"}),
                         ("copies/c.safetensors", None, {"type": tarfile.LNKTYPE,
                                                         "linkname": "./models/a.safetensors"})], kind)
    registry.push_image(f"fmt/hardlinks-{kind}", "v1", [layer])
    view = pull(oci(registry, f"fmt/hardlinks-{kind}:v1"), store)
    paths = ["models/a.safetensors", "models/b.safetensors", "copies/c.safetensors"]
    assert tree_digests(view) == {p: sha256(WEIGHTS) for p in paths}
    assert len({(view / p).stat().st_ino for p in paths}) == 1
    assert store_blobs(store) == {sha256(WEIGHTS)}


# -- selection and sharing ---------------------------------------------------------------------------

SELECTABLE = {"model-00001.safetensors": SHARDS[0], "model-00002.safetensors": SHARDS[1],
              "config.json": CONFIG, "tokenizer/tokenizer.json": TOKENIZER, "tokenizer/vocab.txt": b"a\nb\n"}


@pytest.mark.parametrize("flags,selected", [
    (["--include", "*.json"], ["config.json", "tokenizer/tokenizer.json"]),
    (["--include", "tokenizer/"], ["tokenizer/tokenizer.json", "tokenizer/vocab.txt"]),
    (["--exclude", "*.safetensors"], ["config.json", "tokenizer/tokenizer.json", "tokenizer/vocab.txt"]),
    (["--include", "*.json", "--exclude", "config.json"], ["tokenizer/tokenizer.json"]),
    (["--include", "model-00002*", "--include", "config.json"], ["model-00002.safetensors", "config.json"]),
], ids=["include-glob", "include-dir", "exclude", "include-and-exclude", "two-includes"])
def test_include_exclude_fetch_only_the_selected_files(registry, store: Path, flags: list[str],
                                                       selected: list[str]) -> None:
    """--include/--exclude choose the files; the raw layers left out are never fetched or stored."""
    push_modelpack(registry, "fmt/select", SELECTABLE)
    with FaultProxy(registry.host) as proxy:
        view = pull(oci(proxy, "fmt/select:v1"), store, *flags)
        served = {path: proxy.served(sha256(data)) for path, data in SELECTABLE.items()}
    assert tree_digests(view) == digests({p: SELECTABLE[p] for p in selected})
    assert served == {p: len(data) if p in selected else 0 for p, data in SELECTABLE.items()}
    assert store_blobs(store) == {sha256(SELECTABLE[p]) for p in selected}
    [row] = ls(store)
    assert row["files"] == len(selected) and row["filters"]


def test_include_exclude_on_image_layers(registry, store: Path) -> None:
    """Filters select files out of unpacked tar layers too (the layer itself has to be fetched)."""
    layer = image_layer([("models/w.safetensors", WEIGHTS, {}), ("models/config.json", CONFIG, {}),
                         ("models/tok/tokenizer.json", TOKENIZER, {})], "gzip")
    registry.push_image("fmt/select-image", "v1", [layer])
    view = pull(oci(registry, "fmt/select-image:v1"), store, "--exclude", "*.safetensors")
    assert tree_digests(view) == digests({"models/config.json": CONFIG, "models/tok/tokenizer.json": TOKENIZER})
    full = pull(oci(registry, "fmt/select-image:v1"), store)
    assert full != view and "models/w.safetensors" in tree_digests(full)


def test_a_file_shared_by_models_is_stored_once_and_fetched_once(registry, store: Path) -> None:
    """Identical files in three models (two ModelPack, one image layer) are one blob, one inode, one fetch."""
    shared = WEIGHTS
    push_modelpack(registry, "fmt/shared-a", {"model.safetensors": shared, "a.json": b'{"a": 1}'})
    push_modelpack(registry, "fmt/shared-b", {"weights/model.safetensors": shared, "b.json": b'{"b": 2}'})
    registry.push_image("fmt/shared-img", "v1", [image_layer([("models/model.safetensors", shared, {})], "zstd")])
    with FaultProxy(registry.host) as proxy:
        view_a = pull(oci(proxy, "fmt/shared-a:v1"), store)
        assert proxy.served(sha256(shared)) == len(shared)
        proxy.clear()
        view_b = pull(oci(proxy, "fmt/shared-b:v1"), store)
        assert proxy.served(sha256(shared)) == 0  # already in the store under its sha256
        assert proxy.served(sha256(b'{"b": 2}')) == len(b'{"b": 2}')
        view_img = pull(oci(proxy, "fmt/shared-img:v1"), store)
    copies = [view_a / "model.safetensors", view_b / "weights" / "model.safetensors",
              view_img / "models" / "model.safetensors", store / "blobs" / "sha256" / sha256(shared)[7:]]
    assert len({p.stat().st_ino for p in copies}) == 1
    assert copies[0].read_bytes() == shared
    assert store_blobs(store) == {sha256(shared), sha256(b'{"a": 1}'), sha256(b'{"b": 2}')}


# -- references --------------------------------------------------------------------------------------


def test_pull_by_digest(registry, store: Path) -> None:
    """oci://HOST/REPO@sha256:... pulls that manifest (or that index), and ls shows the digest reference."""
    files = {"model.safetensors": SHARDS[0], "config.json": CONFIG}
    digest = push_modelpack(registry, "fmt/by-digest", files)
    push_modelpack(registry, "fmt/by-digest", {"other.bin": b"the tag moved on"})  # v1 now names another
    view = pull(oci(registry, f"fmt/by-digest@{digest}"), store)
    assert tree_digests(view) == digests(files)
    amd = push_platform_image(registry, "fmt/by-digest", "linux", "amd64")
    arm = push_platform_image(registry, "fmt/by-digest", "linux", "arm64")
    index = registry.push_manifest("fmt/by-digest", "index", {"schemaVersion": 2, "mediaType": OCI_INDEX,
                                                              "manifests": [arm, amd]}, OCI_INDEX)
    view = pull(oci(registry, f"fmt/by-digest@{index}"), store)
    assert tree_digests(view) == digests({"models/platform.txt": b"linux/amd64"})
    assert {row["ref"] for row in ls(store)} == {oci(registry, f"fmt/by-digest@{d}") for d in (digest, index)}


@pytest.fixture(scope="module")
def umoci_layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """An OCI layout made by umoci: one image tagged v1, two layers, files under /models."""
    layout = tmp_path_factory.mktemp("umoci") / "layout"
    umoci_layer(layout, "v1", files={"models/model.safetensors": WEIGHTS, "models/old.txt": b"old"})
    umoci_layer(layout, "v1", files={"models/config.json": CONFIG}, remove=("models/old.txt",))
    return layout, {"models/model.safetensors": WEIGHTS, "models/config.json": CONFIG}


@pytest.mark.parametrize("form", ["oci-layout://{dir}:v1", "oci-layout://{dir}", "oci-layout://{dir}@{digest}",
                                  "{dir}:v1", "{dir}", "file://{dir}"])
def test_pull_from_a_umoci_layout(store: Path, umoci_layout, form: str) -> None:
    """An OCI layout made by umoci pulls by oci-layout:// and by plain path, with a tag, a digest or neither."""
    layout, files = umoci_layout
    digest, _ = layout_manifest(layout, "v1")
    view = pull(form.format(dir=layout, digest=digest), store)
    assert tree_digests(view) == digests(files)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_large_manifest_sent_with_or_without_content_length(store: Path, chunked: bool) -> None:
    """A legal 3 MiB manifest is read whole, also when a registry streams it chunked (no Content-Length)."""
    files = {"model.safetensors": SHARDS[0], "config.json": CONFIG}
    layers = [{"mediaType": MP_WEIGHT, "digest": sha256(data), "size": len(data),
               "annotations": {"org.cncf.model.filepath": path}} for path, data in files.items()]
    body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "artifactType": MP_ARTIFACT, "layers": layers,
                       "annotations": {"pad": "x" * (3 << 20)}}).encode()
    headers = {"Content-Type": "application/vnd.oci.image.manifest.v1+json", "Docker-Content-Digest": sha256(body)}
    with fake_registry({"fmt/big-manifest:v1": (body, headers)}, chunked=chunked,
                       blobs={sha256(data): data for data in files.values()}) as host:
        view = pull(f"oci://{host}/fmt/big-manifest:v1", store)
    assert tree_digests(view) == digests(files)


# -- ls and verify -----------------------------------------------------------------------------------


def test_ls_json(registry, store: Path) -> None:
    """ls --json lists each pulled ref with its manifest digest, size, file count, filters and view path."""
    files = {"model.safetensors": SHARDS[0], "config.json": CONFIG}
    digest = push_modelpack(registry, "fmt/ls", files)
    assert ls(store) == []
    full = pull(oci(registry, "fmt/ls:v1"), store)
    only = pull(oci(registry, "fmt/ls:v1"), store, "--include", "*.json")
    rows = {row["filters"]: row for row in ls(store)}
    assert set(rows) == {"", "inc=*.json;exc="}
    assert rows[""] | {"last_used": None} == {
        "ref": oci(registry, "fmt/ls:v1"), "filters": "", "digest": digest, "size": len(SHARDS[0]) + len(CONFIG),
        "files": 2, "last_used": None, "path": str(full), "pinned": False, "leases": 0}
    assert (rows["inc=*.json;exc="]["path"], rows["inc=*.json;exc="]["files"]) == (str(only), 1)
    assert rows[""]["last_used"].endswith("+00:00")


def test_verify_json_reports_a_corrupt_blob(registry, store: Path) -> None:
    """verify --json passes a clean store, reports a blob corrupted on disk (exit 5), and --delete lets a pull repair it."""
    files = {"model.safetensors": WEIGHTS, "config.json": CONFIG}
    push_modelpack(registry, "fmt/verify", files)
    view = pull(oci(registry, "fmt/verify:v1"), store)
    clean = run_cli("verify", "--json", store=store)
    assert clean.returncode == 0 and json.loads(clean.stdout) == {"checked": 2, "corrupt": []}
    blob = store / "blobs" / "sha256" / sha256(WEIGHTS)[7:]
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"\xde\xad")
    bad = run_cli("verify", "--json", store=store)
    assert bad.returncode == 5, bad.stderr
    [report] = json.loads(bad.stdout)["corrupt"]
    assert report["blob"] == sha256(WEIGHTS) and report["actual"] != sha256(WEIGHTS)
    assert report["views"] == ["sha256:" + view.name] and report["deleted"] is False
    deleted = run_cli("verify", "--json", "--delete", store=store)
    assert deleted.returncode == 5 and json.loads(deleted.stdout)["corrupt"][0]["deleted"] is True
    assert not blob.exists()
    repaired = pull(oci(registry, "fmt/verify:v1"), store)
    assert tree_digests(repaired) == digests(files)  # not the old view, whose file was the corrupt inode
    assert json.loads(run_cli("verify", "--json", store=store, check=True).stdout)["corrupt"] == []
