#!/usr/bin/env python3
"""Check the Dockerfile's image without a Docker engine: build its root filesystem and run it.

Where no base image can be pulled and no container engine runs, this builds
the root filesystem the top-level ``Dockerfile`` describes and runs its entry
point from it:

1. ``FROM python:3.X-slim-SUITE`` becomes a minimal Debian SUITE made with
   ``debootstrap --variant=minbase`` from Debian's own mirror, plus Debian's
   ``python3`` and ``python3-venv``. The official image is that same Debian
   release with CPython built from source under /usr/local; the check insists
   that Debian's python3 has the same major.minor as the tag.
2. The rest of the Dockerfile is *interpreted*, not restated: ENV/ARG set the
   environment, COPY copies from the build context as ``.dockerignore``
   filters it, RUN runs in a ``chroot`` as the current USER, WORKDIR sets the
   directory. An instruction this interpreter does not know is an error, so
   the Dockerfile cannot drift away from what was checked.
3. As the image's USER, in its WORKDIR and environment: ENTRYPOINT
   ``--version``, ENTRYPOINT + CMD ``--help`` (``modelcache serve --help``),
   and an import of the CSI gRPC stubs with the installed grpcio/protobuf.

Needs root (debootstrap, chroot), ``debootstrap``, and the network to the
Debian mirror and to PyPI (the Dockerfile's ``pip install``). Takes minutes.
``--base-cache FILE.tar`` keeps the debootstrapped base between runs. Behind a
TLS-intercepting proxy, RUN steps trust ``--ca-bundle`` (default: the host's
bundle), passed as ``PIP_CERT`` to RUN only, as a build argument would be.

    sudo tools/check_image.py [--keep DIR] [--base-cache /var/tmp/bookworm.tar]

Exit status 0 when every step passed; the last lines summarise what ran.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIRROR = "http://deb.debian.org/debian"
# What the official python image sets before any Dockerfile line of ours (its own Dockerfile's ENV).
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
KNOWN = {"FROM", "ARG", "ENV", "WORKDIR", "COPY", "RUN", "USER", "EXPOSE", "LABEL", "ENTRYPOINT", "CMD"}
BUILD_CA = "/check-image-ca.pem"  # the build's CA bundle inside the rootfs, during RUN steps only
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
STUBS_IMPORT = "import grpc, modelcache.csi.csi_pb2, modelcache.csi.csi_pb2_grpc; print('csi stubs ok')"


class CheckFailed(Exception):
    """A step of the check failed; the message says which."""


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: its keyword (upper case) and its argument text."""

    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order: comments dropped, backslash continuations joined (Dockerfile reference)."""
    instructions: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):  # comment lines inside a continuation are removed
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip()))
    if pending.strip():
        raise CheckFailed("Dockerfile ends inside a line continuation")
    return instructions


def exec_form(args: str) -> list[str] | None:
    """The JSON array of an exec-form instruction, or None for shell form."""
    if args.startswith("["):
        value = json.loads(args)
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise CheckFailed(f"not a JSON array of strings: {args}")
        return value
    return None


def expand(text: str, env: dict[str, str]) -> str:
    """``$VAR`` and ``${VAR}`` from ``env`` (unset: empty), as ENV, WORKDIR and COPY do."""
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda m: env.get(m.group(1) or m.group(2), ""), text)


def parse_pairs(args: str, env: dict[str, str]) -> dict[str, str]:
    """``ENV``/``LABEL``/``ARG`` arguments: ``K=V K2="V 2"`` (or the legacy ``K V``)."""
    words = shlex.split(args, posix=True)
    if len(words) >= 2 and "=" not in words[0]:
        return {words[0]: expand(" ".join(words[1:]), env)}
    pairs: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        # Substitution sees the environment from before this instruction (Dockerfile reference, ENV).
        pairs[key] = expand(value, env) if sep else env.get(key, "")
    return pairs


# -- .dockerignore --------------------------------------------------------------


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regex over slash paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per .dockerignore line, in order: the last rule that matches decides."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negated, _glob_regex(pattern)))
    return rules


def ignored(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the context path ``rel`` is left out: a rule matching it or any parent directory counts."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negated
    return excluded


def build_context(context: Path) -> list[str]:
    """Every file of the build context that .dockerignore admits, as sorted relative paths."""
    ignore = context / ".dockerignore"
    rules = ignore_rules(ignore.read_text()) if ignore.exists() else []
    files = []
    for dirpath, dirnames, filenames in os.walk(context):
        rel_dir = os.path.relpath(dirpath, context)
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if not ignored(rel, rules):
                files.append(rel)
    return sorted(files)


# -- the image plan ---------------------------------------------------------------


@dataclass
class Image:
    """What the Dockerfile leaves behind: environment, user, directory, entry point."""

    base: str = ""
    env: dict[str, str] = field(default_factory=lambda: dict(BASE_ENV))
    user: str = "0:0"
    workdir: str = "/"
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)


def base_of(reference: str) -> tuple[str, str]:
    """``python:3.11-slim-bookworm`` -> ("3.11", "bookworm"): the only kind of base this check can make."""
    m = re.fullmatch(r"(?:docker\.io/(?:library/)?)?python:(\d+\.\d+)(?:\.\d+)?-slim-(\w+)", reference)
    if not m:
        raise CheckFailed(f"FROM {reference}: only python:X.Y[.Z]-slim-SUITE bases can be checked this way")
    return m.group(1), m.group(2)


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(shlex.quote(a) for a in argv), flush=True)
    return subprocess.run(argv, text=True, **kwargs)


def _chroot(rootfs: Path, image: Image, argv: list[str], *, capture: bool = False,
            build_env: dict[str, str] | None = None) -> str:
    """Run ``argv`` in the rootfs as the image's USER, in its WORKDIR, with only its environment.

    ``build_env`` is added for RUN steps only (like ``docker build --build-arg``): never in the image.
    """
    env = [f"{k}={v}" for k, v in {**image.env, **(build_env or {})}.items()]
    inner = ["/usr/bin/env", "-i", *env, "/bin/sh", "-c", 'cd "$0" && exec "$@"', image.workdir, *argv]
    out = _run(["chroot", f"--userspec={image.user}", str(rootfs), *inner],
               capture_output=capture, timeout=1800)
    if out.returncode != 0:
        raise CheckFailed(f"{' '.join(argv)} exited {out.returncode}"
                          + (f": {(out.stderr or out.stdout).strip()[-2000:]}" if capture else ""))
    return out.stdout if capture else ""


def _user_ids(rootfs: Path, user: str) -> str:
    """USER name[:group] as numeric uid:gid, looked up in the rootfs (chroot --userspec reads the host's)."""
    name, _, group = user.partition(":")

    def lookup(table: str, key: str, column: int) -> str:
        if key.isdigit():
            return key
        for line in (rootfs / "etc" / table).read_text().splitlines():
            fields = line.split(":")
            if fields[0] == key:
                return fields[column]
        raise CheckFailed(f"USER {user}: no {key} in /etc/{table}")

    uid = lookup("passwd", name, 2)
    if group:
        return f"{uid}:{lookup('group', group, 2)}"
    if name.isdigit():
        return f"{uid}:{uid}"
    for line in (rootfs / "etc" / "passwd").read_text().splitlines():
        if line.split(":")[0] == name:
            return f"{uid}:{line.split(':')[3]}"
    return f"{uid}:0"


@contextlib.contextmanager
def _mounted(rootfs: Path) -> Iterator[None]:
    """/proc, /dev and the host's resolv.conf in the rootfs while RUN lines run (as a builder provides)."""
    mounted = []
    for kind, target in (("proc", rootfs / "proc"), ("dev", rootfs / "dev")):
        args = ["mount", "-t", "proc", "proc", str(target)] if kind == "proc" else ["mount", "--bind", "/dev",
                                                                                    str(target)]
        if subprocess.run(args, capture_output=True).returncode == 0:
            mounted.append(target)
    shutil.copyfile("/etc/resolv.conf", rootfs / "etc" / "resolv.conf")
    try:
        yield
    finally:
        for target in reversed(mounted):
            subprocess.run(["umount", "-l", str(target)], check=False)


def make_base(rootfs: Path, suite: str, version: str, *, mirror: str, cache: Path | None) -> None:
    """A minimal Debian ``suite`` with python3 + venv in ``rootfs`` (from ``cache`` when it exists)."""
    if cache is not None and cache.exists():
        _run(["tar", "-xf", str(cache), "-C", str(rootfs)], check=True)
    else:
        out = _run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                    suite, str(rootfs), mirror], capture_output=True, timeout=3600)
        if out.returncode != 0:
            raise CheckFailed(f"debootstrap {suite} failed: {out.stdout[-1500:]}{out.stderr[-1500:]}")
        if cache is not None:
            _run(["tar", "-cf", str(cache), "-C", str(rootfs), "."], check=True)
    got = subprocess.run(["chroot", str(rootfs), "python3", "-c",
                          "import sys; print('%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    if got != version:
        raise CheckFailed(f"Debian {suite}'s python3 is {got}, the Dockerfile's base has {version}")


def _copy(rootfs: Path, context: Path, files: list[str], args: str, image: Image) -> None:
    """COPY SRC... DEST from the (filtered) context; a directory source copies its contents."""
    words = exec_form(args) or shlex.split(args)
    if any(w.startswith("--") for w in words):
        raise CheckFailed(f"COPY {args}: flags (--from, --chown...) are not interpreted by this check")
    *sources, dest = [expand(w, image.env) for w in words]
    dest_abs = dest if dest.startswith("/") else f"{image.workdir.rstrip('/')}/{dest}"
    into_dir = dest.endswith("/") or len(sources) > 1
    copied = 0
    for source in sources:
        source = os.path.normpath(source).lstrip("/")
        chosen = [f for f in files if f == source or f.startswith(source + "/") or source == "."]
        if not chosen:
            raise CheckFailed(f"COPY {source}: not in the build context (or left out by .dockerignore)")
        for rel in chosen:
            if rel == source:  # a file
                target = f"{dest_abs.rstrip('/')}/{os.path.basename(rel)}" if into_dir else dest_abs
            else:  # in a directory: its contents go to dest
                target = f"{dest_abs.rstrip('/')}/{rel[len(source) + 1:] if source != '.' else rel}"
            path = rootfs / target.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(context / rel, path)
            copied += 1
    print(f"  copied {copied} files to {dest_abs}", flush=True)


def build(rootfs: Path, context: Path, instructions: list[Instruction], *, mirror: str,
          base_cache: Path | None, ca_bundle: Path | None = None) -> Image:
    """Make the base, then apply every instruction after FROM; return the final image settings.

    ``ca_bundle``: CA certificates pip trusts during RUN steps (a TLS-intercepting proxy between
    the builder and PyPI); copied in for the build, removed after, never in the image's ENV.
    """
    image = Image()
    build_env: dict[str, str] = {}
    files = build_context(context)
    unknown = sorted({i.keyword for i in instructions} - KNOWN)
    if unknown:
        raise CheckFailed(f"the Dockerfile uses {', '.join(unknown)}, which this check does not interpret")
    if [i.keyword for i in instructions].count("FROM") != 1 or instructions[0].keyword != "FROM":
        raise CheckFailed("the Dockerfile must have exactly one FROM, first (one stage)")
    with _mounted_after_base(rootfs, instructions[0].args, mirror, base_cache, image):
        if ca_bundle is not None:
            shutil.copyfile(ca_bundle, rootfs / BUILD_CA.lstrip("/"))
            build_env["PIP_CERT"] = BUILD_CA
        for ins in instructions[1:]:
            print(f"STEP {ins.keyword} {ins.args}", flush=True)
            if ins.keyword in ("ENV", "ARG"):
                image.env.update(parse_pairs(ins.args, image.env))
            elif ins.keyword == "WORKDIR":
                workdir = expand(ins.args, image.env)
                image.workdir = workdir if workdir.startswith("/") else f"{image.workdir.rstrip('/')}/{workdir}"
                (rootfs / image.workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
            elif ins.keyword == "COPY":
                _copy(rootfs, context, files, ins.args, image)
            elif ins.keyword == "RUN":
                _chroot(rootfs, image, exec_form(ins.args) or ["/bin/sh", "-c", ins.args], build_env=build_env)
            elif ins.keyword == "USER":
                image.user = _user_ids(rootfs, expand(ins.args, image.env))
            elif ins.keyword == "ENTRYPOINT":
                image.entrypoint = exec_form(ins.args) or ["/bin/sh", "-c", ins.args]
            elif ins.keyword == "CMD":
                image.cmd = exec_form(ins.args) or ["/bin/sh", "-c", ins.args]
    (rootfs / BUILD_CA.lstrip("/")).unlink(missing_ok=True)
    return image


@contextlib.contextmanager
def _mounted_after_base(rootfs: Path, base: str, mirror: str, cache: Path | None, image: Image) -> Iterator[None]:
    version, suite = base_of(base)
    image.base = base
    print(f"STEP FROM {base}: debootstrap {suite} + Debian python3 ({version})", flush=True)
    make_base(rootfs, suite, version, mirror=mirror, cache=cache)
    with _mounted(rootfs):
        yield


def run_checks(rootfs: Path, image: Image) -> list[str]:
    """The entry point's --version and serve --help, and the CSI stubs' import, as the image's USER."""
    if not image.entrypoint:
        raise CheckFailed("the Dockerfile has no ENTRYPOINT")
    python = f"{image.env.get('VIRTUAL_ENV', '/usr/local')}/bin/python"
    results = []
    for argv in ([*image.entrypoint, "--version"], [*image.entrypoint, *image.cmd, "--help"], [python, "-c", STUBS_IMPORT]):
        out = _chroot(rootfs, image, argv, capture=True)
        first = out.strip().splitlines()[0] if out.strip() else ""
        results.append(f"ok  {' '.join(argv)[:60]}  ->  {first[:70]}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dockerfile", type=Path, default=ROOT / "Dockerfile")
    parser.add_argument("--context", type=Path, default=ROOT, help="the build context (default: the repository)")
    parser.add_argument("--mirror", default=MIRROR, help="Debian mirror for debootstrap (default %(default)s)")
    parser.add_argument("--base-cache", type=Path, help="tarball of the debootstrapped base: reused if present, "
                                                        "written otherwise")
    parser.add_argument("--keep", type=Path, help="build into this (empty) directory and keep it")
    parser.add_argument("--ca-bundle", default=str(HOST_CA) if HOST_CA.exists() else "",
                        help="CA certificates for pip during RUN steps, e.g. a TLS-intercepting proxy's "
                             "(default: the host's, %(default)s; '' for none)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("check_image: needs root (debootstrap, chroot)", file=sys.stderr)
        return 2
    for tool in ("debootstrap", "chroot", "mount"):
        if not shutil.which(tool):
            print(f"check_image: {tool} not found (apt-get install debootstrap)", file=sys.stderr)
            return 2
    instructions = parse_dockerfile(args.dockerfile.read_text())
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="modelcache-image-"))
    rootfs = workdir / "rootfs"
    rootfs.mkdir(parents=True, exist_ok=False)
    size = ""
    try:
        image = build(rootfs, args.context, instructions, mirror=args.mirror, base_cache=args.base_cache,
                      ca_bundle=Path(args.ca_bundle) if args.ca_bundle else None)
        results = run_checks(rootfs, image)
        used = subprocess.run(["du", "-sh", str(rootfs)], capture_output=True, text=True).stdout.split("\t")[0]
        size = f"{used}, " + (f"kept at {rootfs}" if args.keep else "removed")
    except (CheckFailed, subprocess.SubprocessError, OSError) as e:
        print(f"check_image: FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        # Never walk into a bind mount of the host's /dev that failed to come off.
        if args.keep is None and not any(os.path.ismount(rootfs / d) for d in ("dev", "proc")):
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"check_image: PASSED  base {image.base} as Debian + python3; user {image.user}; rootfs {size}")
    for line in results:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
