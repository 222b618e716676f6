"""`modelcache package`: images that containerd mounts, skopeo and umoci read, and modelcache pulls back."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from containerd_support import Containerd
from support import run_cli, sha256, tree_digests

BIG = 3 << 20  # over --large-file below, so it gets a layer of its own


def _model(root: Path) -> dict[str, str]:
    (root / "tokenizer").mkdir(parents=True)
    (root / "model-00001-of-00002.safetensors").write_bytes(os.urandom(BIG))
    (root / "model-00002-of-00002.safetensors").write_bytes(os.urandom(BIG + 5))
    (root / "config.json").write_text('{"architectures": ["Test"]}')
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    (root / ("a" * 120)).write_bytes(b"long name")  # needs a PAX header
    return tree_digests(root)


def _package(store: Path, src: Path | str, to: str, *extra: str, check: bool = True):
    proc = run_cli("package", str(src), "--to", to, "--large-file", "1M", "--upload-chunk", "1M", *extra,
                   store=store, check=check)
    return proc


def _get(registry, path: str, accept: str = "*/*") -> bytes:
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(registry.url(path), headers={"Accept": accept})) as resp:
        return resp.read()


def _pull(store: Path, ref: str) -> Path:
    return Path(run_cli("pull", ref, store=store, check=True).stdout.split()[-1])


def test_image_round_trip_through_containerd_skopeo_umoci(registry, tmp_path: Path) -> None:
    """The pushed image mounts in containerd, copies with skopeo, unpacks with umoci, pulls back: same tree."""
    expected = _model(tmp_path / "src")
    ref = f"{registry.host}/pkg/image:v1"
    _package(tmp_path / "store", tmp_path / "src", f"oci://{ref}")

    with Containerd(tmp_path / "ctd") as ctd:
        assert tree_digests(ctd.mount(ref, tmp_path / "mnt")) == expected

    index = json.loads(subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
                                      check=True, capture_output=True).stdout)
    assert {(m["platform"]["os"], m["platform"]["architecture"]) for m in index["manifests"]} == {
        ("linux", "amd64"), ("linux", "arm64")}
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{tmp_path / 'copy'}:v1"],
                   check=True, capture_output=True)
    subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{tmp_path / 'copy'}:v1", str(tmp_path / "bundle")],
                   check=True, capture_output=True)
    assert tree_digests(tmp_path / "bundle" / "rootfs") == expected
    assert tree_digests(_pull(tmp_path / "pulled", f"oci://{ref}")) == expected


def test_single_file_layers_are_annotated_with_their_file(registry, tmp_path: Path) -> None:
    """Large files get their own layer whose annotations say where the file's bytes are."""
    _model(tmp_path / "src")
    ref = f"{registry.host}/pkg/annotated:v1"
    _package(tmp_path / "store", tmp_path / "src", f"oci://{ref}", "--prefix", "models")
    # Read the registry directly: skopeo copy would recompress the layers and drop their annotations.
    index = json.loads(_get(registry, "/v2/pkg/annotated/manifests/v1", "application/vnd.oci.image.index.v1+json"))
    manifest = json.loads(_get(registry, f"/v2/pkg/annotated/manifests/{index['manifests'][0]['digest']}",
                               "application/vnd.oci.image.manifest.v1+json"))
    singles = [layer for layer in manifest["layers"] if "io.modelcache.file.digest" in layer.get("annotations", {})]
    assert len(singles) == 2
    for layer in singles:
        notes = layer["annotations"]
        data = _get(registry, f"/v2/pkg/annotated/blobs/{layer['digest']}")
        offset, size = int(notes["io.modelcache.file.offset"]), int(notes["io.modelcache.file.size"])
        assert sha256(data[offset:offset + size]) == notes["io.modelcache.file.digest"]
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            assert tar.getnames() == [notes["io.modelcache.file.path"]]
            assert notes["io.modelcache.file.path"].startswith("models/")
    config = json.loads(_get(registry, f"/v2/pkg/annotated/blobs/{manifest['config']['digest']}"))
    assert config["rootfs"]["diff_ids"] == [layer["digest"] for layer in manifest["layers"]]


def test_reproducible_and_incremental(registry, tmp_path: Path) -> None:
    """Same files, same digest; one changed file uploads only its layer plus small documents."""
    _model(tmp_path / "src")
    ref = f"oci://{registry.host}/pkg/repro:v1"
    first = _package(tmp_path / "store", tmp_path / "src", ref).stdout.split()[-1]
    again = _package(tmp_path / "store2", tmp_path / "src", ref)
    assert again.stdout.split()[-1] == first
    assert "uploaded 0 B (0 blobs)" in again.stderr
    (tmp_path / "src" / "model-00002-of-00002.safetensors").write_bytes(os.urandom(BIG + 5))
    changed = _package(tmp_path / "store", tmp_path / "src", ref)
    assert changed.stdout.split()[-1] != first
    assert "(3 blobs)" in changed.stderr  # the changed layer and the two platform configs
    uploaded = changed.stderr.split("uploaded ")[1].split(" (")[0]
    assert uploaded.endswith("MiB") and float(uploaded.split()[0]) < 3.1


