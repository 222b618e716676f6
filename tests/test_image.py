"""The daemon image: the Dockerfile, its build context, and the check that builds its root filesystem.

No container engine runs here, so tools/check_image.py builds the image's root
filesystem with debootstrap and runs the entry point from it. That takes
minutes, needs root and the network, so it runs only with MODELCACHE_TEST_IMAGE=1
(marker ``image``). The rest checks, quickly, what that tool reads: the
Dockerfile's instructions and the build context .dockerignore admits.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from modelcache.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("check_image", ROOT / "tools" / "check_image.py")
assert _spec and _spec.loader
check_image = importlib.util.module_from_spec(_spec)
sys.modules["check_image"] = check_image  # its dataclasses look their module up there
_spec.loader.exec_module(check_image)


def _instructions() -> list:
    return check_image.parse_dockerfile((ROOT / "Dockerfile").read_text())


def test_dockerfile_is_one_pinned_slim_python_stage() -> None:
    """One FROM, a python slim bookworm base pinned by tag, only instructions the check interprets."""
    instructions = _instructions()
    [base] = [i.args for i in instructions if i.keyword == "FROM"]
    assert check_image.base_of(base) == ("3.11", "bookworm")
    assert {i.keyword for i in instructions} <= check_image.KNOWN


def test_entry_point_is_serve_as_a_non_root_user() -> None:
    """ENTRYPOINT modelcache, CMD serve; the image's USER is not root (the DaemonSet opts into root)."""
    instructions = _instructions()
    final = {i.keyword: i.args for i in instructions}  # the last of each wins, as in a build
    assert check_image.exec_form(final["ENTRYPOINT"]) == ["modelcache"]
    assert check_image.exec_form(final["CMD"]) == ["serve"]
    uid = final["USER"].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    [ds] = [d for d in yaml.safe_load_all((ROOT / "daemonset" / "daemonset.yaml").read_text()) if d]
    daemon = {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}["modelcache"]
    assert daemon["securityContext"]["runAsUser"] == 0 and daemon["securityContext"]["privileged"] is True
    # The DaemonSet's args replace CMD and must be a command the entry point takes.
    assert build_parser().parse_args(daemon["args"]).command == "serve"


def test_build_context_is_the_package_and_nothing_else() -> None:
    """.dockerignore admits pyproject, README and the package with its CSI stubs; no tests, caches or .git."""
    files = check_image.build_context(ROOT)
    assert {"pyproject.toml", "README.md", "modelcache/cli.py", "modelcache/csi/csi_pb2.py",
            "modelcache/csi/csi_pb2_grpc.py"} <= set(files)
    assert all(f in ("pyproject.toml", "README.md") or f.startswith("modelcache/") for f in files), files
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)


def test_dockerignore_rules_follow_docker_semantics(tmp_path: Path) -> None:
    """The last matching rule wins, ``!`` re-admits, a rule on a directory covers its contents, ``**`` spans dirs."""
    rules = check_image.ignore_rules("*\n!src\nsrc/secret\n**/*.tmp\n!src/keep.tmp\n")
    assert check_image.ignored("Makefile", rules) and check_image.ignored("docs/a.md", rules)
    assert not check_image.ignored("src/a.py", rules) and not check_image.ignored("src/deep/b.py", rules)
    assert check_image.ignored("src/secret/key", rules)
    assert check_image.ignored("src/deep/x.tmp", rules) and not check_image.ignored("src/keep.tmp", rules)


def test_dockerfile_parsing_joins_continuations_and_expands_env() -> None:
    """Continuations join, comment lines inside them drop, ENV expands $VAR and ${VAR}."""
    text = "FROM python:3.11-slim-bookworm\n# note\nRUN a \\\n  # inside\n  && b\nENV A=1 \\\n    B=${A}2 C=$PATH\n"
    instructions = check_image.parse_dockerfile(text)
    assert [i.keyword for i in instructions] == ["FROM", "RUN", "ENV"]
    assert instructions[1].args.split() == ["a", "&&", "b"]
    # As Docker does, ${A} is A's value from before this ENV, not the one it sets.
    assert check_image.parse_pairs(instructions[2].args, {"PATH": "/bin", "A": "0"}) == {"A": "1", "B": "02",
                                                                                          "C": "/bin"}
    with pytest.raises(check_image.CheckFailed):
        check_image.base_of("ubuntu:24.04")


def _image_prerequisites() -> str | None:
    if os.environ.get("MODELCACHE_TEST_IMAGE") != "1":
        return "builds a root filesystem for minutes: set MODELCACHE_TEST_IMAGE=1 to run it"
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot)"
    if not shutil.which("debootstrap"):
        return "needs debootstrap (apt-get install debootstrap)"
    return None


@pytest.mark.image
@pytest.mark.timeout(3600)
@pytest.mark.skipif(_image_prerequisites() is not None, reason=str(_image_prerequisites()))
def test_image_root_filesystem_runs_the_entry_point() -> None:
    """tools/check_image.py: debootstrap the base, run the Dockerfile's steps, run `modelcache` from it."""
    cache = os.environ.get("MODELCACHE_TEST_IMAGE_BASE_CACHE")
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "check_image.py"),
                          *(["--base-cache", cache] if cache else [])],
                         capture_output=True, text=True, timeout=3500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "check_image: PASSED" in out.stdout
    assert "modelcache --version  ->  modelcache " in out.stdout
    assert "modelcache serve --help  ->  usage: modelcache serve" in out.stdout
    assert "csi stubs ok" in out.stdout
