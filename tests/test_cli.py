"""The command line as a person meets it: where flags go, bad values, errors that say what happened.

Every case runs ``python -m modelcache`` as a subprocess, as a user would, and
checks the exit code, the words on stderr and that no traceback escapes.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import tree_digests

USAGE, NOT_FOUND, BAD_CONTENT, UNAVAILABLE = 2, 3, 5, 6  # exit codes (modelcache/errors.py)


def cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 60):
    """``python -m modelcache ARGS`` (no --store added: the tests say where it goes)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCACHE_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "modelcache", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd)


def clean_error(proc, code: int, *words: str) -> str:
    """Exit ``code``, no traceback, and ``words`` on the last stderr line."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    for word in words:
        assert word in last, (word, last)
    return last


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    root = tmp_path / "weights"
    root.mkdir()
    (root / "model.safetensors").write_bytes(os.urandom(3000))
    (root / "config.json").write_text("{}")
    return root


# -- 1. global options after the subcommand ------------------------------------------------------


def test_store_and_verbose_follow_the_subcommand(weights: Path, tmp_path: Path) -> None:
    """`pull REF --store DIR`, `ls -v --store DIR`: as good as before the subcommand."""
    store = tmp_path / "after"
    proc = cli("pull", "-q", str(weights), "--store", str(store))
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.split()[-1]).is_relative_to(store)
    assert tree_digests(Path(proc.stdout.split()[-1])) == tree_digests(weights)

    listed = cli("ls", "-v", "--store", str(store))
    assert listed.returncode == 0 and f"file://{weights}" in listed.stdout, listed


def test_option_after_the_subcommand_wins_and_absent_keeps_the_global(weights: Path, tmp_path: Path) -> None:
    """--store before and after: the later one counts; only before: it is kept (not reset to the default)."""
    before, after = tmp_path / "before", tmp_path / "after"
    proc = cli("--store", str(before), "pull", "-q", str(weights), "--store", str(after))
    assert proc.returncode == 0 and Path(proc.stdout.split()[-1]).is_relative_to(after), proc.stderr
    assert not before.exists()
    proc = cli("--store", str(before), "pull", "-q", str(weights))
    assert proc.returncode == 0 and Path(proc.stdout.split()[-1]).is_relative_to(before), proc.stderr


def test_verbose_after_the_subcommand_logs(tmp_path: Path) -> None:
    """`-v` after `pull` turns on the retry log lines as it does before it."""
    proc = cli("pull", f"oci://127.0.0.1:{_closed_port()}/m/x:v1", "--retries", "1", "-v",
               "--store", str(tmp_path / "s"))
    assert "retry 1" in proc.stderr, proc.stderr


# -- 2. bad values are usage errors ------------------------------------------------------------


@pytest.mark.parametrize("flags,words", [
    (["--read-timeout", "0"], ["--read-timeout", "more than 0"]),
    (["--read-timeout", "-1"], ["--read-timeout", "more than 0"]),
    (["--read-timeout", "abc"], ["--read-timeout", "abc"]),
    (["--read-timeout", "inf"], ["--read-timeout"]),
    (["--retries", "-1"], ["--retries", "0 or more"]),
    (["--retries", "3x"], ["--retries", "3x"]),
])
def test_numeric_flags_are_checked(tmp_path: Path, flags: list[str], words: list[str]) -> None:
    clean_error(cli("pull", "/nowhere", *flags, "--store", str(tmp_path / "s")), USAGE, *words)
    assert not (tmp_path / "s").exists()


def test_gc_ingest_max_age_must_not_be_negative(tmp_path: Path) -> None:
    clean_error(cli("gc", "--ingest-max-age", "-5", "--store", str(tmp_path / "s")), USAGE,
                "--ingest-max-age", "0 or more")
    assert cli("gc", "--ingest-max-age", "0", "--store", str(tmp_path / "s")).returncode == 0


@pytest.mark.parametrize("var,value,args,code", [
    ("MODELCACHE_READ_TIMEOUT", "abc", ["ls"], 0),          # ls takes no timeout: the value is not read
    ("MODELCACHE_RETRIES", "3x", ["--version"], 0),
    ("MODELCACHE_READ_TIMEOUT", "abc", ["pull", "/nowhere"], USAGE),
    ("MODELCACHE_RETRIES", "3x", ["pull", "/nowhere"], USAGE),
    ("MODELCACHE_RETRIES", "-2", ["pull", "/nowhere"], USAGE),
    ("MODELCACHE_CONCURRENCY", "zero", ["demo"], USAGE),
    ("MODELCACHE_INGEST_MAX_AGE", "-1", ["gc"], USAGE),
])
def test_environment_values_get_the_flags_checks(tmp_path: Path, var: str, value: str, args: list[str],
                                                 code: int) -> None:
    """Env defaults go through the flag's type: a usage error (2) naming the flag, never a traceback."""
    proc = cli(*args, "--store", str(tmp_path / "s"), env={var: value}) if args != ["--version"] \
        else cli(*args, env={var: value})
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    if code == USAGE:
        flag = "--" + var.removeprefix("MODELCACHE_").lower().replace("_", "-")
        assert flag in proc.stderr and "usage:" in proc.stderr, proc.stderr


# -- 3. package --to without a scheme ----------------------------------------------------------


