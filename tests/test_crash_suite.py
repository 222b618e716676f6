"""The crash suite (issue 10): SIGKILL at every named crash point, in the CLI and in the daemon, then prove:

- no unverified byte is visible: every blob's sha256 matches its name, every file of a view in
  ``views/`` is a hardlink to a blob;
- no view is partial: every view's tree hashes to its name, and a recorded one matches its row;
- after one gc the index matches the disk: no view dir without a row or row without a dir, no blob
  without a row or nothing holding it, no temp or trash left, usage equal to the sum of blob sizes;
- the next pull fetches only what is missing (blob bytes counted at the origin through the fault
  proxy: what is neither committed nor durable in a partial ingest) and is byte-exact.

Models are small (a few chunks of 64 KiB) and come from the loopback registry; a store already
holding a model is copied from a template (``cp -a`` keeps its hardlinks) instead of pulled again.
"""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemon_support import (
    DaemonProcess,
    free_port,
    publish_request,
    start_daemon,
    unmount_all_below,
)
from faultproxy import FaultProxy
from support import LAYER_TAR, MP_ARTIFACT, MP_CONFIG, MP_WEIGHT, run_cli, sha256, tree_digests

from modelcache.store import Store, view_digest
from modelcache.store.crash import POINTS
from modelcache.store.gc import collect
from modelcache.store.views import ViewEntry

CHUNK = 64 << 10
FILES = {"weights.bin": os.urandom(4 * CHUNK + 123), "config.json": b'{"layers": 2}',
         "tok/tokenizer.json": b'{"vocab": {}}' * 50}
TAR_FILES = {"w.bin": os.urandom(2 * CHUNK + 7), "sub/readme.txt": b"hello\n"}
BAD = 0xFF  # corruption: the first byte of a blob inverted


def _tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in TAR_FILES.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("latest.bin")
        link.type, link.linkname = tarfile.SYMTYPE, "w.bin"
        tar.addfile(link)
    return buf.getvalue()


@dataclass
class Origin:
    """The models at the origin, behind the fault proxy (which counts what it serves)."""

    proxy: FaultProxy
    files: str  # a ModelPack artifact: raw files
    image: str  # an image: one tar layer, unpacked
    layers: dict[str, dict[str, int]]  # ref -> layer digest -> size
    expected: dict[str, dict[str, str]]  # ref -> tree_digests of its view


@pytest.fixture(scope="module")
def origin(registry) -> Iterator[Origin]:
    layers = [(data, MP_WEIGHT, {"org.cncf.model.filepath": name}) for name, data in FILES.items()]
    registry.push_image("crash/files", "v1", layers, config=b"{}", config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)
    tar = _tar()
    registry.push_image("crash/image", "v1", [(tar, LAYER_TAR, None)])
    with FaultProxy(registry.host) as proxy:
        files, image = f"oci://{proxy.host}/crash/files:v1", f"oci://{proxy.host}/crash/image:v1"
        yield Origin(proxy, files, image,
                     layers={files: {sha256(d): len(d) for d in FILES.values()}, image: {sha256(tar): len(tar)}},
                     expected={files: {p: sha256(d) for p, d in FILES.items()},
                               image: {**{p: sha256(d) for p, d in TAR_FILES.items()}, "latest.bin": "-> w.bin"}})


