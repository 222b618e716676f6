"""The ``modelcache`` command line: one entry point, one subcommand per job.

Every flag can also be set by an environment variable ``MODELCACHE_<FLAG>``
(dashes become underscores; repeatable flags take a comma-separated list).
Errors are one line on stderr and a non-zero exit code (see ``errors.py``);
results go to stdout, with the path of a pulled model as the last line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from . import __version__
from .errors import InvalidReference, ModelCacheError, NotFound
from .progress import ProgressReporter, human

DEFAULT_STORE = "~/.cache/modelcache"


def _env(name: str, default: object = None) -> object:
    return os.environ.get("MODELCACHE_" + name.upper().replace("-", "_"), default)


def _env_list(name: str) -> list[str]:
    value = _env(name)
    return [v.strip() for v in str(value).split(",") if v.strip()] if value else []


def _env_bool(name: str) -> bool:
    return str(_env(name, "")).lower() in ("1", "true", "yes", "on")


def _size(text: str, *, allow_zero: bool = False) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = units.get(text[-1:], 1)
    try:
        value = int(float(text[:-1] if text[-1:] in units else text) * mult)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 16M)") from e
    if value < 0 or (value == 0 and not allow_zero):
        raise argparse.ArgumentTypeError("size must be positive")
    return value


def _size_or_zero(text: str) -> int:
    return _size(text, allow_zero=True)


def _free(text: str) -> float | int:
    """--min-free: a size, or a percentage of the filesystem returned as a fraction (float)."""
    if text.strip().endswith("%"):
        try:
            percent = float(text.strip()[:-1])
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"not a percentage: {text!r} (try 10%)") from e
        if not 0 < percent < 100:
            raise argparse.ArgumentTypeError("percentage must be between 0 and 100")
        return percent / 100
    return _size(text)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from e
    if value <= 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _seconds(text: str, *, zero: bool = False) -> float:
    """A finite number of seconds, more than 0 (or 0 too, with ``zero``)."""
    try:
        value = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from e
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise argparse.ArgumentTypeError(f"must be {'0 or more' if zero else 'more than 0'} seconds, not {text}")
    return value


def _seconds_or_zero(text: str) -> float:
    return _seconds(text, zero=True)


def _count(text: str) -> int:
    """A whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from e
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _mount_policy(text: str) -> str:
    if text not in ("always", "private", "never"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected always, private or never")
    return text


def _global_flags(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    """The options every command takes, before or after its name.

    On a subcommand the defaults are SUPPRESS, so an option given before the
    subcommand is not reset by the subcommand's own (absent) copy of it.
    """
    flags: list[tuple[tuple[str, ...], dict]] = [
        (("--store",), {"default": _env("store", DEFAULT_STORE) if top else argparse.SUPPRESS,
                        "help": f"store directory (env MODELCACHE_STORE, default {DEFAULT_STORE})"}),
        (("-v", "--verbose"), {"action": "store_true", "default": _env_bool("verbose") if top else argparse.SUPPRESS,
                               "help": "log retries and details to stderr"}),
    ]
    for names, kwargs in flags:
        try:
            p.add_argument(*names, **kwargs)
        except argparse.ArgumentError:  # the subcommand already defines it (serve --store)
            pass


# The commands whose flags cli.py defines itself (prewarm's come from prewarmctl).
_OWN_COMMANDS = ("pull", "ls", "verify", "gc", "package", "serve", "demo")


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The argument parser (defaults read from ``MODELCACHE_*``).

    Defaults from the environment are strings that argparse passes through
    each flag's ``type``, so a bad value is a usage error (exit 2) like a bad flag.
    With ``chosen`` (one of :data:`_OWN_COMMANDS`, as the command line
    names it), what only other commands need is left out: the ``prewarm``
    command (its module is not loaded for a parse that cannot choose it) and
    serve's log flags (issue 13).
    """
    # The module docstring's first line, without its reStructuredText quotes.
    parser = argparse.ArgumentParser(prog="modelcache", description=__doc__.split("\n")[0].replace("``", ""))
    parser.add_argument("--version", action="version", version=f"modelcache {__version__}")
    _global_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)

    pull = sub.add_parser("pull", help="pull a model into the store; print its directory")
    pull.add_argument("ref", help="oci://HOST/REPO[:TAG|@DIGEST], oci-layout:///DIR[:TAG], s3://BUCKET/PREFIX, "
                                  "hf://ORG/NAME[@REVISION], file:///DIR or a path")
    pull.add_argument("--tag", default=_env("tag"), help="the image to pull from an OCI layout in an S3 prefix")
    pull.add_argument("--offline", action="store_true", default=_env_bool("offline"),
                      help="answer from the store alone: the model this reference (with these filters) was last "
                           "pulled as, without asking the origin whether a tag moved; fails if it was never pulled")
    _transfer_flags(pull)
    _peer_flags(pull, serving=False)

    ls = sub.add_parser("ls", help="list cached models")
    ls.add_argument("--json", action="store_true", default=_env_bool("json"), help="print JSON")

    verify = sub.add_parser("verify", help="re-hash every blob; report corrupt ones")
    verify.add_argument("--json", action="store_true", default=_env_bool("json"), help="print JSON")
    verify.add_argument("--delete", action="store_true", default=_env_bool("delete"),
                        help="delete corrupt blobs (and drop, or move aside if mounted, their models' views) "
                             "so the next pull fetches them again")
    verify.add_argument("--sha256", action="store_true", default=_env_bool("sha256"),
                        help="check every blob's sha256 (default: the xxh3 recorded at commit where there is "
                             "one, which is faster; sha256 for the rest)")

    gc = sub.add_parser("gc", help="evict least recently used models (never pinned or mounted ones)")
    gc.add_argument("--max-size", type=_size_or_zero, default=_env("max_size"),
                    help="evict until the store holds at most SIZE (e.g. 500G); default: evict nothing, "
                         "only remove blobs no model uses")
    gc.add_argument("--ingest-max-age", type=_seconds_or_zero, default=_env("ingest_max_age"),
                    help="also remove partial downloads untouched for this many seconds")
    gc.add_argument("--json", action="store_true", default=_env_bool("json"), help="print JSON")

    pkg = sub.add_parser("package", help="package a weights directory as an OCI image (or ModelPack) and push it")
    pkg.add_argument("source", help="a directory, or any reference `pull` understands (pulled first)")
    pkg.add_argument("--to", required=not _env("to"), default=_env("to"),
                     help="oci://HOST/REPO:TAG, oci-layout:///DIR:TAG, s3://BUCKET/PREFIX[:TAG], or DIR:TAG for a "
                          "layout (DIR absolute, ./relative or an existing directory)")
    pkg.add_argument("--format", choices=("image", "modelpack"), default=_env("format", "image"),
                     help="image: tar layers for Image VolumeSource (default); modelpack: a ModelPack artifact")
    pkg.add_argument("--prefix", default=_env("prefix", ""),
                     help="image format: put the files under this directory (e.g. models); default: the root")
    pkg.add_argument("--large-file", type=_size, default=_env("large_file", "16M"),
                     help="image format: files at least this big get a layer of their own (default %(default)s)")
    pkg.add_argument("--follow-symlinks", action="store_true", default=_env_bool("follow_symlinks"),
                     help="package the targets of symlinks that stay inside the directory (default: refuse links)")
    pkg.add_argument("--name", default=_env("name"), help="modelpack format: the model's name (default: the dir)")
    pkg.add_argument("--upload-chunk", type=_size, default=_env("upload_chunk", "32M"),
                     help="PATCH chunk size for large blobs (default %(default)s)")
    _transfer_flags(pkg, with_filters=False)

    serve = sub.add_parser("serve", help="run the node daemon: HTTP API and the CSI node plugin")
    # Also after `serve`, as the docs write it; SUPPRESS keeps the top-level value when absent.
    serve.add_argument("--store", default=argparse.SUPPRESS, help="store directory (as the global --store)")
    serve.add_argument("--listen", default=_env("listen", "127.0.0.1:8470"),
                       help="HOST:PORT of the HTTP API (default %(default)s)")
    serve.add_argument("--csi-socket", default=_env("csi_socket", "/csi/csi.sock"),
                       help="unix socket of the CSI plugin (default %(default)s)")
    serve.add_argument("--node-name", default=_env("node_name", os.uname().nodename),
                       help="node id reported to kubelet (default: the host name)")
    serve.add_argument("--api-auth", choices=("token", "kubernetes", "none"), default=_env("api_auth"),
                       help="how API callers authenticate: token (a bearer token file), kubernetes (TokenReview "
                            "and SubjectAccessReview) or none (no check); default: kubernetes in a cluster, "
                            "else token")
    serve.add_argument("--api-token-file", default=_env("api_token_file"), metavar="PATH",
                       help="token mode: the bearer token callers send (default: <store>/api-token, made on "
                            "first start, mode 0600)")
    serve.add_argument("--kubeconfig", default=_env("kubeconfig"), metavar="PATH",
                       help="the Kubernetes API server: for kubernetes mode's reviews and the pre-warm controller "
                            "(default: in-cluster config)")
    serve.add_argument("--prewarm", choices=("on", "off"), default=_env("prewarm"),
                       help="run the ModelPrewarm controller: pull, pin and label what the node is chosen for "
                            "(default: on with --kubeconfig or inside a cluster, else off)")
    serve.add_argument("--prewarm-namespace", default=_env("prewarm_namespace", ""), metavar="NAMESPACE",
                       help="namespace of the Lease that picks the daemon writing aggregate status "
                            "(default: the pod's own, else modelcache-system)")
    serve.add_argument("--startup-taint", default=_env("startup_taint"), metavar="KEY",
                       help="remove this taint from the node once every ModelPrewarm choosing it is Ready here")
    serve.add_argument("--startup-timeout", type=_seconds, default=_env("startup_timeout", "600"),
                       metavar="SECONDS", help="remove the startup taint after this long anyway (default %(default)s)")
    serve.add_argument("--prewarm-resync", type=_seconds, default=_env("prewarm_resync", "300"), metavar="SECONDS",
                       help="reconcile every ModelPrewarm this often, checking warm models are still on disk "
                            "(default %(default)s)")
    serve.add_argument("--prewarm-progress", type=_seconds, default=_env("prewarm_progress", "10"), metavar="SECONDS",
                       help="how often a pulling node updates its bytes in a ModelPrewarm's status "
                            "(default %(default)s)")
    serve.add_argument("--lease-duration", type=_seconds, default=_env("lease_duration", "15"), metavar="SECONDS",
                       help="the leader Lease's duration (renewed every fifth of it; default %(default)s)")
    serve.add_argument("--api-auth-cache-ttl", type=_seconds_or_zero, default=_env("api_auth_cache_ttl", "10"),
                       metavar="SECONDS", help="kubernetes mode: seconds a review's answer is reused, yes or no "
                                               "(default %(default)s; 0: review every request)")
    serve.add_argument("--mount-credential-check", type=_mount_policy, metavar="{always,private,never}",
                       default=_env("mount_credential_check", "private"),
                       help="check a pod's volume credentials at the origin before mounting a cached model: "
                            "private = models that needed credentials (default), always = every model, "
                            "never = no check (env MODELCACHE_MOUNT_CREDENTIAL_CHECK)")
    serve.add_argument("--mount-credential-ttl", type=_seconds_or_zero,
                       default=_env("mount_credential_ttl", "60"),
                       help="seconds an origin's answer to that check is reused (env MODELCACHE_MOUNT_CREDENTIAL_TTL)")
    serve.add_argument("--allow-local", action="append", default=_env_list("allow_local"), metavar="PATH",
                       help="let the API and CSI volumes name host directories under PATH (repeatable; "
                            "default: none, only oci:// s3:// hf:// references)")
    serve.add_argument("--max-pulls", type=_positive, default=_env("max_pulls", 16),
                       help="pull jobs queued or running at once; more get 429 (default %(default)s)")
    serve.add_argument("--max-size", type=_size, default=_env("max_size"),
                       help="keep committed blobs under SIZE, evicting LRU models no one holds (default: no limit)")
    serve.add_argument("--min-free", type=_free, default=_env("min_free"),
                       help="keep SIZE or PERCENT%% of the store's filesystem free, the same way (default: no limit)")
    serve.add_argument("--scrub-rate", type=_size_or_zero, default=_env("scrub_rate", "50M"),
                       metavar="BYTES_PER_SEC", help="re-check committed blobs in the background at most this "
                                                     "fast (default %(default)s; 0: no scrub)")
    serve.add_argument("--scrub-interval", type=_seconds_or_zero, default=_env("scrub_interval", "86400"),
                       metavar="SECONDS", help="rest between two scrub passes (default %(default)s)")
    _transfer_flags(serve, with_filters=False, quiet=False)
    _peer_flags(serve, serving=True)

    demo = sub.add_parser("demo", help="make a demo model as an OCI layout and pull it (no network)")
    demo.add_argument("--size", type=_size, default=_env("size", "256M"),
                      help="total size of the demo weights (default %(default)s)")
    demo.add_argument("--files", type=_positive, default=_env("files", 4), help="number of weight files")
    demo.add_argument("--dir", default=_env("dir"), help="where to write the layout (default: a temp dir)")
    _transfer_flags(demo, with_filters=False)

    if chosen not in _OWN_COMMANDS:
        from .prewarmctl import add_parser as add_prewarm

        add_prewarm(sub, _env, _env_list, _env_bool, _positive, _seconds)
    for command in sub.choices.values():
        _global_flags(command)
    if chosen in (None, "serve"):  # its module loads logging, which a warm pull need not
        _log_flags(sub.choices["serve"])
    return parser


def _peer_flags(p: argparse.ArgumentParser, *, serving: bool) -> None:
    """Peer-to-peer sharing (issue 11): off unless --peer-secret-file is given."""
    p.add_argument("--peers", default=_env("peers"), metavar="URL,...",
                   help="other daemons' base URLs (http://HOST:PORT), comma separated; this daemon's own is skipped")
    p.add_argument("--peers-dns", default=_env("peers_dns"), metavar="NAME[:PORT]",
                   help="find peers as the A/AAAA records of NAME (a headless Service), re-resolved every 10 s; "
                        "PORT defaults to this daemon's --listen port")
    p.add_argument("--peers-k8s-service", default=_env("peers_k8s_service"), metavar="NAMESPACE/NAME[:PORT]",
                   help="find peers as the ready endpoints of this Service's EndpointSlices, watched through the "
                        "Kubernetes API (in-cluster config, else --kubeconfig or ~/.kube/config); PORT (a port "
                        "name or number) defaults to the slice's only port, else this daemon's --listen port")
    p.add_argument("--peer-secret-file", default=_env("peer_secret_file"), metavar="PATH",
                   help="the secret shared by every peer (>= 16 bytes) that signs peer requests; without it "
                        "peer sharing is off")
    p.add_argument("--peer-timeout", type=_seconds, default=_env("peer_timeout", "5"), metavar="SECONDS",
                   help="a peer silent this long mid-piece is abandoned; the piece resumes elsewhere "
                        "(default %(default)s)")
    if serving:
        p.add_argument("--peer-upload-limit", type=_size_or_zero, default=_env("peer_upload_limit", "0"),
                       metavar="SIZE", help="bytes per second served to peers (default 0: no limit)")


def _peer_config(args: argparse.Namespace):
    if not (args.peer_secret_file or args.peers or args.peers_dns):
        return None  # peer sharing off: p2p (and its HTTP server and client) is not even imported
    from .p2p.node import from_flags

    limit = getattr(args, "peer_upload_limit", 0)
    listen = getattr(args, "listen", None)
    kubeconfig = getattr(args, "kubeconfig", None)
    node_name = getattr(args, "node_name", None)
    return from_flags(secret_file=args.peer_secret_file, peers=args.peers, peers_dns=args.peers_dns,
                      listen=str(listen) if listen else None,
                      upload_limit=limit if isinstance(limit, int) else _size_or_zero(str(limit)),
                      read_timeout=float(args.peer_timeout), peers_k8s_service=args.peers_k8s_service,
                      kubeconfig=Path(kubeconfig).expanduser() if kubeconfig else None,
                      node_name=str(node_name) if node_name else None)


def _log_flags(p: argparse.ArgumentParser) -> None:
    """How the daemon logs (it logs at INFO: what it serves, each pull's progress)."""
    from .logs import FORMATS

    p.add_argument("--log-format", choices=FORMATS, default=_env("log_format", "text"),
                   help="text, or json: one JSON object per line with time, level, logger, message "
                        "(default %(default)s)")


def _transfer_flags(p: argparse.ArgumentParser, *, with_filters: bool = True, quiet: bool = True) -> None:
    if with_filters:
        p.add_argument("--include", action="append", default=_env_list("include"), metavar="GLOB",
                       help="only files matching GLOB (repeatable; * matches across /)")
        p.add_argument("--exclude", action="append", default=_env_list("exclude"), metavar="GLOB",
                       help="skip files matching GLOB (repeatable)")
    p.add_argument("--concurrency", type=_positive, default=_env("concurrency", 8),
                   help="parallel range requests (default %(default)s)")
    p.add_argument("--chunk-size", type=_size, default=_env("chunk_size", "16M"),
                   help="bytes per range request (default %(default)s)")
    p.add_argument("--plain-http", action="store_true", default=_env_bool("plain_http"),
                   help="speak plain HTTP to the registry (automatic for loopback)")
    p.add_argument("--read-timeout", type=_seconds, default=_env("read_timeout", "30"),
                   help="seconds a read may stall before the request is retried (default %(default)s)")
    p.add_argument("--retries", type=_count, default=_env("retries", "6"),
                   help="retries per chunk (default %(default)s)")
    if quiet:
        p.add_argument("--quiet", "-q", action="store_true", default=_env_bool("quiet"), help="no progress output")


def _command_in(argv: Sequence[str]) -> str | None:
    """The command word of a command line: the first word that is neither an option nor the value of
    ``--store`` (the one global option that takes a value); None if there is none."""
    value_next = False
    for word in argv:
        if value_next:
            value_next = False
        elif word == "--store":
            value_next = True
        elif not word.startswith("-"):
            return word
    return None


def _configure_logging(args: argparse.Namespace) -> None:
    """Logs to stderr. Done once a command goes past the store (a warm hit logs nothing, nor loads logging)."""
    import logging

    from .logs import configure

    # The daemon's routine events (serving, progress of pulls) are INFO: shown by default there.
    configure(level=logging.INFO if args.verbose or args.command == "serve" else logging.WARNING,
              fmt=str(getattr(args, "log_format", "text")))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    if args.command != "pull":  # pull configures it after looking in the store (_cmd_pull)
        _configure_logging(args)
    try:
        if args.command == "pull":
            return _cmd_pull(args)
        if args.command == "ls":
            return _cmd_ls(args)
        if args.command == "verify":
            import asyncio

            return asyncio.run(_cmd_verify(args))
        if args.command == "package":
            return _cmd_package(args)
        if args.command == "serve":
            return _cmd_serve(args)
        if args.command == "gc":
            return _cmd_gc(args)
        if args.command == "demo":
            import asyncio

            return asyncio.run(_cmd_demo(args))
        if args.command == "prewarm":
            from .prewarmctl import run as prewarm

            return prewarm(args)
    except ModelCacheError as e:
        print(f"modelcache: error: {e}", file=sys.stderr)
        return e.exit_code
    except (KeyboardInterrupt, _Terminated) as e:
        print("modelcache: interrupted (partial downloads are kept and resume next time)", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    except OSError as e:
        print(f"modelcache: error: {e.strerror or e}{': ' + str(e.filename) if e.filename else ''}",
              file=sys.stderr)
        return 1
    except sqlite3.Error as e:
        print(f"modelcache: error: store index {args.store}/index.sqlite: {e}", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")
    return 2


def run() -> None:
    """The ``modelcache`` command: :func:`main`, then exit at once with its code.

    When a command returns, its work is done: files durable, the index
    closed, every thread idle. Tearing down the interpreter (every module
    and object it loaded) would then cost a quarter of a warm pull's CPU
    time, so only what a user sees is flushed (logs, stdout, stderr) and the
    process ends without it. An exception escaping :func:`main` ends the
    usual way.
    """
    code = main()
    logging = sys.modules.get("logging")
    if logging is not None:  # loaded by a command that could log (a warm pull does not)
        logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # the reader went away (`modelcache ls | head`): what was printed is lost
        code = code or 1
    os._exit(code)


def _store_path(args: argparse.Namespace) -> Path:
    """The --store directory; something else at that path is a flag error, not an OSError later."""
    path = Path(str(args.store)).expanduser()
    if path.exists() and not path.is_dir():
        raise InvalidReference(f"--store {path}: not a directory")
    return path


def _open_store(args: argparse.Namespace):
    from .store import Store

    return Store(_store_path(args))


async def _pull(args: argparse.Namespace, ref: str, filters, *, quiet_path: bool = False,
                tag: str | None = None) -> int:
    import asyncio

    from .pull import pull
    from .transfer import Engine

    store = _open_store(args)
    transfer, options = _transfer_options(args)
    engine = Engine(store.content, transfer)
    reporter = ProgressReporter(f"pull {ref}", quiet=args.quiet)
    peers = None
    peer_config = _peer_config(args) if hasattr(args, "peer_secret_file") else None
    if peer_config is not None:
        from .p2p.node import PeerNode

        peers = PeerNode(peer_config)
    # Discovery that must look something up (DNS, the Kubernetes API) runs while this pull does.
    watching = asyncio.create_task(peers.run()) if peers is not None else None
    try:
        async with _terminate_as_interrupt():
            if peers is not None:
                await peers.discovered(5.0)
            result = await pull(store, engine, ref, filters=filters, options=options, progress=reporter, tag=tag,
                                routing=peers.router if peers is not None else None, drops_later=True)
    finally:
        reporter.close()
        engine.close()
        # The layers dropped once unpacked that the background unlinker has not reached yet go to an rm of
        # their own, which this command does not wait for (on a disk with online discard, unlinking them
        # took the last 0.3-0.5 s of a 1 GiB pull).
        store.content.delete_deferred(detach=True)
        store.close()
        if watching is not None:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
        if peers is not None:
            await peers.close()
    s = result.stats
    rate = s.bytes_fetched / result.seconds if result.seconds > 0 else 0.0
    from_peers = sum(n for name, n in s.fetched_by_source.items() if name.startswith("peer://"))
    if not args.quiet:
        peer_part = f" ({human(from_peers)} from peers)" if peers is not None else ""
        print(f"{result.ref}: {result.files} files, {human(result.size)}; fetched {human(s.bytes_fetched)}"
              f"{peer_part} in {result.seconds:.2f}s ({human(rate)}/s), reused {human(s.bytes_reused)}, "
              f"{s.chunks_retried} chunk retries", file=sys.stderr)
    if not quiet_path:
        print(result.path)
    return 0


class _Terminated(Exception):
    """SIGTERM ended a pull (after it kept what arrived)."""


@contextlib.asynccontextmanager
async def _terminate_as_interrupt() -> AsyncIterator[None]:
    """SIGTERM cancels the body as Ctrl-C does, so a pull keeps every byte it received (issue 10);
    the command then ends with exit 143."""
    import asyncio

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    terminated = False

    def terminate() -> None:
        nonlocal terminated
        if not terminated:  # once: a second cancel would cut short the saving of what arrived
            terminated = True
            task.cancel()

    loop.add_signal_handler(signal.SIGTERM, terminate)
    try:
        yield
    except asyncio.CancelledError:
        if terminated:
            raise _Terminated from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def _cmd_pull(args: argparse.Namespace) -> int:
    from .tree import Filters

    filters = Filters.of(args.include, args.exclude)
    found = _from_store(args, filters)
    if found is not None:
        return found
    _configure_logging(args)
    import asyncio

    return asyncio.run(_pull(args, args.ref, filters, tag=args.tag))


def _from_store(args: argparse.Namespace, filters) -> int | None:
    """A warm hit answered with the index alone: no source, no event loop, no transfer engine (issue 13).

    The answer is the view the reference and filters were last recorded as,
    if its row and tree are there (:meth:`Index.use_view`), and only where
    the origin has nothing to add:

    - the reference names its content by digest (:func:`~.refs.pinned`) and
      needed no credentials at its origin when it was pulled: no network at
      all (a private model is asked at its origin, as a mount of it is);
    - a registry tag: the registry is asked what the tag names now, with one
      blocking GET (:func:`~.sources.tagdigest.tag_digest`), and the view is
      used only if it was recorded from that very manifest;
    - ``--offline``: any reference, without asking.

    Otherwise None, and the pull takes its full path (``--offline``: NotFound).
    """
    import dataclasses

    from .refs import OciRef, S3Ref, parse, pinned

    ref = parse(str(args.ref))
    if args.tag and isinstance(ref, S3Ref):
        ref = dataclasses.replace(ref, tag=args.tag)
    if not (args.offline or pinned(ref) or isinstance(ref, OciRef)):
        return None
    root = _store_path(args).absolute()
    views = root / "views"
    key = (str(ref), filters.key())

    def present(view: str) -> bool:
        return (views / view.partition(":")[2]).is_dir()

    found = None
    if (root / "index.sqlite").is_file():  # a miss never creates a store here: the pull does, or --offline fails
        from .store.index import Index

        index = Index(root / "index.sqlite")
        try:
            if args.offline:
                found = index.use_view(*key, present)
            elif pinned(ref):
                if index.origin_needed_credentials(key[0]) is False:
                    found = index.use_view(*key, present)
            elif isinstance(ref, OciRef) and index.lookup(*key) is not None:  # a cold pull asks only once
                from .sources.tagdigest import tag_digest

                digest = tag_digest(ref, plain_http=bool(args.plain_http), read_timeout=float(args.read_timeout))
                if digest is not None:
                    # Answered anonymously: it needs no credentials now (as the full path would record).
                    found = index.use_view(*key, present, model_digest=digest, needed_credentials=False)
        finally:
            index.close()
    if found is None:
        if args.offline:
            with_filters = f" with {filters.key()}" if filters.key() else ""
            raise NotFound(f"{ref}{with_filters} is not in the store (--offline: the origin was not asked)")
        return None
    view, size, files = found
    if not args.quiet:
        print(f"{ref}: {files} files, {human(size)}; in the store, nothing fetched", file=sys.stderr)
    print(views / view.partition(":")[2])
    return 0


def _cmd_ls(args: argparse.Namespace) -> int:
    import datetime

    root = _store_path(args)
    records = []
    if (root / "index.sqlite").is_file():  # listing never creates a store
        store = _open_store(args)
        try:
            records = store.index.records()
        finally:
            store.close()
    views = root.expanduser().absolute() / "views"
    rows = [
        {"ref": r.ref, "filters": r.filters, "digest": r.model_digest, "size": r.size, "files": r.files,
         "last_used": datetime.datetime.fromtimestamp(r.last_used, datetime.UTC).isoformat(timespec="seconds"),
         "path": str(views / r.view.partition(":")[2]), "pinned": r.pinned, "leases": r.leases}
        for r in records
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no cached models", file=sys.stderr)
        return 0
    header = ("REF", "DIGEST", "SIZE", "FILES", "LAST USED")
    table = [(r["ref"] + (f" [{r['filters']}]" if r["filters"] else ""), r["digest"][:19], human(r["size"]),
              str(r["files"]), r["last_used"]) for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    for line in [header, *table]:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    return 0


async def _cmd_verify(args: argparse.Namespace) -> int:
    import asyncio

    from .store.scrub import verify

    store = _open_store(args)
    try:
        digests = list(store.content.digests())
        limit = asyncio.Semaphore(os.cpu_count() or 2)

        async def check(digest: str) -> dict | None:
            # A blob removed beside us (gc) is gone, not corrupt (store.scrub).
            async with limit:
                found = await asyncio.to_thread(verify, store, digest, sha256=bool(args.sha256),
                                                delete=bool(args.delete))
            return found.as_json() if found else None

        corrupt = [c for c in await asyncio.gather(*(check(d) for d in digests)) if c]
    finally:
        store.close()
    if args.json:
        print(json.dumps({"checked": len(digests), "corrupt": corrupt}, indent=2))
    else:
        for c in corrupt:
            print(f"CORRUPT {c['blob']} (content hashes to {c['actual']})"
                  f"{' - deleted' if c['deleted'] else ''}")
        print(f"checked {len(digests)} blobs: {len(corrupt)} corrupt")
    return 5 if corrupt else 0


def _transfer_options(args: argparse.Namespace):
    from .sources import SourceOptions
    from .transfer import TransferConfig

    chunk = args.chunk_size if isinstance(args.chunk_size, int) else _size(str(args.chunk_size))
    return (TransferConfig(chunk_size=chunk, concurrency=int(args.concurrency), retries=int(args.retries)),
            SourceOptions(plain_http=args.plain_http, read_timeout=float(args.read_timeout),
                          connections=max(16, int(args.concurrency) * 2)))


def _cmd_serve(args: argparse.Namespace) -> int:
    from .daemon.auth import AuthConfig, default_mode
    from .daemon.prewarm import PrewarmConfig, prewarm_default
    from .daemon.server import DaemonConfig, run
    from .store.budget import Budget

    transfer, sources = _transfer_options(args)
    mode = str(args.api_auth or default_mode())
    kubeconfig = Path(args.kubeconfig).expanduser() if args.kubeconfig else None
    if args.prewarm not in (None, "on", "off"):
        raise InvalidReference(f"MODELCACHE_PREWARM={args.prewarm!r}: expected on or off")
    prewarm = None
    if args.prewarm == "on" or (args.prewarm is None and prewarm_default(args.kubeconfig)):
        prewarm = PrewarmConfig(kubeconfig=kubeconfig, namespace=str(args.prewarm_namespace),
                                startup_taint=args.startup_taint or None,
                                startup_timeout=float(args.startup_timeout), resync=float(args.prewarm_resync),
                                lease_duration=float(args.lease_duration),
                                progress_interval=float(args.prewarm_progress))
    elif args.startup_taint:
        raise InvalidReference("--startup-taint needs the pre-warm controller (--prewarm on)")
    elif kubeconfig is not None and mode != "kubernetes" and not args.peers_k8s_service:
        raise InvalidReference(f"--kubeconfig is for --api-auth kubernetes, --prewarm on or --peers-k8s-service, "
                               f"not {mode} alone")
    auth = AuthConfig(mode=mode,
                      token_file=Path(args.api_token_file).expanduser() if args.api_token_file else None,
                      kubeconfig=kubeconfig if mode == "kubernetes" else None,
                      cache_ttl=float(args.api_auth_cache_ttl))
    # Values from the environment arrive as text: parse them as the flags would be.
    max_size = None if args.max_size is None else _size(str(args.max_size))
    free = None if args.min_free is None else _free(str(args.min_free))
    budget = Budget(max_size=max_size, min_free=free if isinstance(free, int) else None,
                    min_free_ratio=free if isinstance(free, float) else None)
    config = DaemonConfig(store=Path(str(args.store)).expanduser(), listen=str(args.listen),
                          csi_socket=Path(str(args.csi_socket)), node_name=str(args.node_name),
                          transfer=transfer, sources=sources, auth=auth, budget=budget,
                          mount_credential_check=str(args.mount_credential_check),
                          mount_credential_ttl=float(args.mount_credential_ttl), max_pulls=int(args.max_pulls),
                          scrub_rate=_size_or_zero(str(args.scrub_rate)),
                          scrub_interval=_seconds_or_zero(str(args.scrub_interval)),
                          allow_local=tuple(Path(p).expanduser() for p in args.allow_local), prewarm=prewarm,
                          peers=_peer_config(args))
    import asyncio

    asyncio.run(run(config))
    return 0


def _package_target(text: str):
    """The --to reference: oci://, oci-layout://, s3://, or DIR:TAG for a layout.

    ``DIR:TAG`` is a layout only when DIR is clearly a path: absolute, ``./``,
    ``../`` or ``~`` relative, or an existing directory. Anything else
    (``127.0.0.1:5000/models/x:v1``, ``registry.example/x:v1``) is refused
    with a hint: a registry reference without ``oci://`` must not quietly
    become a directory of that name.
    """
    from .refs import LayoutRef, lower_scheme, parse

    text = lower_scheme(text)
    if text.startswith("s3://"):
        bucket, _, rest = text[5:].partition("/")
        path, sep, tag = rest.rpartition(":") if ":" in rest.rsplit("/", 1)[-1] else (rest, "", "latest")
        if not bucket:
            raise InvalidReference(f"--to {text!r}: expected s3://BUCKET/PREFIX[:TAG]")
        return ("s3", bucket, path.strip("/"), tag or "latest")
    expected = "expected oci://HOST/REPO:TAG, oci-layout:///DIR:TAG, DIR:TAG or s3://BUCKET/PREFIX[:TAG]"
    if text.startswith(("oci://", "oci-layout://")):
        ref = parse(text)
    else:
        head, sep, tag = text.rpartition(":")
        if not sep or not head or "/" in tag or "://" in text:
            raise InvalidReference(f"--to {text!r}: {expected}")
        if not (head.startswith(("/", "./", "../", "~")) or Path(head).is_dir()):
            raise InvalidReference(f"--to {text!r}: no scheme; did you mean oci://{text} (a registry)? "
                                   f"A layout directory is oci-layout://DIR:TAG, or DIR:TAG with DIR "
                                   f"absolute, ./relative or existing")
        ref = LayoutRef(Path(head).expanduser().absolute(), tag=tag)
    if getattr(ref, "digest", None):
        raise InvalidReference(f"--to {text!r} names a digest; name the tag to write")
    return ref


def _cmd_package(args: argparse.Namespace) -> int:
    import asyncio

    from .refs import lower_scheme

    source_is_dir = Path(str(args.source)).is_dir() and "://" not in lower_scheme(str(args.source))
    return asyncio.run(_package(args, _package_target(str(args.to)), source_is_dir))


async def _package(args: argparse.Namespace, target_ref, source_is_dir: bool) -> int:
    from .package.build import PackageOptions, build, publish
    from .package.targets import LayoutTarget, RegistryTarget, S3LayoutTarget, Target
    from .refs import DirRef, LayoutRef, OciRef, parse
    from .transfer import TransferStats
    from .tree import Filters

    source = Path(str(args.source))
    follow = bool(args.follow_symlinks)
    store = None
    if not source_is_dir:
        parsed = parse(str(args.source))
        if not isinstance(parsed, DirRef):
            await _pull(args, str(parsed), Filters(), quiet_path=True)
            store = _open_store(args)
            found = store.index.lookup(str(parsed), "")
            assert found is not None
            source, follow = store.views_dir / found[0].partition(":")[2], True
    name = str(args.name or source.name)
    transfer, sources = _transfer_options(args)
    options = PackageOptions(format=str(args.format), prefix=str(args.prefix), large_file=int(args.large_file),
                             concurrency=int(args.concurrency), follow_symlinks=follow, name=name)
    store = store or _open_store(args)
    target: Target
    if isinstance(target_ref, OciRef):
        if target_ref.digest:
            raise InvalidReference("--to names a tag to write, not a digest")
        registry = target_ref.host
        target = RegistryTarget(target_ref, sources, chunk_size=int(args.upload_chunk),
                                mount_from=lambda digest: store.index.pushed_to(registry, digest))
        tag = target_ref.tag or "latest"
    elif isinstance(target_ref, tuple):
        _, bucket, prefix, tag = target_ref
        target = S3LayoutTarget(bucket, prefix, tag, concurrency=int(args.concurrency))
    else:
        assert isinstance(target_ref, LayoutRef)
        target, tag = LayoutTarget(target_ref.path, target_ref.tag or "latest"), target_ref.tag or "latest"
    reporter = ProgressReporter(f"package {source.name} -> {target.name}", quiet=args.quiet)
    shown = TransferStats()
    try:
        package = await build(source, options)

        def progress(stats) -> None:
            shown.bytes_total, shown.bytes_done = stats.bytes_total, stats.bytes_uploaded
            shown.bytes_fetched = stats.bytes_uploaded
            reporter(shown)

        stats = await publish(package, target, tag, concurrency=int(args.concurrency), progress=progress)
        if isinstance(target_ref, OciRef):
            store.index.record_pushed(target_ref.host, target_ref.repository, stats.pushed)
    finally:
        reporter.close()
        await target.close()
        store.close()
    if not args.quiet:
        print(f"{target.name}: {stats.files} files in {stats.layers} layers, {human(stats.bytes_total)}; "
              f"uploaded {human(stats.bytes_uploaded)} ({stats.uploaded} blobs), {stats.mounted} mounted, "
              f"{stats.present} already there", file=sys.stderr)
    print(package.digest)
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    import dataclasses

    from .store.gc import collect

    store = _open_store(args)
    try:
        max_bytes = None if args.max_size is None else _size_or_zero(str(args.max_size))
        age = None if args.ingest_max_age is None else float(args.ingest_max_age)
        report = collect(store, max_bytes=max_bytes, ingest_max_age=age)
    finally:
        store.close()
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=2))
    else:
        print(f"evicted {len(report.views_removed)} models, removed {report.blobs_removed} blobs "
              f"({human(report.bytes_freed)}), {report.ingests_removed} partial downloads; "
              f"{human(report.bytes_kept)} kept"
              + (f"; removed {len(report.corrupt_views_removed)} corrupt views no pod mounts any more"
                 if report.corrupt_views_removed else ""))
    return 0


async def _cmd_demo(args: argparse.Namespace) -> int:
    import asyncio
    import shutil
    import tempfile

    from .demo import make_demo_layout
    from .tree import Filters

    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="modelcache-demo-"))
    size = args.size if isinstance(args.size, int) else _size(str(args.size))
    try:
        layout = await asyncio.to_thread(make_demo_layout, base, total=size, files=int(args.files))
        # The count and size are stated once, by the pull's summary, as pulled (weights plus config.json).
        print(f"demo model written as an OCI layout in {layout}", file=sys.stderr)
        return await _pull(args, f"oci-layout://{layout}:demo", Filters())
    finally:
        if not args.dir:  # the pulled model lives on in the store; the demo source need not
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