def test_package_to_a_registry_without_scheme_is_refused(weights: Path, tmp_path: Path) -> None:
    proc = cli("package", str(weights), "--to", "127.0.0.1:5000/models/x:v1", "--store", str(tmp_path / "s"),
               cwd=tmp_path)
    clean_error(proc, USAGE, "did you mean oci://127.0.0.1:5000/models/x:v1")
    assert not (tmp_path / "127.0.0.1").exists() and not list(tmp_path.glob("127.0.0.1*"))


@pytest.mark.parametrize("to", ["./layout:v1", "{tmp}/layout:v1", "existing:v1"])
def test_package_to_a_clear_directory_writes_a_layout(weights: Path, tmp_path: Path, to: str) -> None:
    """DIR:TAG stays a layout when DIR is absolute, ./relative or an existing directory."""
    (tmp_path / "existing").mkdir()
    to = to.format(tmp=tmp_path)
    proc = cli("package", "-q", str(weights), "--to", to, "--store", str(tmp_path / "s"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / to.rpartition(":")[0]
    assert (root / "oci-layout").is_file() and "v1" in (root / "index.json").read_text()


def test_package_help_lists_s3_and_top_help_has_no_markup() -> None:
    assert "s3://" in cli("package", "--help").stdout
    top = cli("--help").stdout
    assert "``" not in top and "modelcache command line" in top


# -- 6. errors say what happened ----------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refused_connection_is_retried_then_reported_plainly(tmp_path: Path) -> None:
    """A refused origin is retried with backoff (bounded by --retries), then named without internals."""
    port = _closed_port()
    proc = cli("pull", "-v", "--retries", "2", f"oci://127.0.0.1:{port}/models/m:v1", "--store", str(tmp_path / "s"))
    last = clean_error(proc, UNAVAILABLE, f"127.0.0.1:{port}", "Connection refused", "3 attempts")
    assert "ClientConnectorError" not in proc.stderr and "ssl:default" not in proc.stderr
    assert len(re.findall(r"retry \d in", proc.stderr)) == 2, proc.stderr
    assert last.startswith("modelcache: error: ")


def test_store_that_is_a_file(tmp_path: Path) -> None:
    file = tmp_path / "passwd"
    file.write_text("root:x:0:0\n")
    for args in (["ls"], ["gc"], ["pull", str(tmp_path)]):
        clean_error(cli(*args, "--store", str(file)), USAGE, str(file), "not a directory")


@pytest.mark.parametrize("scheme", ["File://", "FILE://"])
def test_schemes_are_case_insensitive(weights: Path, tmp_path: Path, scheme: str) -> None:
    proc = cli("pull", "-q", f"{scheme}{weights}", "--store", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr
    assert tree_digests(Path(proc.stdout.split()[-1])) == tree_digests(weights)


def test_missing_local_path_one_code_one_message(tmp_path: Path) -> None:
    """However a missing directory is spelled, the exit code and the message are the same."""
    missing = tmp_path / "nope"
    spellings = [str(missing), f"file://{missing}", f"oci-layout://{missing}", "./nope"]
    lines = set()
    for ref in spellings:
        proc = cli("pull", "-q", ref, "--store", str(tmp_path / "s"), cwd=tmp_path)
        lines.add(clean_error(proc, NOT_FOUND, str(missing), "no such directory"))
    assert len(lines) == 1, lines


def test_registry_reference_without_scheme_gets_a_hint(tmp_path: Path) -> None:
    proc = cli("pull", "registry.example/models/x:v1", "--store", str(tmp_path / "s"), cwd=tmp_path)
    clean_error(proc, NOT_FOUND, "oci://registry.example/models/x:v1")


def test_non_utf8_file_name_is_named_not_a_traceback(tmp_path: Path) -> None:
    src = tmp_path / "bad"
    src.mkdir()
    (src / "ok.json").write_text("{}")
    with open(os.path.join(os.fsencode(src), b"w\xff.bin"), "wb") as f:
        f.write(b"x" * 10)
    pulled = cli("pull", "-q", str(src), "--store", str(tmp_path / "s"))
    clean_error(pulled, BAD_CONTENT, "w\\xff.bin", "not valid UTF-8")
    packaged = cli("package", "-q", str(src), "--to", f"{tmp_path}/out:v1", "--store", str(tmp_path / "s"))
    clean_error(packaged, BAD_CONTENT, "w\\xff.bin", "not valid UTF-8")


# -- 7. small things ----------------------------------------------------------------------------


def test_ls_does_not_create_a_store(tmp_path: Path) -> None:
    store = tmp_path / "never"
    proc = cli("ls", "--store", str(store))
    assert proc.returncode == 0 and "no cached models" in proc.stderr, proc.stderr
    assert cli("ls", "--json", "--store", str(store)).stdout.strip() == "[]"
    assert not store.exists()


def test_demo_states_its_file_count_once_and_right(tmp_path: Path) -> None:
    store = tmp_path / "s"
    proc = cli("demo", "--size", "1M", "--files", "3", "--store", str(store))
    assert proc.returncode == 0, proc.stderr
    counts = re.findall(r"\b(\d+) files\b", proc.stderr + proc.stdout)
    pulled = Path(proc.stdout.split()[-1])
    actual = sum(1 for p in pulled.rglob("*") if p.is_file())
    assert counts == [str(actual)], (counts, actual, proc.stderr)
