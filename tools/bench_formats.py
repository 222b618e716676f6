#!/usr/bin/env python3
"""Benchmark: ``modelcache pull`` of the same weights in every layer format, vs containerd and skopeo.

One command::

    python tools/bench_formats.py                  # 2 GiB in 8 files, 3 runs, every format
    python tools/bench_formats.py --quick          # 256 MiB in 4 files, 2 runs
    python tools/bench_formats.py --formats gzip,zstd --size 0.5 --files 4

The weights are shaped like real ones (issue 13): normally distributed
float32 values truncated to bf16, which gzip takes to about 0.8 of their
size, so the inflate cost is real (random bytes would be stored, not
compressed, and hide it). The same files are pushed, to a docker-registry
started on loopback, as:

- ``modelpack``: ``modelcache package --format modelpack`` (raw layers);
- ``image``: ``modelcache package`` (our tar layers, with file annotations);
- ``gzip``: one layer per file made by ``umoci insert`` (tar+gzip);
- ``tar``: that image decompressed by ``skopeo copy --dest-decompress``;
- ``zstd``: that image recompressed by ``skopeo copy --dest-compress-format zstd``.

Each image made by another tool is uploaded byte for byte (skopeo's own push
would compress plain tar layers again). Then, per format, alternating cold
runs (an empty target each time, ``sync`` included) of:

- ours: ``modelcache pull`` into an empty store;
- ``skopeo copy docker://… oci:DIR`` (fetch only);
- ``ctr image pull --plain-http`` on a private containerd (fetch and unpack
  into a snapshot: the peer that leaves usable files, as we do; needs root);
- the ceiling, each resource alone on the same bytes: parallel GETs of the
  layer blobs to /dev/null, 8 parallel dd writers with fsync of the files'
  bytes, sha256 of the pulled files on every core, and for compressed
  layers the inflate: the layers inflated alone, in parallel on every core,
  with the fastest inflater installed (``isal`` else zlib; ``zstandard``).

It prints medians, GB/s (of the files' bytes) and per format the ratios
ours / ceiling, containerd time / ours and skopeo time / ours, and checks
that our pull gave every file byte-exact. Then, per format, the CPU our pull
and the registry used, and the least CPU any pull of those layers costs here
(:func:`unavoidable`): the largest fraction of the ceiling any pull could
reach on this machine's cores.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(TOOLS.parent / "tests"))
from benchlib import (  # noqa: E402
    PYTHON_ENV,
    GiB,
    MiB,
    Timing,
    ceiling_disk_write,
    ceiling_http_get,
    process_cpu,
    record,
    report,
    rmtree,
    run_timed,
    start_registry,
)

FORMATS = ("modelpack", "image", "tar", "gzip", "gzip6", "zstd")
MADE_BY = {"modelpack": "modelcache package --format modelpack", "image": "modelcache package",
           "tar": "umoci, skopeo --dest-decompress", "gzip": "umoci insert",
           "gzip6": "the tar layers through gzip -6, the default level docker build and buildkit push with",
           "zstd": "umoci, skopeo --dest-compress-format zstd"}
_BLOCK = 4 * MiB  # bytes of weights made and written at a time (never a whole file in memory)


# -- weights like real ones --------------------------------------------------------------------

def make_bf16_weights(directory: Path, total: int, files: int, *, seed: int = 0) -> list[Path]:
    """``files`` files of bf16-like values summing to ``total`` bytes, streamed to disk.

    numpy when installed (normal float32, top 16 bits kept); else the same
    distribution from the standard library (:func:`_bf16_stdlib`).
    """
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import numpy as np

        rng = np.random.default_rng(seed)

        def block(n: int) -> bytes:
            values = rng.standard_normal(n // 2, dtype=np.float32)
            return (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    except ImportError:
        rnd = random.Random(seed)

        def block(n: int) -> bytes:
            return _bf16_stdlib(n // 2, rnd)

    per = total // files // 2 * 2
    paths = []
    for n in range(files):
        path = directory / f"model-{n + 1:05d}-of-{files:05d}.safetensors"
        if not path.exists() or path.stat().st_size != per:
            with open(path, "wb") as f:
                left = per
                while left:
                    data = block(min(left, _BLOCK))
                    f.write(data)
                    left -= len(data)
        paths.append(path)
    return paths


def _exponent_table() -> list[int]:
    """128 float32 exponents (biased) whose frequencies follow |N(0, 1)|, to 1/128."""
    cdf, table = 0.0, []
    for e in range(255):
        low, high = (2.0 ** (e - 127) if e else 0.0), 2.0 ** (e - 126)
        cdf += math.erf(high / math.sqrt(2)) - math.erf(low / math.sqrt(2))
        while len(table) < 128 and (len(table) + 0.5) / 128 <= cdf:
            table.append(e)
    return table + [127] * (128 - len(table))


_EXP = _exponent_table()
# A random byte u: its top bit is the sign, its low 7 bits pick an exponent from _EXP.
_HIGH = bytes(((u >> 7) << 7) | (_EXP[u & 127] >> 1) for u in range(256))  # sign, exponent's top 7 bits
_LOW_BIT = bytes((_EXP[u & 127] & 1) << 7 for u in range(256))  # the exponent's last bit
_MANTISSA = bytes(u & 127 for u in range(256))


def _bf16_stdlib(count: int, rnd: random.Random) -> bytes:
    """``count`` little-endian bf16 values of N(0, 1) without numpy, at C speed (bytes.translate).

    The exponent follows the normal distribution; the 7 mantissa bits are
    uniform (the real ones are nearly so), which is what makes bf16 weights
    compress to about 0.8 with ``gzip -6`` (umoci's gzip, faster, leaves them near 0.99).
    """
    pick = rnd.randbytes(count)
    low = (int.from_bytes(pick.translate(_LOW_BIT), "little")
           | int.from_bytes(rnd.randbytes(count).translate(_MANTISSA), "little")).to_bytes(count, "little")
    out = bytearray(2 * count)
    out[0::2] = low
    out[1::2] = pick.translate(_HIGH)
    return bytes(out)


# -- images, made by us or by umoci and skopeo ----------------------------------------------------

@dataclass
class Image:
    """One format's image in the registry, and where its layer blobs lie on this disk."""

    fmt: str
    repo: str
    layers: list[str]  # layer digests
    local: dict[str, Path]  # digest -> a file with its bytes (compressed layers: for the inflate ceiling)
    media_types: list[str]


def _run(*cmd: str, env: dict | None = None) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc.stdout


def _push(host: str, repo: str, manifest: bytes, media_type: str, blob: Callable[[str], Path],
          digests: Sequence[str]) -> None:
    """Upload blobs (monolithic PUT, streamed from disk) and the manifest, byte for byte."""
    base = f"http://{host}/v2/{repo}"
    for digest in digests:
        try:
            urllib.request.urlopen(urllib.request.Request(f"{base}/blobs/{digest}", method="HEAD"), timeout=60)
            continue
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise
        with urllib.request.urlopen(urllib.request.Request(f"{base}/blobs/uploads/", data=b"", method="POST"),
                                    timeout=60) as resp:
            location = resp.headers["Location"]
        location = location if location.startswith("http") else f"http://{host}{location}"
        path = blob(digest)
        with open(path, "rb") as body:
            req = urllib.request.Request(f"{location}{'&' if '?' in location else '?'}digest={digest}", data=body,
                                         method="PUT", headers={"Content-Type": "application/octet-stream",
                                                                "Content-Length": str(path.stat().st_size)})
            urllib.request.urlopen(req, timeout=600).close()
    req = urllib.request.Request(f"{base}/manifests/v1", data=manifest, method="PUT",
                                 headers={"Content-Type": media_type})
    urllib.request.urlopen(req, timeout=60).close()


def _push_layout(host: str, repo: str, layout: Path) -> None:
    """Push the one image of an OCI layout."""
    index = json.loads((layout / "index.json").read_text())
    desc = index["manifests"][0]
    blob = lambda d: layout / "blobs" / "sha256" / d.partition(":")[2]  # noqa: E731
    manifest = blob(desc["digest"]).read_bytes()
    doc = json.loads(manifest)
    _push(host, repo, manifest, desc["mediaType"], blob,
          [doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])])


