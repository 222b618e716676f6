#!/usr/bin/env python3
"""Run every benchmark in tools/ and write BENCHMARKS.md (and PNG plots beside it).

One command::

    python tools/bench_report.py              # everything, as each benchmark's defaults say
    python tools/bench_report.py --quick      # smaller models and fewer runs, for a first look

Each benchmark runs as its own process, as a person would run it; what it
measured comes back through ``$MODELCACHE_BENCH_JSON`` (``benchlib.record``)
and its printed lines are kept in the report too. The report states the
machine it ran on, gives medians and ratios (ours against the ceiling, the
peer tools' time against ours), and plots throughput against concurrency
and chunk size and resume waste against the point of interruption (needs
matplotlib: ``pip install -e '.[bench]'``; without it the tables stay and
the plots are skipped). A benchmark that fails is reported as failed; the
others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent

# name, script, arguments (full), arguments (--quick), needs root
BENCHMARKS: list[tuple[str, str, list[str], list[str], bool]] = [
    ("registry pull", "bench_pull.py", [], ["--size", "0.5", "--runs", "2"], False),
    ("layer formats: modelpack, image, tar, gzip, zstd", "bench_formats.py", [], ["--quick"], False),
    # Issue 13's small model: 150 MB in three gzip layers, cold against containerd, then warm hits.
    ("small model: cold pull and warm hits", "bench_formats.py",
     ["--formats", "gzip", "--size", "0.14", "--files", "3", "--runs", "5", "--warm", "10"],
     ["--formats", "gzip", "--size", "0.14", "--files", "3", "--runs", "2", "--warm", "5"], False),
    ("S3 and Hub pulls", "bench_sources.py", [], ["--size", "0.5", "--runs", "2"], False),
    ("package and push", "bench_package.py", [], ["--size", "0.5", "--runs", "2"], False),
    ("CSI publish", "bench_csi.py", [], ["--large", "1", "--runs", "2", "--calls", "20"], True),
    ("sweeps and resume", "bench_sweep.py", [], ["--size", "0.25", "--runs", "1"], False),
    ("peers in a cluster, simulated", "sim_p2p.py", [], ["--quick"], False),
]


def machine() -> list[str]:
    """What the figures were measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    disk = subprocess.run(["df", "-h", "--output=source,fstype,size", "/var/tmp"], capture_output=True,
                          text=True).stdout.strip().splitlines()[-1:]
    return [f"- CPU: {cpu}, {os.cpu_count()} cores; memory {mem:.0f} GiB",
            f"- kernel {platform.release()}, Python {platform.python_version()}",
            f"- /var/tmp (where the benchmarks work): {' '.join(disk[0].split()) if disk else 'unknown'}",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"]


def run(script: str, args: Sequence[str], results: Path) -> tuple[int, str, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(TOOLS / script), *args], capture_output=True, text=True,
                          env={**os.environ, "MODELCACHE_BENCH_JSON": str(results), "PYTHONPATH": str(ROOT)})
    return proc.returncode, proc.stdout + (proc.stderr[-3000:] if proc.returncode else ""), time.monotonic() - started


def comparison_table(rows: list[dict]) -> list[str]:
    out = ["| benchmark | ours / ceiling | the ceiling (slowest resource alone) | peers: their time / ours | "
           "peak RSS ours |", "|---|---|---|---|---|"]
    for r in rows:
        ceiling = max(r["ceilings"].values(), key=lambda c: c["median"])
        gb = r["bytes"] / 1e9
        peers = ", ".join(f"{p['name']} {p['median'] / r['ours']['median']:.2f}x" for p in r["peers"]) or "-"
        out.append(f"| {r['title']} ({r['bytes'] / (1 << 30):.2f} GiB, {r['runs']} runs) | "
                   f"**{ceiling['median'] / r['ours']['median']:.2f}** | {ceiling['name']}: "
                   f"{gb / ceiling['median']:.2f} GB/s | {peers} | {r['ours']['rss'] / (1 << 20):.0f} MiB |")
    return out


def startup_table(rows: list[dict]) -> list[str]:
    """Warm hits: the whole command, model already in the store, beside the bare interpreter."""
    if not rows:
        return []
    out = ["| warm hit | median | the interpreter alone (`python -c pass`) |", "|---|---|---|"]
    out += [f"| {r['title']} ({r['runs']} runs) | **{1000 * r['warm']:.0f} ms** | {1000 * r['interpreter']:.0f} ms |"
            for r in rows]
    return [*out, ""]


