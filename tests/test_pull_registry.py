"""Pulling from the real registry: ModelPack raw layers, pushed by skopeo from a layout."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from support import (
    LAYER_TAR,
    MP_ARTIFACT,
    MP_CONFIG,
    MP_WEIGHT,
    make_tar,
    run_cli,
    sha256,
    tree_digests,
    write_random,
)


def test_pull_modelpack_pushed_by_direct_api(registry, store: Path, tmp_path: Path) -> None:
    files = {"model-1.safetensors": 3 << 20, "sub/model-2.safetensors": 5 << 20 | 7, "config.json": 40}
    layers = []
    expected = {}
    for n, (name, size) in enumerate(files.items()):
        write_random(tmp_path / "src" / name, size, seed=n)
        data = (tmp_path / "src" / name).read_bytes()
        expected[name] = sha256(data)
        layers.append((data, MP_WEIGHT, {"org.cncf.model.filepath": name}))
    registry.push_image("mp/basic", "v1", layers, config=b'{"descriptor":{}}', config_type=MP_CONFIG,
                        artifact_type=MP_ARTIFACT)
    proc = run_cli("pull", "--chunk-size", "1M", f"oci://{registry.host}/mp/basic:v1", store=store, check=True)
    view = Path(proc.stdout.strip().splitlines()[-1])
    assert view.is_absolute() and view.is_dir()
    assert tree_digests(view) == expected
    # read-only: files 0444, directories 0555
    assert all(not os.stat(p).st_mode & 0o222 for p in view.rglob("*"))
    assert not os.stat(view).st_mode & 0o222


def test_pull_layout_copied_by_skopeo(registry, store: Path, tmp_path: Path) -> None:
    demo = run_cli("demo", "--size", "8M", "--files", "2", "--dir", str(tmp_path / "demo"),
                   store=tmp_path / "demo-store", check=True)
    local_view = Path(demo.stdout.strip().splitlines()[-1])
    subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{tmp_path / 'demo' / 'layout'}:demo",
                    f"docker://{registry.host}/mp/skopeo:v1"], check=True, capture_output=True)
    proc = run_cli("pull", f"oci://{registry.host}/mp/skopeo:v1", store=store, check=True)
    view = Path(proc.stdout.strip().splitlines()[-1])
    assert tree_digests(view) == tree_digests(local_view)
    shutil.rmtree(tmp_path / "demo")


def _single_file_layer(name: str, data: bytes) -> tuple[bytes, dict[str, str]]:
    """An uncompressed one-file tar layer and the io.modelcache.file.* annotations for it."""
    import io
    import tarfile

    layer = make_tar([(name, data, {"mode": 0o444})])
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        offset = tar.getmember(name).offset_data
    return layer, {"io.modelcache.file.path": name, "io.modelcache.file.digest": sha256(data),
                   "io.modelcache.file.size": str(len(data)), "io.modelcache.file.offset": str(offset)}


def test_single_file_tar_layer_is_read_by_range(registry, store: Path, tmp_path: Path) -> None:
    """An annotated one-file tar layer is fetched as the file's byte range, not the whole layer."""
    write_random(tmp_path / "w.bin", 3 << 20, seed=7)
    data = (tmp_path / "w.bin").read_bytes()
    layer, notes = _single_file_layer("models/w.bin", data)
    small = make_tar([("models/config.json", b'{"a": 1}', {})])
    registry.push_image("img/annotated", "v1", [(layer, LAYER_TAR, notes), (small, LAYER_TAR, None)])
    proc = run_cli("pull", "--chunk-size", "1M", f"oci://{registry.host}/img/annotated:v1", store=store,
                   check=True)
    view = Path(proc.stdout.strip().splitlines()[-1])
    assert tree_digests(view) == {"models/w.bin": sha256(data), "models/config.json": sha256(b'{"a": 1}')}
    # The file's blob is named by the file's own digest, so other sources dedup against it.
    assert (store / "blobs" / "sha256" / sha256(data)[7:]).is_file()
    assert not (store / "blobs" / "sha256" / sha256(layer)[7:]).exists()


def test_single_file_tar_layer_with_wrong_offset_is_refused(registry, store: Path) -> None:
    """A lying offset annotation yields bytes whose sha256 differs: refused, nothing kept."""
    data = bytes(range(256)) * 4096
    layer, notes = _single_file_layer("w.bin", data)
    notes["io.modelcache.file.offset"] = str(int(notes["io.modelcache.file.offset"]) - 512)
    registry.push_image("img/lying", "v1", [(layer, LAYER_TAR, notes)])
    proc = run_cli("pull", f"oci://{registry.host}/img/lying:v1", store=store)
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr.startswith("modelcache: error:") and "Traceback" not in proc.stderr
    assert not (store / "views").exists() or not any((store / "views").iterdir())


def test_empty_file_layer(registry, store: Path) -> None:
    """A zero-byte raw layer becomes an empty file (no range request for nothing)."""
    registry.push_image("mp/empty", "v1", [(b"", MP_WEIGHT, {"org.cncf.model.filepath": "empty.bin"}),
                                           (b"x", MP_WEIGHT, {"org.cncf.model.filepath": "x.bin"})],
                        config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)
    proc = run_cli("pull", f"oci://{registry.host}/mp/empty:v1", store=store, check=True)
    view = Path(proc.stdout.strip().splitlines()[-1])
    assert tree_digests(view) == {"empty.bin": sha256(b""), "x.bin": sha256(b"x")}