def _push_dir(host: str, repo: str, directory: Path) -> None:
    """Push an image saved by skopeo's ``dir:`` transport (blobs named by their hex digest)."""
    manifest = (directory / "manifest.json").read_bytes()
    doc = json.loads(manifest)
    media_type = doc.get("mediaType", "application/vnd.oci.image.manifest.v1+json")  # optional in OCI
    _push(host, repo, manifest, media_type, lambda d: directory / d.partition(":")[2],
          [doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])])


def _gzip_dir(source: Path, target: Path) -> Path:
    """A copy of a ``dir:`` image whose layers are gzip -6 (the default level) of the source's tar layers.

    umoci's gzip barely compresses bf16 weights (0.99 of their size), so its layers cost little to
    inflate; this is the image most registries hold, and the one where the inflate is the work.
    """
    rmtree(target)
    target.mkdir(parents=True)
    doc = json.loads((source / "manifest.json").read_text())
    for layer in doc["layers"]:
        packed = target / "layer.tmp"
        with open(source / layer["digest"].partition(":")[2], "rb") as raw, open(packed, "wb") as out:
            subprocess.run(["gzip", "-6", "-n", "-c"], stdin=raw, stdout=out, check=True)
        h = hashlib.sha256()
        with open(packed, "rb") as f:
            while block := f.read(8 * MiB):
                h.update(block)
        layer.update(digest="sha256:" + h.hexdigest(), size=packed.stat().st_size,
                     mediaType="application/vnd.oci.image.layer.v1.tar+gzip")
        packed.rename(target / h.hexdigest())
    config = doc["config"]["digest"].partition(":")[2]
    (target / config).write_bytes((source / config).read_bytes())  # diff_ids name the tars: unchanged
    doc["mediaType"] = "application/vnd.oci.image.manifest.v1+json"
    (target / "manifest.json").write_text(json.dumps(doc))
    return target