def plots(records: list[dict], out_dir: Path) -> list[str]:
    """PNG plots of the sweeps and the resume waste; returns Markdown lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["(plots skipped: matplotlib is not installed; `pip install -e '.[bench]'`)"]
    lines = []
    sweeps = [r for r in records if r["kind"] == "sweep"]
    if sweeps:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, param, label in ((axes[0], "concurrency", "--concurrency (chunk size 16M)"),
                                 (axes[1], "chunk_size", "--chunk-size (concurrency 8)")):
            points = [r for r in sweeps if r["param"] == param]
            ax.plot([p["value"] for p in points], [p["gbps"] for p in points], marker="o", label="modelcache pull")
            ax.plot([p["value"] for p in points], [p["bytes"] / 1e9 / p["ceiling_seconds"] for p in points],
                    linestyle="--", label="disk ceiling (8 dd + fsync)")
            ax.set_xlabel(label)
            ax.set_ylabel("GB/s")
            ax.set_ylim(bottom=0)
            ax.legend()
        fig.suptitle("Cold pull throughput from a local registry")
        fig.tight_layout()
        fig.savefig(out_dir / "bench-throughput.png", dpi=100)
        plt.close(fig)
        lines.append("![throughput against concurrency and chunk size](benchmarks/bench-throughput.png)")
    resumes = [r for r in records if r["kind"] == "resume"]
    if resumes:
        fig, ax = plt.subplots(figsize=(6, 4))
        for sig in sorted({r["signal"] for r in resumes}):
            points = sorted((r for r in resumes if r["signal"] == sig), key=lambda r: r["fraction"])
            ax.plot([100 * p["fraction"] for p in points], [100 * p["waste"] for p in points], marker="o", label=sig)
        ax.set_xlabel("interrupted when this % of the model had crossed the wire")
        ax.set_ylabel("bytes fetched twice, % of the model")
        ax.set_ylim(bottom=0)
        ax.legend()
        ax.set_title("Resume waste")
        fig.tight_layout()
        fig.savefig(out_dir / "bench-resume.png", dpi=100)
        plt.close(fig)
        lines.append("![resume waste against the point of interruption](benchmarks/bench-resume.png)")
    plotted = {r["plot"] for r in records if r["kind"] == "sim" and r.get("plot")}
    for path in sorted(plotted):  # tools/sim_p2p.py draws its own figure
        lines.append(f"![peers in a simulated cluster against node count](benchmarks/{Path(path).name})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller models and fewer runs")
    parser.add_argument("--only", action="append", choices=[b[1] for b in BENCHMARKS],
                        help="run only this benchmark (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()

    out_dir = args.out.parent / "benchmarks"
    out_dir.mkdir(exist_ok=True)
    results = Path(tempfile.mkstemp(prefix="mc-bench-", suffix=".jsonl")[1])
    sections: list[str] = []
    for name, script, full, quick, needs_root in BENCHMARKS:
        if args.only and script not in args.only:
            continue
        if needs_root and os.geteuid() != 0:
            sections += [f"### {name} (`tools/{script}`)", "", "skipped: needs root (it makes bind mounts)", ""]
            continue
        print(f"running tools/{script} ...", flush=True)
        chosen = quick if args.quick else full
        code, output, seconds = run(script, chosen, results)
        status = "" if code == 0 else f" — **failed (exit {code})**"
        command = " ".join([f"python tools/{script}", *chosen])
        sections += [f"### {name} (`{command}`){status}", "",
                     f"took {seconds:.0f} s", "", "```", output.strip(), "```", ""]
        print(f"  done in {seconds:.0f} s (exit {code})", flush=True)
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    results.unlink()

    doc = ["# modelcache benchmarks", "",
           f"Made by `python tools/bench_report.py{' --quick' if args.quick else ''}`. Every figure is a median",
           "of runs alternating ours and the peer, measured side by side in one run; the ceiling is each",
           "resource alone on the same bytes (../shared/MEASURING.md), the slowest of them. Absolute",
           "times on a shared VM are noisy: read the ratios.", "", "## Machine", "", *machine(), "",
           "## Summary", "", *comparison_table([r for r in records if r["kind"] == "comparison"]), "",
           *startup_table([r for r in records if r["kind"] == "startup"])]
    pictures = plots(records, out_dir)
    if pictures:
        doc += ["## Plots", "", *[line + "\n" for line in pictures]]
    doc += ["## Each benchmark's own output", "", *sections]
    args.out.write_text("\n".join(doc).rstrip() + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
