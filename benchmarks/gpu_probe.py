"""``python -m benchmarks.gpu_probe --out DIR``: what a lent GPU should tell us, in one command.

At the headline shape (B=1024, D=512, 400k classes, bf16 embeddings; fp32 and bf16 weights):

1. the device's ceilings: a bf16 matmul (TFLOP/s) and a device-to-device copy (GB/s);
2. per-kernel medians (``triton.testing.do_bench``) of a step's kernels and GEMMs at the default
   tiles, and a sweep of candidate tiles;
3. one training step (forward + backward) of fastpfc (``memory_budget`` 0 and everything stored),
   of the eager reference and of the ``torch.compile``d reference: median time, peak extra
   memory, and whether fastpfc is bitwise the same run to run;
4. a ``torch.profiler`` breakdown of a fastpfc step: its wall time against the device time of its
   kernels, and the largest kernels (is the step waiting on the host?);
5. fastpfc and the reference at C = 1M and 2M.

Each measurement is appended to ``DIR/probe.jsonl`` as soon as it is taken (a timeout keeps what
was measured); ``DIR/probe.md`` is the table of them all. Steps that would start after
``--budget-s`` seconds are recorded as skipped. ``--dry-run`` runs every step at tiny sizes on
whatever device there is (the Triton kernels under ``TRITON_INTERPRET=1`` on a CPU): the test of
this script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.harness import MARGIN, is_out_of_memory, synchronize
from fastpfc import partial_fc_loss, reference_partial_fc_loss
from fastpfc.kernels import (
    INTERPRET,
    TileConfig,
    default_config,
    partial_lse,
    softmax_grad,
    unit_rows,
    unit_rows_backward_,
)
from fastpfc.kernels.tensors import aligned_empty
from fastpfc.profiling import peak_memory
from fastpfc.softmax_blocks import matmul_fp32

HEADLINE = {"batch": 1024, "dim": 512, "classes": 400_000}
DRY = {"batch": 40, "dim": 24, "classes": 300}
LARGE_CLASSES = (1_000_000, 2_000_000)
#: Tile candidates for sm_90 (the default first); the dry run takes small ones the interpreter runs fast.
CANDIDATES = [None] + [TileConfig(block_b=b, block_c=c, block_d=d, num_warps=w, num_stages=s)
                       for b, c, d, w, s in [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3),
                                             (64, 128, 64, 4, 3), (128, 128, 128, 4, 2), (128, 64, 64, 4, 3)]]
DRY_CANDIDATES = [None, TileConfig(block_b=64, block_c=128, block_d=32, num_splits=2)]


class Probe:
    """Appends measurements to ``probe.jsonl`` and keeps to the time budget."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out, self.deadline = out, time.monotonic() + budget_s
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "probe.jsonl"
        self.path.write_text("")

    def record(self, step: str, **fields) -> None:
        line = json.dumps({"step": step, **fields})
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def run(self, step: str, measure: Callable[[], dict], **fields) -> None:
        """``measure()``'s fields recorded under ``step``; out-of-time, OOM and errors recorded too."""
        if time.monotonic() > self.deadline:
            self.record(step, **fields, skipped="time budget")
            return
        try:
            self.record(step, **fields, **measure())
        except Exception as error:  # noqa: BLE001 - a probe records what failed and goes on
            self.record(step, **fields, error="out of memory" if is_out_of_memory(error) else repr(error)[:300])
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def median_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on a GPU, wall clock otherwise."""
    if device.type == "cuda" and not INTERPRET:
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=5, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def ceilings(device: torch.device, dry: bool, reps: int) -> dict:
    n = 256 if dry else 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    matmul = median_ms(lambda: a @ b, device, reps)
    src = torch.empty(2**22 if dry else 2**28, device=device)  # 16 MiB / 1 GiB of fp32
    dst = torch.empty_like(src)
    copy = median_ms(lambda: dst.copy_(src), device, reps)
    return {"bf16_matmul_tflops": 2 * n**3 / matmul / 1e9, "copy_gb_s": 2 * src.numel() * 4 / copy / 1e6}


def kernel_inputs(shape: dict, weight_dtype: torch.dtype, device: torch.device) -> dict:
    """What the launchers take, for a full softmax over ``shape['classes']`` centers (bf16 operands)."""
    gen = torch.Generator(device=device).manual_seed(0)
    batch, dim, classes = shape["batch"], shape["dim"], shape["classes"]
    x_unit, _ = unit_rows(torch.randn(batch, dim, generator=gen, device=device), None, torch.bfloat16)
    w = (torch.randn(classes, dim, generator=gen, device=device) * 0.01).to(weight_dtype)
    w_unit, w_inv_norm = unit_rows(w, None, torch.bfloat16)
    labels = torch.randint(0, classes, (batch,), generator=gen, device=device)
    return {"x_unit": x_unit, "w": w, "w_unit": w_unit, "w_inv_norm": w_inv_norm, "labels": labels,
            "target_logit": torch.zeros(batch, device=device), "lse": torch.full((batch,), 10.0, device=device),
            "grad_lse": torch.full((batch,), 1.0 / batch, device=device),
            "grad_target_cos": torch.full((batch,), -1.0 / batch, device=device)}


def kernel_times(k: dict, config: TileConfig, device: torch.device, reps: int) -> dict:
    """Median ms of each kernel and GEMM of a step with ``config``, and the work of one B×C×D matmul."""
    x_unit, w_unit, labels = k["x_unit"], k["w_unit"], k["labels"]
    batch, dim, classes = x_unit.shape[0], x_unit.shape[1], w_unit.shape[0]
    grad = aligned_empty(batch, classes, x_unit.dtype, device)
    numerators = torch.empty(batch, -(-classes // config.block_c) * config.block_c, dtype=torch.bfloat16,
                             device=device)
    tile_max = torch.empty(batch, numerators.shape[1] // config.block_c, device=device)
    forward = (x_unit, w_unit, labels, k["target_logit"], MARGIN.s, config)
    softmax_grad(grad, x_unit, w_unit, labels, k["lse"], k["grad_lse"], k["grad_target_cos"], MARGIN.s, config)
    grad_w_unit = matmul_fp32(grad.T, x_unit)
    grad_w = torch.zeros_like(k["w"])
    times = {
        "unit_rows_ms": median_ms(lambda: unit_rows(k["w"], None, torch.bfloat16), device, reps),
        "partial_lse_ms": median_ms(lambda: partial_lse(*forward), device, reps),
        "partial_lse_store_ms": median_ms(lambda: partial_lse(*forward, numerators, tile_max), device, reps),
        "softmax_grad_ms": median_ms(lambda: softmax_grad(grad, x_unit, w_unit, labels, k["lse"], k["grad_lse"],
                                                          k["grad_target_cos"], MARGIN.s, config), device, reps),
        "gemm_grad_x_ms": median_ms(lambda: matmul_fp32(grad, w_unit), device, reps),
        "gemm_grad_w_ms": median_ms(lambda: matmul_fp32(grad.T, x_unit), device, reps),
        "unit_rows_backward_ms": median_ms(
            lambda: unit_rows_backward_(grad_w, grad_w_unit, w_unit, k["w_inv_norm"], None), device, reps),
    }
    return times | {"bcd_matmul_gflop": 2 * batch * classes * dim / 1e9,
                    "config": None if config is None else config.__dict__}


def make_step(impl: str, shape: dict, weight_dtype: torch.dtype, device: torch.device) -> Callable[[], tuple]:
    """One forward + backward of ``impl`` on fresh inputs; returns ``(loss, x.grad, w.grad)``."""
    gen = torch.Generator(device=device).manual_seed(1)
    batch, dim, classes = shape["batch"], shape["dim"], shape["classes"]
    x = torch.randn(batch, dim, generator=gen, device=device).bfloat16().requires_grad_()
    w = (torch.randn(classes, dim, generator=gen, device=device) * 0.01).to(weight_dtype).requires_grad_()
    labels = torch.randint(0, classes, (batch,), generator=gen, device=device)
    budget = 5 * batch * classes if impl == "fastpfc-stored" else 0  # stored: every numerator
    reference = (torch.compile(reference_partial_fc_loss, dynamic=False) if impl == "reference-compiled"
                 else reference_partial_fc_loss)

    def loss_fn() -> torch.Tensor:
        if impl.startswith("fastpfc"):
            return partial_fc_loss(x, w, labels, MARGIN, validate=False, memory_budget=budget)
        return reference(x, w, labels, MARGIN)

    def step() -> tuple[torch.Tensor, ...]:
        x.grad = w.grad = None
        loss = loss_fn()
        loss.backward()
        return loss.detach(), x.grad, w.grad

    return step


def training_step(impl: str, shape: dict, weight_dtype: torch.dtype, device: torch.device, reps: int) -> dict:
    """Median ms and peak extra bytes of forward + backward of ``impl`` (fastpfc: also bitwise)."""
    step = make_step(impl, shape, weight_dtype, device)
    first = step()  # warm-up: compilation, first-use buffers
    result = {"ms": median_ms(step, device, reps)}
    result["tflops_6bcd"] = 6 * shape["batch"] * shape["classes"] * shape["dim"] / result["ms"] / 1e9
    if device.type == "cuda":
        result["peak_mb"] = peak_memory(step, device)[1] / 2**20
    if impl.startswith("fastpfc"):
        result["bitwise_run_to_run"] = all(torch.equal(a, b) for a, b in zip(first, step(), strict=True))
    return result


def step_profile(shape: dict, device: torch.device, reps: int, top: int = 12) -> dict:
    """Where a fastpfc step (fp32 centers) spends its time, by ``torch.profiler`` over ``reps`` steps:
    per step, the wall time, the device time of all kernels (on a CPU: of all ops, self time) and
    the ``top`` largest by name. Device time well under the wall time means the step waits on the host."""
    from torch.profiler import ProfilerActivity, profile

    step = make_step("fastpfc", shape, torch.float32, device)
    step()
    synchronize(device)
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        start = time.perf_counter()
        for _ in range(reps):
            step()
        synchronize(device)
        wall = time.perf_counter() - start
    events = [e for e in prof.key_averages() if not cuda or e.device_type.name == "CUDA"]  # kernels, not ops
    times = sorted(((e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / reps, e.count // reps,
                    e.key[:80]) for e in events)
    times = [t for t in times if t[0] > 0]
    return {"wall_ms": 1e3 * wall / reps, "kernels_ms": sum(ms for ms, _, _ in times),
            "top": [{"ms": round(ms, 4), "calls": calls, "name": name} for ms, calls, name in times[::-1][:top]]}


def markdown(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    keys = sorted({k for r in rows for k in r} - {"step", "config", "top"})
    lines = ["| step | " + " | ".join(keys) + " | config |", "|---" * (len(keys) + 2) + "|"]
    for r in rows:
        cells = [r.get(k, "") for k in keys]
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in cells]
        lines.append(f"| {r['step']} | " + " | ".join(cells) + f" | {r.get('config', '')} |")
    for r in rows:
        if r.get("top"):
            lines += ["", f"Largest kernels of a {r['impl']} step (ms per step, calls per step):", "",
                      "| ms | calls | kernel |", "|---:|---:|---|"]
            lines += [f"| {k['ms']:.4g} | {k['calls']} | `{k['name']}` |" for k in r["top"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for probe.jsonl and probe.md")
    parser.add_argument("--budget-s", type=float, default=480.0, help="start no step after this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, any device (a test of the script)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dry = args.dry_run
    shape, candidates, reps = (DRY, DRY_CANDIDATES, 2) if dry else (HEADLINE, CANDIDATES, 5)
    probe = Probe(args.out, args.budget_s)
    probe.record("device", name=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                 torch=torch.__version__, interpreter=INTERPRET, **shape)
    probe.run("ceilings", lambda: ceilings(device, dry, reps))
    for weight_dtype in (torch.float32, torch.bfloat16):
        k = kernel_inputs(shape, weight_dtype, device)
        for config in candidates:
            tiles = config or default_config(device, torch.bfloat16)
            probe.run("kernels", lambda tiles=tiles, k=k: kernel_times(k, tiles, device, reps),
                      weight=str(weight_dtype), default=config is None)
        del k
    impls = ["fastpfc", "fastpfc-stored", "reference"] + ([] if dry and device.type != "cuda" else
                                                          ["reference-compiled"])
    for weight_dtype in (torch.float32, torch.bfloat16):
        for impl in impls:
            probe.run("step", lambda impl=impl, wd=weight_dtype: training_step(impl, shape, wd, device, reps),
                      impl=impl, weight=str(weight_dtype), classes=shape["classes"])
    probe.run("profile", lambda: step_profile(shape, device, reps), impl="fastpfc", weight=str(torch.float32),
              classes=shape["classes"])
    for classes in ((600, 1200) if dry else LARGE_CLASSES):
        for impl in ("fastpfc", "reference"):
            probe.run("step", lambda impl=impl, c=classes: training_step(impl, shape | {"classes": c},
                                                                         torch.float32, device, reps),
                      impl=impl, weight=str(torch.float32), classes=classes)
    (args.out / "probe.md").write_text(markdown(probe.path))
    print(markdown(probe.path))


if __name__ == "__main__":
    main()