def test_cross_repository_mount(registry, tmp_path: Path) -> None:
    """Blobs already pushed to another repository of the registry are mounted, not sent."""
    _model(tmp_path / "src")
    _package(tmp_path / "store", tmp_path / "src", f"oci://{registry.host}/pkg/first:v1")
    second = _package(tmp_path / "store", tmp_path / "src", f"oci://{registry.host}/pkg/second:v1")
    assert "uploaded 0 B (0 blobs), 5 mounted" in second.stderr  # 3 layers, 2 platform configs
    assert tree_digests(_pull(tmp_path / "pulled", f"oci://{registry.host}/pkg/second:v1")) == \
        tree_digests(tmp_path / "src")


def test_layout_target_and_modelpack_format(tmp_path: Path) -> None:
    """A ModelPack artifact into a layout dir: skopeo reads it, modelcache pulls the same files."""
    expected = _model(tmp_path / "src")
    layout = tmp_path / "layout"
    digest = _package(tmp_path / "store", tmp_path / "src", f"{layout}:v1", "--format", "modelpack").stdout.split()[-1]
    raw = json.loads(subprocess.run(["skopeo", "inspect", "--raw", f"oci:{layout}:v1"], check=True,
                                    capture_output=True).stdout)
    assert raw["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"
    assert raw["config"]["mediaType"] == "application/vnd.cncf.model.config.v1+json"
    types = {layer["annotations"]["org.cncf.model.filepath"]: layer["mediaType"] for layer in raw["layers"]}
    assert types["model-00001-of-00002.safetensors"] == "application/vnd.cncf.model.weight.v1.raw"
    assert types["config.json"] == "application/vnd.cncf.model.weight.config.v1.raw"
    pulled = _pull(tmp_path / "pulled", f"oci-layout://{layout}@{digest}")
    assert tree_digests(pulled) == expected
    # The raw layers are the files' own bytes: a pull of the image format next to it reuses them all.
    image = _package(tmp_path / "store", tmp_path / "src", f"{layout}:image")
    assert image.returncode == 0


def test_package_a_pulled_reference(registry, tmp_path: Path) -> None:
    """The source may be a reference: it is pulled into the store, then packaged from there."""
    expected = _model(tmp_path / "src")
    _package(tmp_path / "store", tmp_path / "src", f"{tmp_path / 'layout'}:v1", "--format", "modelpack")
    _package(tmp_path / "store", f"oci-layout://{tmp_path / 'layout'}:v1", f"oci://{registry.host}/pkg/converted:v1")
    assert tree_digests(_pull(tmp_path / "pulled", f"oci://{registry.host}/pkg/converted:v1")) == expected


@pytest.mark.parametrize("case", ["empty", "symlink-out", "unreadable", "bad-target"])
def test_bad_input_is_refused_cleanly(registry, tmp_path: Path, case: str) -> None:
    """Empty dirs, links out, unreadable files and bad targets: one line, non-zero, no tag written."""
    src = tmp_path / "src"
    src.mkdir()
    to = f"oci://{registry.host}/pkg/bad-{case}:v1"
    if case == "symlink-out":
        (src / "w.bin").write_bytes(b"x")
        (src / "passwd").symlink_to("/etc/passwd")
    elif case == "unreadable":
        (src / "w.bin").write_bytes(b"x")
        os.chmod(src, 0o700)
        (src / "secret").write_bytes(b"x")
        os.chmod(src / "secret", 0)
        if os.access(src / "secret", os.R_OK):  # root reads anything: use a FIFO, which is not a file
            (src / "secret").unlink()
            os.mkfifo(src / "secret")
    elif case == "bad-target":
        (src / "w.bin").write_bytes(b"x")
        to = "s3://bucket/prefix"
    proc = _package(tmp_path / "store", src, to, check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("modelcache: error:") and "Traceback" not in proc.stderr
    tags = subprocess.run(["skopeo", "list-tags", "--tls-verify=false", f"docker://{registry.host}/pkg/bad-{case}"],
                          capture_output=True, text=True)
    assert tags.returncode != 0 or json.loads(tags.stdout)["Tags"] == []


def test_file_changing_during_packaging_is_refused(tmp_path: Path) -> None:
    """A file whose size or mtime moves between listing and reading fails the package."""
    from modelcache.errors import InvalidContent
    from modelcache.package.image import plan_image
    from modelcache.package.layers import hash_layer, scan

    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"x" * 1000)
    [layer] = plan_image(scan(src))
    (src / "w.bin").write_bytes(b"y" * 1001)
    with pytest.raises(InvalidContent, match="changed while being packaged"):
        hash_layer(layer)


def test_s3_target_holds_a_layout(s3_server, tmp_path: Path) -> None:
    """An S3 prefix receives an OCI layout (index.json last) that skopeo and modelcache read back."""
    expected = _model(tmp_path / "src")
    s3 = s3_server.client()
    s3.create_bucket(Bucket="packages")
    proc = run_cli("package", str(tmp_path / "src"), "--to", "s3://packages/team/llama:v1", "--large-file", "1M",
                   store=tmp_path / "store", env=s3_server.env(), check=True)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="packages", Prefix="team/llama/")["Contents"]}
    assert {"team/llama/oci-layout", "team/llama/index.json"} <= keys
    local = tmp_path / "downloaded"
    for key in keys:
        dest = local / key.removeprefix("team/llama/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file("packages", key, str(dest))
    index = json.loads((local / "index.json").read_text())
    assert index["manifests"][0]["digest"] == proc.stdout.split()[-1]
    subprocess.run(["skopeo", "inspect", f"oci:{local}:v1"], check=True, capture_output=True)
    assert tree_digests(_pull(tmp_path / "pulled", f"oci-layout://{local}:v1")) == expected
    again = run_cli("package", str(tmp_path / "src"), "--to", "s3://packages/team/llama:v1", "--large-file", "1M",
                    store=tmp_path / "store", env=s3_server.env(), check=True)
    assert "uploaded 0 B (0 blobs)" in again.stderr


def test_registry_refusing_pushes(tmp_path: Path) -> None:
    """A read-only registry refuses the push: one clear line, non-zero exit, nothing tagged."""
    from conftest import start_registry, stop

    _model(tmp_path / "src")
    proc, host = start_registry(tmp_path / "ro", extra_config="")
    stop(proc)
    config = (tmp_path / "ro" / "config.yml").read_text().replace(
        "  delete:\n    enabled: true\n", "  delete:\n    enabled: true\n  maintenance:\n    readonly:\n      enabled: true\n")
    (tmp_path / "ro" / "config.yml").write_text(config)
    ro = subprocess.Popen(["docker-registry", "serve", str(tmp_path / "ro" / "config.yml")],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from conftest import wait_http

        wait_http(f"http://{host}/v2/")
        failed = _package(tmp_path / "store", tmp_path / "src", f"oci://{host}/pkg/ro:v1", check=False)
        assert failed.returncode != 0
        last = failed.stderr.strip().splitlines()[-1]
        assert last.startswith("modelcache: error:") and "Traceback" not in failed.stderr
        assert "POST: unexpected HTTP 405" in last, last
        tags = subprocess.run(["skopeo", "list-tags", "--tls-verify=false", f"docker://{host}/pkg/ro"],
                              capture_output=True, text=True)
        assert tags.returncode != 0 or json.loads(tags.stdout)["Tags"] == []
    finally:
        stop(ro)


@pytest.mark.parametrize("method,fault", [("PATCH", "503"), ("PATCH", "reset"), ("PUT", "503"), ("PUT", "reset")])
def test_push_survives_upload_failures(registry, tmp_path: Path, method: str, fault: str) -> None:
    """A chunk PATCH or a whole-blob PUT answered 503, or cut off (a PATCH after the registry
    kept part of it): the push goes on (from what the registry holds, or with a fresh session)
    and the image is whole."""
    from faultproxy import FaultProxy, http_error, reset_after

    _model(tmp_path / "src")
    with FaultProxy(registry.host) as proxy:
        for _ in range(2):  # two different blobs' first upload requests
            proxy.inject_upload(http_error(503) if fault == "503" else reset_after(300_000), method=method)
        ref = f"oci://{proxy.host}/pkg/faulty:v1"
        proc = _package(tmp_path / "store", tmp_path / "src", ref, check=False)
        assert proc.returncode == 0, proc.stderr
        assert proxy.pending_faults() == 0 and not proxy._upload_faults
        faulted = [e for e in proxy.uploads() if e.fault is not None]
        assert len(faulted) == 2 and {e.method for e in faulted} == {method}, faulted
        sent = sum(e.bytes for e in proxy.uploads())
    total = sum(p.stat().st_size for p in (tmp_path / "src").rglob("*") if p.is_file())
    # Each failure costs at most one chunk (1 MiB) again, never a whole layer.
    assert sent <= total + 2 * (1 << 20) + (64 << 10), (sent, total)
    assert tree_digests(_pull(tmp_path / "pulled", f"oci://{registry.host}/pkg/faulty:v1")) == \
        tree_digests(tmp_path / "src")
