"""Start-up costs only what the command uses (issue 13): a warm pull loads no heavy library.

A warm hit (the model already in the store) resolves its manifest and
finds everything present; it must not import the clients of the other
sources, the daemon's servers or the peer layer. A warm hit of a registry
tag or of a digest goes further: it is answered from the index with one
blocking GET of the manifest (a tag) or none (a digest), so it loads no
event loop, no TLS, no transfer engine and no unpacker either
(:data:`LEAN`). Each test runs the CLI as a process, as a user would,
through a small wrapper that writes the names in ``sys.modules`` when the
command has finished. A behaviour test, not a timing test: the machine's
speed does not enter into it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from support import LAYER_TAR, MP_ARTIFACT, MP_CONFIG, MP_WEIGHT, Registry, make_tar, run_cli

# Libraries a warm hit never needs; each costs from 0.05 s to over a second to import.
HEAVY = ("aiohttp", "boto3", "botocore", "kubernetes", "grpc", "huggingface_hub", "prometheus_client",
         "modelcache.p2p", "modelcache.daemon", "modelcache.csi", "modelcache.package")
# What no warm hit of any source needs: the unpacker and its codecs, the terminal UI, the pre-warm CLI.
UNPACK = ("zstandard", "isal", "rich", "tarfile", "modelcache.store.unpack", "modelcache.store.inflate",
          "modelcache.store.streamunpack", "modelcache.tarplace", "modelcache.prewarmctl")
# And what a warm hit answered from the index (a registry tag, a digest) does without: each costs
# milliseconds to load, asyncio and ssl together more than the rest of the hit.
LEAN = (*HEAVY, *UNPACK, "asyncio", "ssl", "concurrent.futures", "logging", "email", "xxhash",
        "modelcache.pull", "modelcache.transfer", "modelcache.store.content", "modelcache.store.store",
        "modelcache.sources.registry", "modelcache.sources.rawget")

_WRAPPER = """
import json, sys
from modelcache.cli import main
code = main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump(sorted(sys.modules), f)
sys.exit(code)
"""


def modules_of(tmp_path: Path, *args: str, store: Path) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``modelcache --store STORE ARGS``; return the process and the modules it had loaded at the end."""
    listing = tmp_path / "modules.json"
    listing.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, str(listing), "--store", str(store), *args],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    return proc, set(json.loads(listing.read_text()))


def heavy_in(modules: set[str], heavy: tuple[str, ...] = HEAVY) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in heavy))


def test_warm_pull_from_a_registry_loads_no_heavy_module(registry: Registry, store: Path, tmp_path: Path) -> None:
    """The second pull of a registry model answers from the store with none of the heavy clients loaded."""
    weights = b"w" * 4096
    layers = [(weights, MP_WEIGHT, {"org.cncf.model.filepath": "model.safetensors"}),
              (make_tar([("config.json", b"{}", {})]), LAYER_TAR, None)]
    registry.push_image("startup/warm", "v1", layers, config=b'{"descriptor": {"name": "warm"}}',
                        config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)
    ref = f"oci://{registry.host}/startup/warm:v1"
    cold = run_cli("pull", "-q", ref, store=store, check=True)
    path = cold.stdout.strip().splitlines()[-1]

    warm, modules = modules_of(tmp_path, "pull", "-q", ref, store=store)
    assert warm.stdout.strip().splitlines()[-1] == path
    assert (Path(path) / "model.safetensors").read_bytes() == weights
    assert "modelcache.sources.tagdigest" in modules  # it did ask the origin what the tag names
    assert heavy_in(modules, LEAN) == []

    digest = registry.push_image("startup/warm", "v1", layers, config=b'{"descriptor": {"name": "warm"}}',
                                 config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)  # the same manifest again
    pinned = f"oci://{registry.host}/startup/warm@{digest}"
    run_cli("pull", "-q", pinned, store=store, check=True)
    warm, modules = modules_of(tmp_path, "pull", "-q", pinned, store=store)
    assert warm.stdout.strip().splitlines()[-1] == path
    # A digest names its content for good: not even a socket is opened.
    assert heavy_in(modules, (*LEAN, "socket", "modelcache.sources")) == []


def test_warm_pull_from_a_layout_and_ls_load_no_heavy_module(store: Path, tmp_path: Path) -> None:
    """A local layout's warm hit, and listing the store, load none of the network clients either."""
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model.bin").write_bytes(b"m" * 8192)
    layout = tmp_path / "layout"
    run_cli("package", "-q", str(weights), "--to", f"{layout}:v1", store=tmp_path / "packer", check=True)
    ref = f"oci-layout://{layout}:v1"
    path = run_cli("pull", "-q", ref, store=store, check=True).stdout.strip().splitlines()[-1]

    warm, modules = modules_of(tmp_path, "pull", "-q", ref, store=store)
    assert warm.stdout.strip().splitlines()[-1] == path
    assert heavy_in(modules, (*HEAVY, *UNPACK)) == []

    listed, modules = modules_of(tmp_path, "ls", "--json", store=store)
    assert [row["path"] for row in json.loads(listed.stdout)] == [path]
    assert heavy_in(modules) == []


_RUN = """
import atexit, sys
atexit.register(lambda: sys.stderr.write("torn down\\n"))
sys.argv = ["modelcache", *sys.argv[1:]]
from modelcache.cli import run
run()
"""


def test_a_finished_command_exits_without_teardown_and_keeps_its_output(store: Path, tmp_path: Path) -> None:
    """The command flushes what it printed and its exit code, then skips the interpreter's teardown."""
    def command(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _RUN, "--store", str(store), *args], capture_output=True,
                              text=True, timeout=120, env=dict(os.environ))

    listed = command("ls", "--json")  # stdout is a pipe here, so block-buffered: only a flush delivers it
    assert (listed.returncode, json.loads(listed.stdout)) == (0, [])
    assert "torn down" not in listed.stderr

    missing = command("pull", "-q", str(tmp_path / "nowhere"))
    assert missing.returncode == 3 and "no such directory" in missing.stderr
    assert "torn down" not in missing.stderr
