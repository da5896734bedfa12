"""benchmarks.gpu_probe, dry-run at tiny sizes on this machine (the Triton kernels in the interpreter)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _probe(out: Path, *args: str) -> list[dict]:
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_probe", "--dry-run", "--out", str(out), *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (out / "probe.jsonl").read_text().splitlines()]


def test_dry_run_measures_every_step(tmp_path):
    rows = _probe(tmp_path)
    assert not [r for r in rows if "error" in r or "skipped" in r]
    by_step = {}
    for row in rows:
        by_step.setdefault(row["step"], []).append(row)
    assert by_step["ceilings"][0]["bf16_matmul_tflops"] > 0 and by_step["ceilings"][0]["copy_gb_s"] > 0
    assert len(by_step["kernels"]) == 4  # fp32 and bf16 weights x (default tiles, one candidate)
    for row in by_step["kernels"]:
        assert all(row[k] > 0 for k in ("unit_rows_ms", "partial_lse_ms", "partial_lse_store_ms", "softmax_grad_ms",
                                         "gemm_grad_x_ms", "gemm_grad_w_ms", "unit_rows_backward_ms"))
    steps = {(r["impl"], r["weight"], r["classes"]): r for r in by_step["step"]}
    assert {impl for impl, _, _ in steps} == {"fastpfc", "fastpfc-stored", "reference"}
    assert all(r["ms"] > 0 for r in steps.values())
    assert all(r["bitwise_run_to_run"] for (impl, _, _), r in steps.items() if impl.startswith("fastpfc"))
    assert {c for _, _, c in steps} == {300, 600, 1200}  # the headline stand-in, then the two larger C
    (profile,) = by_step["profile"]
    assert profile["wall_ms"] > 0 and profile["kernels_ms"] > 0 and profile["top"]
    assert all(k["ms"] > 0 and k["calls"] >= 1 and k["name"] for k in profile["top"])
    table = (tmp_path / "probe.md").read_text()
    assert table.count("\n") == len(rows) + 2 + 5 + len(profile["top"]) and "| kernels |" in table


def test_steps_past_the_time_budget_are_recorded_as_skipped(tmp_path):
    rows = _probe(tmp_path, "--budget-s", "0")
    assert rows[0]["step"] == "device" and len(rows) > 1
    assert all(r.get("skipped") == "time budget" for r in rows[1:])
