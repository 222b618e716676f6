"""What `modelcache pull` reads from a real registry: image layers, indexes, manifests of every kind.

Images are made by umoci and skopeo, or written byte by byte from the OCI
specs through the distribution API (tests/support.py), never by modelcache.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard
from support import (
    LAYER_GZIP,
    LAYER_TAR,
    LAYER_ZSTD,
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

WEIGHTS = os.urandom(300_000)
CONFIG = b'{"model_type": "test"}'


def _pull(registry, repo: str, store: Path, *extra: str) -> Path:
    proc = run_cli("pull", "--chunk-size", "64K", *extra, f"oci://{registry.host}/{repo}", store=store)
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip().splitlines()[-1])


def _layer(kind: str, entries) -> tuple[bytes, str]:
    raw = make_tar(entries)
    if kind == "gzip":
        return gzip.compress(raw, mtime=0), LAYER_GZIP
    if kind == "zstd":
        return zstandard.ZstdCompressor().compress(raw), LAYER_ZSTD
    return raw, LAYER_TAR


@pytest.mark.parametrize("kind", ["tar", "gzip", "zstd"])
def test_image_layers_are_unpacked(registry, store: Path, kind: str) -> None:
    """A modelcar-style image: plain, gzip and zstd tar layers unpack to the same tree."""
    data, media_type = _layer(kind, [("models/", None, {"type": tarfile.DIRTYPE}),
                                     ("models/model.safetensors", WEIGHTS, {}),
                                     ("models/config.json", CONFIG, {})])
    registry.push_image(f"layers/{kind}", "v1", [(data, media_type, None)])
    view = _pull(registry, f"layers/{kind}:v1", store)
    assert tree_digests(view) == {"models/model.safetensors": sha256(WEIGHTS), "models/config.json": sha256(CONFIG)}


def test_whiteouts_symlinks_and_hardlinks(registry, store: Path) -> None:
    """Upper layers delete (.wh.), hide whole dirs (.wh..wh..opq); links inside the tree are kept."""
    lower = make_tar([("a/old.bin", b"old", {}), ("a/keep.bin", b"keep", {}), ("b/x", b"x", {}),
                      ("b/y", b"y", {})])
    upper = make_tar([("a/.wh.old.bin", b"", {}), ("b/.wh..wh..opq", b"", {}), ("b/z", b"z", {}),
                      ("c/data", b"data", {}),
                      ("c/hard", None, {"type": tarfile.LNKTYPE, "linkname": "c/data"}),
                      ("c/soft", None, {"type": tarfile.SYMTYPE, "linkname": "data"}),
                      ("c/abs", None, {"type": tarfile.SYMTYPE, "linkname": "/a/keep.bin"})])
    registry.push_image("layers/overlay", "v1", [(lower, LAYER_TAR, None), (upper, LAYER_TAR, None)])
    view = _pull(registry, "layers/overlay:v1", store)
    assert tree_digests(view) == {
        "a/keep.bin": sha256(b"keep"), "b/z": sha256(b"z"), "c/data": sha256(b"data"),
        "c/hard": sha256(b"data"), "c/soft": "-> data", "c/abs": "-> ../a/keep.bin"}
    assert (view / "c" / "abs").read_bytes() == b"keep"  # the rewritten link resolves inside the view


def test_umoci_modelcar_image_via_skopeo(registry, store: Path, tmp_path: Path) -> None:
    """An image built by umoci (gzip layers, its own config) and copied by skopeo pulls intact."""
    layout = tmp_path / "layout"
    subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:v1"], check=True)
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{layout}:v1", str(bundle)], check=True,
                   capture_output=True)
    (bundle / "rootfs" / "models" / "tok").mkdir(parents=True)
    (bundle / "rootfs" / "models" / "model.safetensors").write_bytes(WEIGHTS)
    (bundle / "rootfs" / "models" / "tok" / "tokenizer.json").write_bytes(CONFIG)
    subprocess.run(["umoci", "repack", "--image", f"{layout}:v1", str(bundle)], check=True, capture_output=True)
    subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:v1",
                    f"docker://{registry.host}/layers/umoci:v1"], check=True, capture_output=True)
    expected = {"models/model.safetensors": sha256(WEIGHTS), "models/tok/tokenizer.json": sha256(CONFIG)}
    assert tree_digests(_pull(registry, "layers/umoci:v1", store)) == expected
    # The same image straight from umoci's layout, as a path with :TAG and as oci-layout://.
    for ref in (f"{layout}:v1", f"oci-layout://{layout}:v1"):
        proc = run_cli("pull", ref, store=tmp_path / "store2", check=True)
        assert tree_digests(Path(proc.stdout.split()[-1])) == expected


def test_docker_schema2_manifest(registry, store: Path, tmp_path: Path) -> None:
    """skopeo --format v2s2 writes a Docker manifest with gzip layers; it pulls the same."""
    layout = tmp_path / "layout"
    subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:v1"], check=True)
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.bin").write_bytes(WEIGHTS)
    subprocess.run(["umoci", "insert", "--image", f"{layout}:v1", str(src / "model.bin"), "/models/model.bin"],
                   check=True, capture_output=True)
    subprocess.run(["skopeo", "copy", "--format", "v2s2", "--dest-tls-verify=false", f"oci:{layout}:v1",
                    f"docker://{registry.host}/layers/docker:v1"], check=True, capture_output=True)
    inspect = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                              f"docker://{registry.host}/layers/docker:v1"], check=True, capture_output=True)
    assert json.loads(inspect.stdout)["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert tree_digests(_pull(registry, "layers/docker:v1", store)) == {"models/model.bin": sha256(WEIGHTS)}


def _push_platform_image(registry, repo: str, arch: str, payload: bytes) -> dict:
    config = json.dumps({"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}})
    layer = make_tar([("models/arch.txt", payload, {})])
    digest = registry.push_image(repo, f"only-{arch}", [(layer, LAYER_TAR, None)], config=config.encode())
    size = len(registry_get(registry, f"/v2/{repo}/manifests/{digest}"))
    return {"mediaType": OCI_MANIFEST, "digest": digest, "size": size,
            "platform": {"os": "linux", "architecture": arch}}


def registry_get(registry, path: str) -> bytes:
    import urllib.request

    req = urllib.request.Request(registry.url(path), headers={"Accept": OCI_MANIFEST})
    with urllib.request.urlopen(req) as resp:
        return resp.read()


def test_index_chooses_linux_amd64(registry, store: Path) -> None:
    """From a multi-platform index the linux/amd64 image is pulled, whatever the order."""
    arm = _push_platform_image(registry, "layers/multi", "arm64", b"arm64")
    amd = _push_platform_image(registry, "layers/multi", "amd64", b"amd64")
    registry.push_manifest("layers/multi", "v1", {"schemaVersion": 2, "mediaType": OCI_INDEX,
                                                  "manifests": [arm, amd]}, OCI_INDEX)
    view = _pull(registry, "layers/multi:v1", store)
    assert (view / "models" / "arch.txt").read_bytes() == b"amd64"


def test_index_prefers_the_modelpack_artifact(registry, store: Path) -> None:
    """An index listing an image and a ModelPack artifact resolves to the artifact."""
    amd = _push_platform_image(registry, "layers/both", "amd64", b"image")
    digest = registry.push_image("layers/both", "artifact", [(WEIGHTS, MP_WEIGHT,
                                 {"org.cncf.model.filepath": "model.safetensors"})],
                                 config=b"{}", config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)
    artifact = {"mediaType": OCI_MANIFEST, "digest": digest, "artifactType": MP_ARTIFACT,
                "size": len(registry_get(registry, f"/v2/layers/both/manifests/{digest}"))}
    registry.push_manifest("layers/both", "v1", {"schemaVersion": 2, "mediaType": OCI_INDEX,
                                                 "manifests": [amd, artifact]}, OCI_INDEX)
    assert tree_digests(_pull(registry, "layers/both:v1", store)) == {"model.safetensors": sha256(WEIGHTS)}


@pytest.mark.parametrize("media_type,key", [
    ("application/vnd.cncf.model.weight.v1.raw", "org.cncf.model.filepath"),
    ("application/vnd.cnai.model.weight.v1.raw", "org.cnai.model.filepath"),
])
def test_modelpack_raw_spellings_and_pull_by_digest(registry, store: Path, media_type: str, key: str) -> None:
    """Both ModelPack spellings place raw layers at their filepath; a digest reference works."""
    repo = "layers/mp-" + media_type.split(".")[2]
    digest = registry.push_image(repo, "v1", [(WEIGHTS, media_type, {key: "dir/model.safetensors"}),
                                              (CONFIG, media_type, {key: "config.json"})],
                                 config=b"{}", config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)
    view = _pull(registry, f"{repo}@{digest}", store)
    assert tree_digests(view) == {"dir/model.safetensors": sha256(WEIGHTS), "config.json": sha256(CONFIG)}


def test_modelpack_tar_layer_and_oras_files(registry, store: Path) -> None:
    """A ModelPack .tar layer unpacks; ORAS titled files and an ORAS directory land by title."""
    mp_tar = make_tar([("docs/README.md", b"# readme", {})])
    oras_dir = gzip.compress(make_tar([("a.txt", b"a", {}), ("sub/b.txt", b"b", {})]), mtime=0)
    registry.push_image("layers/mixed", "v1", [
        (mp_tar, "application/vnd.cncf.model.doc.v1.tar", None),
        (WEIGHTS, "application/vnd.oci.image.layer.v1.tar", {"org.opencontainers.image.title": "model.gguf"}),
        (CONFIG, "application/json", {"org.opencontainers.image.title": "cfg/config.json"}),
        (oras_dir, LAYER_GZIP, {"org.opencontainers.image.title": "extras",
                                "io.deis.oras.content.unpack": "true"}),
    ])
    assert tree_digests(_pull(registry, "layers/mixed:v1", store)) == {
        "docs/README.md": sha256(b"# readme"), "model.gguf": sha256(WEIGHTS), "cfg/config.json": sha256(CONFIG),
        "extras/a.txt": sha256(b"a"), "extras/sub/b.txt": sha256(b"b")}


def test_include_exclude_fetch_only_selected_raw_files(registry, store: Path) -> None:
    """--include/--exclude pick files; raw layers that are not picked are never fetched."""
    big = os.urandom(200_000)
    registry.push_image("layers/select", "v1", [
        (big, MP_WEIGHT, {"org.cncf.model.filepath": "model.safetensors"}),
        (CONFIG, MP_WEIGHT, {"org.cncf.model.filepath": "config.json"}),
        (b"tok", MP_WEIGHT, {"org.cncf.model.filepath": "tokenizer/tokenizer.json"})],
        config=b"{}", config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)
    view = _pull(registry, "layers/select:v1", store, "--include", "*.json", "--exclude", "config.json")
    assert tree_digests(view) == {"tokenizer/tokenizer.json": sha256(b"tok")}
    assert not (store / "blobs" / "sha256" / sha256(big)[7:]).exists()
    dirview = _pull(registry, "layers/select:v1", store, "--include", "tokenizer/")
    assert dirview == view
    listed = json.loads(run_cli("ls", "--json", store=store, check=True).stdout)
    assert {r["files"] for r in listed} == {1}


def test_ls_and_verify_report_the_store(registry, store: Path) -> None:
    """ls lists the model; verify passes, then catches a blob corrupted on disk (exit 5)."""
    registry.push_image("layers/verify", "v1", [(WEIGHTS, MP_WEIGHT, {"org.cncf.model.filepath": "w.bin"})],
                        config=b"{}", config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)
    _pull(registry, "layers/verify:v1", store)
    [row] = json.loads(run_cli("ls", "--json", store=store, check=True).stdout)
    assert row["ref"] == f"oci://{registry.host}/layers/verify:v1" and row["size"] == len(WEIGHTS)
    assert row["files"] == 1 and row["digest"].startswith("sha256:")
    ok = json.loads(run_cli("verify", "--json", store=store, check=True).stdout)
    assert ok == {"checked": 1, "corrupt": []}
    blob = store / "blobs" / "sha256" / sha256(WEIGHTS)[7:]
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.write(b"\0")
    bad = run_cli("verify", "--json", store=store)
    assert bad.returncode == 5
    assert json.loads(bad.stdout)["corrupt"][0]["blob"] == sha256(WEIGHTS)