def build_images(weights: Sequence[Path], work: Path, host: str, formats: Sequence[str]) -> dict[str, Image]:
    """Push the weights in each format; return the images."""
    made: dict[str, Path] = {}  # where each format's blobs lie here
    src = weights[0].parent
    for fmt in ("modelpack", "image"):
        if fmt in formats:
            _run(sys.executable, "-m", "modelcache", "--store", str(work / "packer"), "package", "-q", str(src),
                 "--format", fmt, "--to", f"oci://{host}/bench/{fmt}:v1", env=PYTHON_ENV)
    if {"gzip", "gzip6", "tar", "zstd"} & set(formats):
        gz = made["gzip"] = work / "umoci"
        rmtree(gz)
        _run("umoci", "init", "--layout", str(gz))
        _run("umoci", "new", "--image", f"{gz}:v1")
        for path in weights:  # one layer per file, as a Dockerfile's COPY of each would make
            _run("umoci", "insert", "--image", f"{gz}:v1", str(path), f"/models/{path.name}")
        if "gzip" in formats:
            _push_layout(host, "bench/gzip", gz)
        if {"tar", "gzip6"} & set(formats):
            made["tar"] = work / "skopeo-tar"
            rmtree(made["tar"])
            _run("skopeo", "copy", "--dest-decompress", f"oci:{gz}:v1", f"dir:{made['tar']}")
            if "tar" in formats:
                _push_dir(host, "bench/tar", made["tar"])
            if "gzip6" in formats:
                made["gzip6"] = _gzip_dir(made["tar"], work / "gzip6")
                _push_dir(host, "bench/gzip6", made["gzip6"])
        if "zstd" in formats:
            made["zstd"] = work / "skopeo-zstd"
            rmtree(made["zstd"])
            _run("skopeo", "copy", "--dest-compress", "--dest-compress-format", "zstd", f"oci:{gz}:v1",
                 f"oci:{made['zstd']}:v1")
            _push_layout(host, "bench/zstd", made["zstd"])
    images = {}
    for fmt in formats:
        doc = _manifest(host, f"bench/{fmt}", "v1")
        digests = [layer["digest"] for layer in doc["layers"]]
        where = made.get(fmt)
        local = {}
        if where is not None:
            for d in digests:
                flat, nested = where / d.partition(":")[2], where / "blobs" / "sha256" / d.partition(":")[2]
                local[d] = flat if flat.exists() else nested
        images[fmt] = Image(fmt, f"bench/{fmt}", digests, local, [layer["mediaType"] for layer in doc["layers"]])
    return images


