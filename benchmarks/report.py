"""``python -m benchmarks.report``: run the sweep on this machine, write ``benchmarks/results/<device>.md``.

It runs the pytest-benchmark suite (so the numbers are the suite's own), adds the capacity search
(the largest C each implementation can train at B=1024, D=512), and writes a Markdown table plus a
PNG plot of time and memory against the number of classes (the plot needs matplotlib:
``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.harness import IMPLEMENTATIONS, max_classes

RESULTS = Path(__file__).parent / "results"


def device_slug() -> tuple[str, str]:
    """A file-name slug and a description of the device the benchmarks run on."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"), f"{name}, torch {torch.__version__}"
    processor = platform.processor() or platform.machine()
    return "cpu", f"CPU ({processor}, {os.cpu_count()} cores), torch {torch.__version__}"


def run_suite(quick: bool) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        command = [sys.executable, "-m", "pytest", str(Path(__file__).parent), "--benchmark-only", "-q",
                   "-p", "no:cacheprovider", f"--benchmark-json={out}"]
        env = dict(os.environ, FASTPFC_BENCH_QUICK="1" if quick else "0")
        subprocess.run(command, check=True, env=env)
        return json.loads(out.read_text())["benchmarks"]


def rows_from(benchmarks: list[dict]) -> list[dict]:
    rows = []
    for bench in benchmarks:
        info = bench["extra_info"]
        rows.append({**info, "ms": bench["stats"]["median"] * 1e3})
    order = {name: i for i, name in enumerate(IMPLEMENTATIONS)}
    return sorted(rows, key=lambda r: (r["family"], r["sampled"], r["classes"], r["pass_name"], order[r["impl"]]))


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(rows: list[dict], capacity: dict, description: str) -> str:
    lines = [f"# Benchmark results: {description}", "",
             f"Produced by `python -m benchmarks.report` on {datetime.date.today()}. Medians of the "
             "pytest-benchmark rounds; peak MB is the peak extra memory of one step above the inputs "
             "(CUDA allocator, or peak RSS on the CPU); TFLOP/s counts 6·B·C·D (fwd+bwd) or 2·B·C·D "
             "(fwd); speed-up and memory ratio are against `reference` in the same run.", "",
             "| case | pass | implementation | ms | peak MB | TFLOP/s | speed-up | memory ratio |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ms = "OOM" if r["oom"] else _fmt(r["ms"], ".1f")
        speedup = "—" if r.get("speedup") is None else f"{r['speedup']:.2f}×"
        lines.append(f"| {r['case']} | {r['pass_name']} | {r['impl']} | {ms} | {_fmt(r['peak_mb'], '.0f')} | "
                     f"{_fmt(r.get('tflops'), '.3f')} | {speedup} | {_fmt(r.get('memory_ratio'), '.3f')} |")
    if capacity:
        lines += ["", f"## Largest C per training step at B=1024, D=512 ({capacity['limit']})", "",
                  "| implementation | largest C | probes (C: inputs + peak MB, or failed) |", "| --- | ---: | --- |"]
        for impl, (largest, probes) in capacity["results"].items():
            trail = ", ".join(f"{p.classes:,}: " + ("failed" if p.peak_bytes is None else
                                                     f"{(p.input_bytes + p.peak_bytes) / 2**20:.0f}")
                              + ("" if p.ok else " (over)") for p in probes)
            lines.append(f"| {impl} | {largest:,} | {trail} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> bool:
    """Time and memory (fwd+bwd) against C for the (B, D, dtype) family with the most class counts."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')")
        return False
    families: dict[str, list[dict]] = {}
    for r in rows:
        if r["pass_name"] == "fwd+bwd" and not r["sampled"] and not r["oom"]:
            families.setdefault(r["family"], []).append(r)
    family, members = max(families.items(), key=lambda kv: len({m["classes"] for m in kv[1]}))
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for impl in dict.fromkeys(m["impl"] for m in members):
        points = sorted((m["classes"], m["ms"], m["peak_mb"]) for m in members if m["impl"] == impl)
        classes, ms, mb = zip(*points, strict=True)
        ax_time.plot(classes, ms, marker="o", label=impl)
        ax_mem.plot(classes, mb, marker="o", label=impl)
    for ax, label in ((ax_time, "ms per step (fwd+bwd)"), (ax_mem, "peak extra MB")):
        ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel("classes C"), ax.set_ylabel(label)
        ax.set_xticks(sorted({m["classes"] for m in members}))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value / 1000:g}k"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend()
    fig.suptitle(family)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only a few cases around the headline shape")
    parser.add_argument("--no-capacity", action="store_true", help="skip the largest-C search")
    parser.add_argument("--cpu-budget-gib", type=float, default=2.0,
                        help="memory one CPU training step may use in the largest-C search")
    args = parser.parse_args()
    slug, description = device_slug()
    rows = rows_from(run_suite(args.quick))
    capacity = {}
    if not args.no_capacity:
        cuda = torch.cuda.is_available()
        budget = None if cuda else int(args.cpu_budget_gib * 2**30)
        capacity = {"limit": "device memory" if cuda else f"CPU budget of {args.cpu_budget_gib:g} GiB",
                    "results": {impl: max_classes(impl, 1024, 512, "bf16" if cuda else "fp32", budget)
                                for impl in ("reference", "fastpfc")}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{slug}.md").write_text(markdown(rows, capacity, description))
    if plot(rows, RESULTS / f"{slug}.png"):
        print(f"wrote {RESULTS / (slug + '.png')}")
    print(f"wrote {RESULTS / (slug + '.md')}")


if __name__ == "__main__":
    main()
