"""Pulling from the real registry: ModelPack raw layers, pushed by skopeo from a layout."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from support import MP_ARTIFACT, MP_CONFIG, MP_WEIGHT, run_cli, sha256, tree_digests, write_random


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