def _manifest(host: str, repo: str, reference: str) -> dict:
    """The image manifest of a tag; through an index (ours is multi-platform), this machine's platform's."""
    accept = ("application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, "
              "application/vnd.docker.distribution.manifest.v2+json")
    with urllib.request.urlopen(urllib.request.Request(f"http://{host}/v2/{repo}/manifests/{reference}",
                                                       headers={"Accept": accept}), timeout=60) as resp:
        doc = json.loads(resp.read())
    if "manifests" not in doc:
        return doc
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    chosen = next((m for m in doc["manifests"] if m.get("platform", {}).get("architecture") == arch),
                  doc["manifests"][0])
    return _manifest(host, repo, chosen["digest"])


# -- containerd, the peer that unpacks ----------------------------------------------------------

class Containerd:
    """A private containerd (own root, state and socket; CRI off), as tests/containerd_support.py starts it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "containerd.sock"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.root / "root"}"\nstate = "{self.root / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.socket}"\n'
            f'[ttrpc]\n  address = "{self.root / "ttrpc.sock"}"\n'
            f'[debug]\n  address = "{self.root / "debug.sock"}"\n'
            '[metrics]\n  address = ""\n')
        self.process = subprocess.Popen(["containerd", "--config", str(config)],
                                        stdout=open(self.root / "containerd.log", "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not (self.socket.exists() and self.ctr("version").returncode == 0):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit("containerd did not start:\n" + (self.root / "containerd.log").read_text()[-2000:])
            time.sleep(0.1)

    def ctr(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ctr", "--address", str(self.socket), *args], capture_output=True, text=True,
                              timeout=600)

    def pull_command(self, ref: str) -> list[str]:
        return ["ctr", "--address", str(self.socket), "image", "pull", "--plain-http", ref]

    def forget(self, ref: str) -> None:
        """Make the next pull cold: the image, then (garbage collected at once) its content and snapshots."""
        self.ctr("image", "rm", "--sync", ref)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        subprocess.run(["umount", "-R", "-l", str(self.root / "root")], capture_output=True, check=False)
        rmtree(self.root)


# -- the ceilings -------------------------------------------------------------------------------

def inflater(media_type: str) -> tuple[str, Callable[[], object]]:
    """(name, a factory of decompress objects) for a layer media type: the fastest installed."""
    if media_type.endswith("+zstd"):
        import zstandard

        # Across frames: a layer may be several (as a gzip layer may be several members).
        return "zstandard", lambda: zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)
    try:
        from isal import isal_zlib

        return "isal", lambda: isal_zlib.decompressobj(16 + isal_zlib.MAX_WBITS)
    except ImportError:
        import zlib

        return "zlib", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)


def ceiling_inflate(paths: Sequence[Path], make: Callable[[], object], *,
                    cpu: list[float] | None = None) -> tuple[float, int]:
    """Seconds to inflate the layers alone (output dropped), one per thread on every core; bytes out.
    The CPU seconds it took go to ``cpu``.

    zlib, isal and zstandard all release the GIL while they inflate.
    """
    def one(path: Path) -> int:
        d: Any = make()
        n = 0
        with open(path, "rb") as f:
            while block := f.read(MiB):
                while block:
                    n += len(d.decompress(block))
                    # A gzip member ends before the layer does (RFC 1952 2.2): the next one starts afresh.
                    block = d.unused_data if d.eof else b""
                    if block:
                        d = make()
        return n

    for path in paths:  # from page cache, as the network ceiling reads from the registry's
        with open(path, "rb") as f:
            while f.read(8 * MiB):
                pass
    started, spent = time.perf_counter(), time.process_time()
    with concurrent.futures.ThreadPoolExecutor(min(len(paths), _cores())) as pool:
        out = sum(pool.map(one, paths))
    if cpu is not None:
        cpu.append(time.process_time() - spent)
    return time.perf_counter() - started, out


def sha256_files(paths: Sequence[Path], *, cpu: list[float] | None = None) -> tuple[float, dict[str, str]]:
    """Seconds to sha256 the files on every core, and name -> digest (to check the pull byte-exact); the CPU
    seconds it took go to ``cpu``.

    The files are read into the page cache before the clock starts: a pull writes them past the
    cache (O_DIRECT), and a hash timed over disk reads would be a second disk ceiling, not this one.
    """
    for path in paths:
        with open(path, "rb") as f:
            while f.read(8 * MiB):
                pass

    def one(path: Path) -> tuple[str, str]:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(8 * MiB):
                h.update(block)
        return path.name, h.hexdigest()

    started, spent = time.perf_counter(), time.process_time()
    with concurrent.futures.ThreadPoolExecutor(_cores()) as pool:
        found = dict(pool.map(one, paths))
    if cpu is not None:
        cpu.append(time.process_time() - spent)
    return time.perf_counter() - started, found


def _cores() -> int:
    """The cores this process may run on (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# -- one format, side by side -------------------------------------------------------------------

def _timed_or_none(cmd: Sequence[str], note: list[str], name: str) -> tuple[float, int] | None:
    """A peer's run; a peer that cannot pull this format is reported, not fatal."""
    try:
        seconds, rss, _ = run_timed(cmd)
        return seconds, rss
    except SystemExit as e:
        note.append(f"{name} failed: {str(e).strip().splitlines()[-1][:200]}")
        return None


def compare(image: Image, *, host: str, work: Path, total: int, expected: dict[str, str], runs: int,
            containerd: Containerd | None, concurrency: int, chunk_size: str, registry_pid: int,
            warm: int = 0) -> None:
    """Alternate cold runs of ours, the peers and the ceilings on one format; print and record the ratios.

    With ``warm``, then that many warm hits (the model already in the store), beside the interpreter alone.
    """
    ref = f"{host}/{image.repo}:v1"
    ours = Timing("modelcache pull")
    skopeo, ctr = Timing("skopeo copy"), Timing("containerd (ctr image pull)")
    ceilings = {"net": Timing("ceiling: parallel GET to /dev/null"), "disk": Timing("ceiling: 8 parallel dd + fsync"),
                "sha": Timing("ceiling: sha256 (hashlib, all cores)")}
    compressed = [image.local[d] for d, t in zip(image.layers, image.media_types, strict=True)
                  if t.endswith(("+gzip", "+zstd")) and d in image.local]
    if compressed:
        name, make = inflater(image.media_types[0])
        ceilings["inflate"] = Timing(f"ceiling: inflate ({name}, all cores)")
    urls = [f"http://{host}/v2/{image.repo}/blobs/{d}" for d in image.layers]
    notes: list[str] = []
    store = work / "store"
    pull = [sys.executable, "-m", "modelcache", "--store", str(store), "pull", "-q", "--concurrency",
            str(concurrency), "--chunk-size", chunk_size, f"oci://{ref}"]
    # CPU seconds of each of our runs, the registry's during them, and each ceiling's sha256 and inflate
    cpu: dict[str, list[float]] = {"ours": [], "registry": [], "sha": [], "inflate": []}
    for run in range(runs):
        rmtree(store)
        before = process_cpu(registry_pid)
        seconds, rss, out = run_timed(pull, cpu=cpu["ours"])
        cpu["registry"].append(process_cpu(registry_pid) - before)
        _await_unlinks(store)
        ours.seconds.append(seconds)
        ours.rss.append(rss)
        view = Path(out.strip().splitlines()[-1])
        files = sorted(p for p in view.rglob("*") if p.is_file())
        rmtree(work / "skopeo")
        got = _timed_or_none(["skopeo", "copy", "--src-tls-verify=false", "--dest-oci-accept-uncompressed-layers",
                              f"docker://{ref}", f"oci:{work / 'skopeo'}:v1"], notes, "skopeo")
        if got:
            skopeo.seconds.append(got[0])
            skopeo.rss.append(got[1])
        if containerd is not None:
            containerd.forget(ref)
            got = _timed_or_none(containerd.pull_command(ref), notes, "containerd")
            if got:
                ctr.seconds.append(got[0])
                ctr.rss.append(got[1])
            containerd.forget(ref)
        ceilings["net"].seconds.append(ceiling_http_get(urls))
        ceilings["disk"].seconds.append(ceiling_disk_write(work, total))
        seconds, digests = sha256_files(files, cpu=cpu["sha"])
        ceilings["sha"].seconds.append(seconds)
        if digests != expected:
            raise SystemExit(f"{image.fmt}: the pulled files differ from the weights: {sorted(digests)[:4]}")
        if compressed:
            seconds, inflated = ceiling_inflate(compressed, make, cpu=cpu["inflate"])
            ceilings["inflate"].seconds.append(seconds)
            if len(compressed) == len(image.layers) and inflated < total:
                raise SystemExit(f"{image.fmt}: the layers inflated to {inflated} bytes, less than the files")
        print(f"{image.fmt} run {run + 1}: ours {ours.seconds[-1]:.2f}s"
              + (f", skopeo {skopeo.seconds[-1]:.2f}s" if len(skopeo.seconds) == run + 1 else "")
              + (f", containerd {ctr.seconds[-1]:.2f}s" if len(ctr.seconds) == run + 1 else "")
              + "".join(f", {k} {t.seconds[-1]:.2f}s" for k, t in ceilings.items()), flush=True)
    rmtree(work / "skopeo")
    peers = [t for t in (ctr, skopeo) if len(t.seconds) == runs]
    kinds = sorted(set(image.media_types))
    report(f"{image.fmt} layers ({MADE_BY[image.fmt]}; {len(image.layers)} layers)", total, ours, peers, ceilings)
    print(f"  layer media types: {', '.join(kinds)}; every file byte-exact")
    cpu_bound(total, ours.median, statistics.median(cpu["ours"]), statistics.median(cpu["registry"]))
    packed = sum(path.stat().st_size for path in compressed)
    if compressed:  # how much inflating there is to do: umoci's gzip leaves bf16 weights near their size
        print(f"  compressed layers: {packed / total:.3f} of the files' bytes")
    unavoidable(image.fmt, total, packed, ceilings, {k: statistics.median(v) for k, v in cpu.items() if v})
    for note in dict.fromkeys(notes):
        print(f"  note: {note}")
    if containerd is None:
        print("  note: containerd not measured (needs root for its snapshots)")
    if warm:
        warm_hits(image.fmt, pull, work, warm)
    rmtree(store)
    sys.stdout.flush()


def _await_unlinks(store: Path) -> None:
    """Until the layers our pull dropped are unlinked: the command returns before the last of them are
    (a detached rm), and their discards would otherwise overlap the next contender's run. Not timed: a
    user's next command does not wait for them either."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and any("-gone-" in p.name for p in (store / "ingest").iterdir()):
        time.sleep(0.02)
    os.sync()


def cpu_bound(total: int, seconds: float, ours: float, registry: float) -> None:
    """Print the CPU a pull used, ours and the registry's, and the fastest pull that CPU allows here.

    The ceilings above each measure one resource alone on every core; a pull needs them all at once, and
    on a small machine it shares its cores with the registry. So the CPU it cannot do without (per GiB:
    each sha256 pass, the inflate, the registry's serving) bounds it before any of them: a pull using
    ``ours + registry`` CPU seconds takes at least that over the cores, however well it overlaps its work.
    """
    cores = _cores()
    floor = (ours + registry) / cores
    gib = total / GiB
    print(f"  CPU per GiB (medians): ours {ours / gib:.2f} s, the registry {registry / gib:.2f} s; on {cores} "
          f"cores that CPU alone takes {floor:.2f} s ({total / 1e9 / floor:.2f} GB/s): ours / CPU floor "
          f"{floor / seconds:.2f}")
    record("cpu", bytes=total, seconds=seconds, ours_cpu=ours, registry_cpu=registry, cores=cores)


def unavoidable(fmt: str, total: int, packed: int, ceilings: dict[str, Timing], cpu: dict[str, float]) -> None:
    """Print the least CPU a pull of these layers costs on this machine, and the most of the ceiling it leaves.

    A pull checks each layer against its digest over the layer's bytes, and stores each file under its own
    sha256. Our layers hold one file each, whose digest is the layer's: one sha256 pass over the files'
    bytes. A layer made by another tool is a tar of files: a pass over the tar (over its compressed bytes
    if it is compressed, and then it is inflated too) and another over the files. The ceilings above
    measured the CPU seconds of one sha256 pass and of the inflate here; the registry needs what it spent
    serving our pulls. (The bench's images are all compressed or all not; a mix would need both passes.)
    Over every core, that CPU is a time no such pull can beat however well it overlaps its work, and so
    the largest fraction of the ceiling any pull can reach here.
    """
    cores = _cores()
    tar_pass = 0.0 if fmt in ("image", "modelpack") else (packed / total if packed else 1.0)  # per file byte
    sha = cpu["sha"] * (1.0 + tar_pass)
    inflate = cpu.get("inflate", 0.0)
    registry = cpu["registry"]
    floor = (sha + inflate + registry) / cores
    ceiling = max(t.median for t in ceilings.values())
    parts = f"sha256 x{1.0 + tar_pass:.2f} passes {sha:.2f} s" + (f", inflate {inflate:.2f} s" if inflate else "")
    print(f"  the least CPU such a pull costs here: {parts}, the registry's serving {registry:.2f} s; on {cores} "
          f"cores at least {floor:.2f} s: at most {min(1.0, ceiling / floor):.2f} of the ceiling")
    record("unavoidable", format=fmt, bytes=total, sha_cpu=sha, inflate_cpu=inflate, registry_cpu=registry,
           cores=cores, floor=floor, ceiling=ceiling)


def warm_hits(fmt: str, pull: Sequence[str], work: Path, runs: int) -> None:
    """Time ``pull`` with its model already in the store (resolve at the origin, find it all present),
    alternating with the bare interpreter, which no Python command can beat."""
    hit, bare = Timing("modelcache pull, warm hit"), Timing("python -c pass")
    for _ in range(runs):
        hit.seconds.append(run_timed(pull, sync=False)[0])
        bare.seconds.append(run_timed([sys.executable, "-c", "pass"], sync=False)[0])
    print(f"  warm hit (model in the store): median {1000 * hit.median:.0f} ms of {runs}; "
          f"the interpreter alone (python -c pass): {1000 * bare.median:.0f} ms")
    record("startup", title=f"warm hit, {fmt} layers", runs=runs, warm=hit.median, interpreter=bare.median)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=float, default=None, help="total GiB (default 2; --quick 0.25)")
    parser.add_argument("--files", type=int, default=None, help="files, one layer each (default 8; --quick 4)")
    parser.add_argument("--runs", type=int, default=None, help="cold runs per contender (default 3; --quick 2)")
    parser.add_argument("--quick", action="store_true", help="a small model and fewer runs, for a first look")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma separated (default {','.join(FORMATS)})")
    parser.add_argument("--warm", type=int, default=0, metavar="N",
                        help="after each format's cold runs, time N warm hits (the model already in the store)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--chunk-size", default="16M")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir on /var/tmp")
    args = parser.parse_args()
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if unknown := set(formats) - set(FORMATS):
        parser.error(f"unknown formats {sorted(unknown)}; choose from {', '.join(FORMATS)}")
    size = args.size if args.size is not None else (0.25 if args.quick else 2.0)
    files = args.files or (4 if args.quick else 8)
    runs = args.runs or (2 if args.quick else 3)

    total = int(size * GiB) // files // MiB * MiB * files
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mc-bench-formats-", dir="/var/tmp"))
    print(f"workdir {work}; making {files} files of bf16-like weights, {total / GiB:.2f} GiB", flush=True)
    weights = make_bf16_weights(work / "weights", total, files)
    expected = sha256_files(weights)[1]
    registry, host = start_registry(work / "registry")
    containerd = None
    try:
        images = build_images(weights, work, host, formats)
        if os.geteuid() == 0:
            containerd = Containerd(work / "containerd")
            containerd.start()
        _run(sys.executable, "-m", "modelcache", "--version", env=PYTHON_ENV)  # byte-compile, untimed
        os.sync()
        for fmt in formats:
            compare(images[fmt], host=host, work=work, total=total, expected=expected, runs=runs,
                    containerd=containerd, concurrency=args.concurrency, chunk_size=args.chunk_size,
                    registry_pid=registry.pid, warm=args.warm)
    finally:
        if containerd is not None:
            containerd.stop()
        registry.terminate()
        registry.wait()
        for d in ("store", "skopeo", "registry", "packer", "umoci", "skopeo-tar", "skopeo-zstd", "gzip6"):
            rmtree(work / d)
        if not args.workdir:
            rmtree(work)


if __name__ == "__main__":
    main()
