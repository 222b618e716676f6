"""Space: declared sizes are claims (nothing preallocated, absurd ones refused), unpacked size is bounded,
ENOSPC is a clear error that keeps the ingest, and open files stay few however many blobs a model has.

The disk-filling cases run on a loop-mounted ext4 of 200 MiB that the test makes, never the root disk.
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from formats_support import REF_NAME, hand_layout
from support import MP_ARTIFACT, MP_CONFIG, MP_WEIGHT, OCI_MANIFEST, run_cli, sha256, tree_digests

from modelcache.errors import InvalidContent
from modelcache.model import Archive, Blob, Compression
from modelcache.store import Store

MIB = 1 << 20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 200 MiB ext4 mounted on a loop device under tmp_path; always unmounted."""
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4"):
        pytest.skip("needs root and mkfs.ext4 for a loop-mounted filesystem")
    image, mount = tmp_path / "fs.img", tmp_path / "mnt"
    with open(image, "wb") as f:
        f.truncate(200 * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    mount.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True, capture_output=True)
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _layout(root: Path, weights: list[tuple[bytes, int]]) -> str:
    """An OCI layout of a ModelPack artifact whose weight layers declare the given sizes."""
    layers = [{"mediaType": MP_WEIGHT, "digest": sha256(data), "size": size,
               "annotations": {"org.cncf.model.filepath": f"w{i}.bin"}} for i, (data, size) in enumerate(weights)]
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": MP_ARTIFACT,
                           "config": {"mediaType": MP_CONFIG, "digest": sha256(b"{}"), "size": 2},
                           "layers": layers}).encode()
    hand_layout(root, [(manifest, {"annotations": {REF_NAME: "v1"}})], (b"{}", *(d for d, _ in weights)))
    return f"oci-layout://{root}:v1"


def _one_error_line(proc) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("modelcache: error: ")]
    return line


@pytest.mark.parametrize("size", [10 ** 30, 2 ** 64, 10 ** 12])
def test_absurd_declared_sizes_are_refused(tmp_path: Path, small_fs: Path, size: int) -> None:
    """A layer declaring more than the store's filesystem holds is refused (exit 5), not a traceback."""
    ref = _layout(tmp_path / "layout", [(b"tiny", size)])
    proc = run_cli("pull", "-q", ref, store=small_fs / "store")
    assert proc.returncode == 5, proc.stderr
    assert f"declares {size} bytes" in _one_error_line(proc)
    assert not any((small_fs / "store" / "ingest").iterdir())


def test_lying_sizes_take_no_space(tmp_path: Path, small_fs: Path) -> None:
    """Two layers declaring 150 MiB each but holding a few bytes: nothing is preallocated, so the
    filesystem keeps its space after the failure and the next pull is not starved."""
    ref = _layout(tmp_path / "layout", [(b"short-a", 150 * MIB), (b"short-b", 150 * MIB)])
    free = shutil.disk_usage(small_fs).free
    proc = run_cli("pull", "-q", "--retries", "0", ref, store=small_fs / "store")
    assert proc.returncode != 0 and "No space" not in proc.stderr, proc.stderr
    assert free - shutil.disk_usage(small_fs).free < 8 * MIB


def _sparse_model(root: Path, files: dict[str, int]) -> Path:
    """Files of the given sizes that take no disk: a distinct head, then a hole."""
    root.mkdir(parents=True)
    for name, size in files.items():
        with open(root / name, "wb") as f:
            f.write(name.encode() * 64)
            f.truncate(size)
    return root


def test_enospc_midway_is_clear_and_resumable(tmp_path: Path, small_fs: Path) -> None:
    """The disk fills during a pull: exit 7 naming the store and the bytes needed; the ingest stays;
    after gc frees room, the next pull fetches only what never arrived."""
    store = small_fs / "store"
    first = _sparse_model(tmp_path / "first", {"a.bin": 120 * MIB})
    second = _sparse_model(tmp_path / "second", {"b.bin": 100 * MIB})
    run_cli("pull", "-q", "--chunk-size", "4M", str(first), store=store, check=True)
    proc = run_cli("pull", "-q", "--chunk-size", "4M", str(second), store=store)
    assert proc.returncode == 7, proc.stderr
    line = _one_error_line(proc)
    assert f"store {store}" in line and "more bytes needed" in line and "resumes" in line
    [ingest] = [p for p in (store / "ingest").iterdir() if p.is_dir()]
    record = (ingest / "chunks").read_bytes()
    durable = record[24:].count(1) * 4 * MIB
    assert 0 < durable < 100 * MIB
    # What is not durable was given back: the data file holds the durable chunks and no more.
    assert os.stat(ingest / "data").st_blocks * 512 <= durable + MIB
    s = Store(store)
    assert s.index.leases() == [] and s.index.reserved() == 0  # the failed pull holds nothing any more
    s.close()
    run_cli("gc", "--max-size", "0", store=store, check=True)
    again = run_cli("pull", "--chunk-size", "4M", str(second), store=store, check=True)
    summary = [x for x in again.stderr.splitlines() if "reused" in x][-1]
    assert "reused 0 B" not in summary and "reused 0.0" not in summary, summary
    view = Path(again.stdout.split()[-1])
    assert tree_digests(view) == tree_digests(second)


def test_unpacked_size_is_bounded(tmp_path: Path) -> None:
    """A small zstd layer whose tar claims a 3 GiB file is refused before a byte of it is written."""
    raw = io.BytesIO()
    header = tarfile.TarInfo("bomb.bin")
    header.size = 3 << 30
    raw.write(header.tobuf(format=tarfile.PAX_FORMAT))
    raw.write(bytes(1 << 20))  # the first MiB of zeros; the rest never needs to exist
    layer = zstandard.ZstdCompressor().compress(raw.getvalue())
    assert len(layer) < 96 << 10
    store = Store(tmp_path / "s")
    digest, size = store.content.write_stream(io.BytesIO(layer))
    with pytest.raises(InvalidContent, match="add up to more than"):
        store.unpack(Archive(Blob(digest, size), Compression.ZSTD))
    assert not [p for p in store.content.ingest_dir.iterdir() if p.name.startswith("tmp-")]
    assert store.disk_usage() == size  # only the layer itself


def _few_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def test_many_files_pull_with_few_descriptors(tmp_path: Path) -> None:
    """A model of 3,000 tiny files pulls under `ulimit -n 256`: open files follow the concurrency."""
    src = tmp_path / "many"
    for i in range(3000):
        d = src / f"d{i // 100:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:04d}.txt").write_bytes(b"%d\n" % i)
    proc = subprocess.run([sys.executable, "-m", "modelcache", "--store", str(tmp_path / "s"), "pull", "-q",
                           str(src)], capture_output=True, text=True, timeout=300, preexec_fn=_few_descriptors)
    assert proc.returncode == 0, proc.stderr[-2000:]
    view = Path(proc.stdout.split()[-1])
    assert sum(1 for p in view.rglob("*.txt")) == 3000 and (view / "d29" / "f2999.txt").read_bytes() == b"2999\n"
