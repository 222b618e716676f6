"""Interoperability with oras-py, an ORAS client nobody here wrote.

What oras-py pushes, modelcache pulls into the tree oras-py's own pull makes;
what ``modelcache package --format modelpack`` pushes, oras-py pulls as files
at their paths. Both against the real registry.
"""

from __future__ import annotations

import os
from pathlib import Path

import oras.client
import pytest
from formats_support import pull
from support import run_cli, tree_digests


def _weights_dir(root: Path) -> Path:
    src = root / "src"
    (src / "tokenizer" / "extra").mkdir(parents=True)
    (src / "tokenizer" / "tokenizer.json").write_text('{"vocab": 3}\n')
    (src / "tokenizer" / "extra" / "merges.txt").write_text("a b\nc d\n")
    (src / "model.safetensors").write_bytes(os.urandom(300_000))
    (src / "config.json").write_text('{"hidden": 8}\n')
    return src


@pytest.fixture
def client(registry) -> oras.client.OrasClient:
    return oras.client.OrasClient(hostname=registry.host, insecure=True)


def test_a_directory_pushed_by_oras_py_pulls_as_oras_py_pulls_it(registry, client, store: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    src = _weights_dir(tmp_path)
    monkeypatch.chdir(src)  # oras-py pushes paths relative to the working directory
    client.push(files=["tokenizer", "model.safetensors", "config.json"], target=f"{registry.host}/oras/dir:v1")

    theirs = tmp_path / "theirs"
    client.pull(target=f"{registry.host}/oras/dir:v1", outdir=str(theirs))
    ours = pull(f"oci://{registry.host}/oras/dir:v1", store)

    expected = tree_digests(src)
    assert tree_digests(theirs) == expected  # what the ORAS client itself makes of it
    assert tree_digests(ours) == expected  # and so do we: tokenizer/ is a directory, not a gzip file


def test_a_tarball_pushed_by_oras_py_as_a_file_stays_a_file(registry, client, store: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A titled tar+gzip layer named like an archive is a file someone pushed, kept as it is."""
    import gzip

    (tmp_path / "weights.tar.gz").write_bytes(gzip.compress(b"not a tar at all", mtime=0))
    monkeypatch.chdir(tmp_path)
    client.push(files=["weights.tar.gz:application/vnd.oci.image.layer.v1.tar+gzip"],
                target=f"{registry.host}/oras/tarball:v1")
    expected = {"weights.tar.gz": tree_digests(tmp_path)["weights.tar.gz"]}
    assert tree_digests(pull(f"oci://{registry.host}/oras/tarball:v1", store)) == expected


def test_a_modelpack_pushed_by_modelcache_pulls_with_oras_py(registry, client, store: Path,
                                                            tmp_path: Path) -> None:
    src = _weights_dir(tmp_path)
    proc = run_cli("package", "-q", str(src), "--format", "modelpack",
                   "--to", f"oci://{registry.host}/mc/modelpack:v1", store=store)
    assert proc.returncode == 0, proc.stderr

    theirs = tmp_path / "theirs"
    client.pull(target=f"{registry.host}/mc/modelpack:v1", outdir=str(theirs))
    assert tree_digests(theirs) == tree_digests(src)