@pytest.fixture(scope="module")
def template(origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding the files model, pulled once."""
    store = tmp_path_factory.mktemp("template") / "s"
    run_cli("pull", "-q", "--chunk-size", "64K", origin.files, store=store, check=True)
    return store


def _copy(template: Path, store: Path) -> None:
    store.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", str(template), str(store)], check=True)


def _corrupt_weights(store: Path) -> str:
    digest = sha256(FILES["weights.bin"])
    path = store / "blobs" / "sha256" / digest[7:]
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ BAD]))
    return digest


# -- the invariants -----------------------------------------------------------------


def _rows(store_dir: Path, sql: str, *args: object) -> set[tuple]:
    db = sqlite3.connect(store_dir / "index.sqlite")
    try:
        return set(db.execute(sql, args).fetchall())
    finally:
        db.close()


def check_visible(store_dir: Path, *, corrupt_ok: frozenset[str] = frozenset()) -> None:
    """No unverified byte in blobs/ or in a served view; no view partial (see the module docstring)."""
    blobs_dir = store_dir / "blobs" / "sha256"
    by_inode: dict[tuple[int, int], str] = {}
    for blob in blobs_dir.iterdir():
        digest = "sha256:" + blob.name
        if digest not in corrupt_ok:
            assert sha256(blob.read_bytes()) == digest, f"unverified bytes in blobs/: {blob.name}"
        st = blob.stat()
        by_inode[(st.st_dev, st.st_ino)] = digest
    s = Store(store_dir)
    try:
        recorded = {r.view: r for r in s.index.records()}
        for view in (store_dir / "views").iterdir():
            if view.name.startswith("."):  # .tmp-, .del-, .corrupt-: never served
                continue
            entries = []
            for path in sorted(view.rglob("*")):
                rel = path.relative_to(view).as_posix()
                if path.is_symlink():
                    entries.append(ViewEntry(rel, "symlink", target=os.readlink(path)))
                elif path.is_file():
                    st = path.stat()
                    blob = by_inode.get((st.st_dev, st.st_ino))
                    assert blob is not None, f"view file {rel} of {view.name[:12]} is not a hardlink to a blob"
                    entries.append(ViewEntry(rel, "file", blob, st.st_size))
            # Our models have no explicit directory entries: files and links name the whole tree.
            assert view_digest(entries) == "sha256:" + view.name, f"view {view.name[:12]} is partial"
            record = recorded.get("sha256:" + view.name)
            if record is not None:
                files = [e for e in entries if e.kind == "file"]
                assert (record.files, record.size) == (len(files), sum(e.size for e in files))
                assert _rows(store_dir, "SELECT blob FROM view_blobs WHERE view = ?", record.view) == \
                    {(e.digest,) for e in files}
    finally:
        s.close()


def gc_and_check_consistent(store_dir: Path) -> None:
    """One gc (as after any crash), then the index matches the disk and nothing is orphaned."""
    s = Store(store_dir)
    try:
        collect(s)
        views_on_disk = {p.name for p in (store_dir / "views").iterdir()}
        mounted = {v for lease in s.index.leases("mount") for v in lease.views}
        strays = {n for n in views_on_disk if n.startswith(".")
                  and not (n.startswith(".corrupt-") and any(v[7:19] == n[9:21] for v in mounted))}
        assert strays == set(), f"temp or trash left in views/: {strays}"
        recorded = {v[7:] for v in s.index.views()}
        assert views_on_disk - strays - {n for n in views_on_disk if n.startswith(".")} == recorded
        on_disk = {"sha256:" + p.name: p.stat().st_size for p in (store_dir / "blobs" / "sha256").iterdir()}
        counted = dict(_rows(store_dir, "SELECT digest, size FROM blobs"))
        assert counted == on_disk, "the index's blob count differs from the disk"
        assert s.index.usage() == sum(on_disk.values())
        in_views = {b for b, in _rows(store_dir, "SELECT DISTINCT blob FROM view_blobs")}
        held = {b for lease in s.index.leases() for b in lease.blobs}
        assert set(on_disk) <= in_views | held, "a blob nothing holds survived gc"
        assert [lease.id for lease in s.index.leases("pull")] == [], "a dead pull's lease survived gc"
        ingest = store_dir / "ingest"
        assert [p.name for p in ingest.iterdir() if p.name.startswith("tmp-")] == []
        assert [p.name for p in ingest.iterdir() if len(p.name) == 64 and "sha256:" + p.name in on_disk] == []
    finally:
        s.close()


def missing_bytes(store_dir: Path, origin: Origin, ref: str) -> int:
    """Blob bytes the next pull of ``ref`` must fetch: of layers neither committed (or unpacked) nor durable."""
    s = Store(store_dir)
    try:
        durable = {i.digest: i.bytes_done for i in s.content.ingests() if i.chunk_size == CHUNK}
        need = 0
        for digest, size in origin.layers[ref].items():
            if s.content.has(digest) or s.layer_rows(digest) is not None:
                continue
            need += size - durable.get(digest, 0)
        return need
    finally:
        s.close()


def next_pull_is_minimal_and_exact(store_dir: Path, origin: Origin, ref: str) -> None:
    want = missing_bytes(store_dir, origin, ref)
    origin.proxy.clear()
    proc = run_cli("pull", "-q", "--chunk-size", "64K", ref, store=store_dir, check=True)
    fetched = sum(origin.proxy.served(d) for d in origin.layers[ref])
    assert fetched == want, f"the next pull fetched {fetched} blob bytes, {want} were missing"
    assert tree_digests(Path(proc.stdout.split()[-1])) == origin.expected[ref]
    check_visible(store_dir)


def _after_crash(store_dir: Path, origin: Origin, ref: str, *, corrupt: frozenset[str] = frozenset()) -> None:
    check_visible(store_dir, corrupt_ok=corrupt)
    if corrupt:  # the verify the crash cut short, run again to its end
        run_cli("verify", "--delete", store=store_dir)
    gc_and_check_consistent(store_dir)
    next_pull_is_minimal_and_exact(store_dir, origin, ref)


def _killed(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)


# -- the CLI ------------------------------------------------------------------------

CLI_PULL = ["pull-leased", "resolved", "blobs-held", "chunk-recorded@3", "commit-verified", "blob-counted",
            "blob-linked@2", "view-linked", "view-built", "view-recorded"]
CLI_UNPACK = ["unpack-file-written", "layer-recorded", "blob-counted@2"]
CLI_GC = ["gc-leases-expired", "gc-leftovers-removed", "gc-evicted", "gc-blob-unlinked@2", "view-forgotten"]
CLI_VERIFY = ["verify-found", "view-forgotten", "blob-deleted"]


@pytest.mark.parametrize("point", CLI_PULL + [f"image:{p}" for p in CLI_UNPACK])
def test_cli_pull_killed(point: str, origin: Origin, tmp_path: Path) -> None:
    """`modelcache pull` killed at each step of resolve, ingest, commit, unpack, view build and record."""
    ref = origin.image if point.startswith("image:") else origin.files
    store = tmp_path / "s"
    _killed(run_cli("pull", "-q", "--chunk-size", "64K", ref, store=store,
                    env={"MODELCACHE_TEST_CRASH_AT": point.removeprefix("image:")}))
    _after_crash(store, origin, ref)


@pytest.mark.parametrize("point", CLI_GC)
def test_cli_gc_killed(point: str, origin: Origin, template: Path, tmp_path: Path) -> None:
    """`modelcache gc --max-size 0` killed at each step: the model is whole or gone, never half there."""
    store = tmp_path / "s"
    _copy(template, store)
    _killed(run_cli("gc", "--max-size", "0", store=store, env={"MODELCACHE_TEST_CRASH_AT": point}))
    _after_crash(store, origin, origin.files)


@pytest.mark.parametrize("point", CLI_VERIFY)
def test_cli_verify_killed(point: str, origin: Origin, template: Path, tmp_path: Path) -> None:
    """`modelcache verify --delete` of a corrupt blob killed at each step: no corrupt view is left served once
    it is run again; the next pull fetches the blob again."""
    store = tmp_path / "s"
    _copy(template, store)
    corrupt = _corrupt_weights(store)
    _killed(run_cli("verify", "--delete", store=store, env={"MODELCACHE_TEST_CRASH_AT": point}))
    _after_crash(store, origin, origin.files, corrupt=frozenset({corrupt}))


# -- the daemon ---------------------------------------------------------------------

DAEMON_PULL = ["pull-leased", "chunk-recorded@2", "blob-counted", "view-built", "view-recorded"]
DAEMON_SCRUB = ["verify-found", "view-forgotten", "blob-deleted"]


def _daemon(root: Path, point: str, *extra: str, store: Path | None = None) -> DaemonProcess:
    return start_daemon(root, "--chunk-size", "64K", *extra, store=store,
                        env={"MODELCACHE_TEST_CRASH_AT": point})


def _died(daemon: DaemonProcess, timeout: float = 60) -> None:
    try:
        code = daemon.process.wait(timeout)
    except subprocess.TimeoutExpired:
        daemon.stop(signal.SIGKILL)
        raise AssertionError("the daemon did not reach its crash point:\n" + daemon.log.read_text()) from None
    assert code == -signal.SIGKILL, daemon.log.read_text()


def _restart_recovery(store_dir: Path) -> None:
    """What the next daemon does first: drop leases of volumes no longer mounted."""
    from modelcache.daemon.mounts import Mounts

    s = Store(store_dir)
    try:
        Mounts(s).recover()
    finally:
        s.close()


@pytest.mark.parametrize("point", DAEMON_PULL)
def test_daemon_pull_killed(point: str, origin: Origin, tmp_path: Path) -> None:
    """The daemon killed in the middle of a pull started by POST /v1/pulls."""
    daemon = _daemon(tmp_path / "node", point, "--scrub-rate", "0")
    try:
        status, _job = daemon.call("POST", "/v1/pulls", {"ref": origin.files})
        assert status == 202
        _died(daemon)
    finally:
        daemon.stop(signal.SIGKILL)
    _after_crash(daemon.store, origin, origin.files)


DAEMON_MOUNT = ["mount-handed-over", "mount-leased"]


@pytest.mark.parametrize("point", DAEMON_MOUNT)
def test_daemon_killed_between_mount_lease_and_bind(point: str, origin: Origin, tmp_path: Path) -> None:
    """Killed after leasing a volume's view (by the pull job the mount waited on, or by the mount itself),
    before bind-mounting it: the next daemon drops the lease."""
    daemon = _daemon(tmp_path / "node", point, "--scrub-rate", "0")
    try:
        target = tmp_path / "pod" / "vol"
        with pytest.raises(Exception):  # noqa: B017 - the daemon dies under the call
            daemon.node().NodePublishVolume(publish_request("vol-1", target, origin.files), timeout=60)
        _died(daemon)
    finally:
        daemon.stop(signal.SIGKILL)
        unmount_all_below(tmp_path)
    _restart_recovery(daemon.store)
    s = Store(daemon.store)
    try:
        assert s.index.leases("mount") == []
    finally:
        s.close()
    _after_crash(daemon.store, origin, origin.files)


@pytest.mark.parametrize("point", DAEMON_SCRUB)
def test_daemon_scrub_killed(point: str, origin: Origin, template: Path, tmp_path: Path) -> None:
    """The daemon's scrub killed while taking a corrupt blob out of service."""
    store = tmp_path / "node" / "store"
    _copy(template, store)
    corrupt = _corrupt_weights(store)
    # Not start_daemon: the first scrub pass may kill the daemon before it is seen ready.
    env = {**os.environ, "MODELCACHE_TEST_CRASH_AT": point, "MODELCACHE_API_AUTH": "token"}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelcache", "serve", "--store", str(store), "--listen",
             f"127.0.0.1:{free_port()}", "--csi-socket", str(tmp_path / "csi.sock"), "--scrub-rate", "1G",
             "--scrub-interval", "0.2"], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        assert proc.wait(60) == -signal.SIGKILL, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _after_crash(store, origin, origin.files, corrupt=frozenset({corrupt}))


def test_every_crash_point_is_exercised() -> None:
    """Each named point is killed at somewhere above (and there are at least 20 cases)."""
    cases = CLI_PULL + CLI_UNPACK + CLI_GC + CLI_VERIFY + DAEMON_PULL + DAEMON_SCRUB + DAEMON_MOUNT
    assert {c.partition("@")[0] for c in cases} == set(POINTS) and len(cases) >= 20


def test_an_unset_crash_point_costs_nothing() -> None:
    """Without the variable, a crash point is a return after one comparison (200,000 calls in well
    under a second, even on a loaded machine)."""
    from modelcache.store.crash import crash_point

    assert "MODELCACHE_TEST_CRASH_AT" not in os.environ
    started = time.perf_counter()
    for _ in range(200_000):
        crash_point("view-built")
    assert time.perf_counter() - started < 2.0

