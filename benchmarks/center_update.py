"""Loss + center update: one PartialFC training step of the class centers (sampling, loss forward
and backward, the optimizer of the centers), and the largest class count whose training fits a
memory budget.

Variants, all on the same ``PartialFCLoss`` inputs:

* ``loss``: the row-sparse gradient and no update (the loss alone, the baseline of the ratios);
* ``sparse-sgd`` / ``sparse-adamw``: ``fastpfc.optim`` on the sampled rows;
* ``dense-sgd`` / ``dense-adamw``: a dense gradient and ``torch.optim`` (what a drop-in user
  without ``sparse_grad`` runs: a [C, D] gradient, every row's state moved every step).

``python -m benchmarks.center_update`` times them side by side (medians) and fits the bytes per
class of each optimizer from two measured sizes, then writes ``results/center-update-<device>.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from benchmarks.harness import synchronize
from benchmarks.report import RESULTS, device_slug
from fastpfc import PartialFCLoss
from fastpfc.optim import SparseAdamW, SparseSGD
from fastpfc.profiling import allocated_memory, peak_memory

SGD_ARGS = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}  # insightface's recipe for the centers
ADAMW_ARGS = {"lr": 1e-3, "weight_decay": 0.0}

#: Variant -> (row-sparse gradient?, optimizer factory or None).
VARIANTS: dict[str, tuple[bool, Callable | None]] = {
    "loss": (True, None),
    "sparse-sgd": (True, lambda params: SparseSGD(params, **SGD_ARGS)),
    "sparse-adamw": (True, lambda params: SparseAdamW(params, **ADAMW_ARGS)),
    "dense-sgd": (False, lambda params: torch.optim.SGD(params, **SGD_ARGS)),
    "dense-adamw": (False, lambda params: torch.optim.AdamW(params, **ADAMW_ARGS)),
}


@dataclass(frozen=True)
class UpdateCase:
    batch: int
    dim: int
    num_classes: int
    sample_rate: float

    @property
    def name(self) -> str:
        return f"B{self.batch}-D{self.dim}-C{self.num_classes:,}-sr{self.sample_rate:g}".replace(",", "_")


def cases_for(device: torch.device) -> list[UpdateCase]:
    """The README's ImageNet-scale CPU step; on a GPU the same classes and 10M at D=512."""
    if device.type == "cpu":
        return [UpdateCase(64, 256, 1_281_167, 0.1)]
    return [UpdateCase(1024, 512, 1_281_167, 0.1), UpdateCase(1024, 512, 10_000_000, 0.1)]


def make_step(variant: str, case: UpdateCase, device: torch.device) -> Callable[[], None]:
    """One training step of the centers (the gradient cleared after it, as ``zero_grad`` would)."""
    sparse, make_optimizer = VARIANTS[variant]
    loss_fn = PartialFCLoss(case.dim, case.num_classes, sample_rate=case.sample_rate, seed=0, validate=False,
                            sparse_grad=sparse).to(device)
    optimizer = make_optimizer(loss_fn.parameters()) if make_optimizer else None
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(case.batch, case.dim, generator=gen, device=device)
    labels = torch.randint(0, case.num_classes, (case.batch,), generator=gen, device=device)

    def step() -> None:
        loss_fn(x, labels).backward()
        if optimizer is not None:
            optimizer.step()
        loss_fn.weight.grad = None
        synchronize(device)

    return step


def time_step(step: Callable[[], None], rounds: int) -> float:
    """Median seconds of ``rounds`` steps after one warm-up (which creates the optimizer state)."""
    step()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _memory_in_this_process(variant: str, case: UpdateCase) -> dict[str, int | None]:
    """Bytes held between steps (centers, optimizer state) and the peak above them during a step;
    ``None`` for both when the device runs out of memory."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gc.collect()
    before = allocated_memory(device)
    try:
        step = make_step(variant, case, device)
        step()  # creates the optimizer state
        gc.collect()
        held = allocated_memory(device) - before
        return {"held_bytes": held, "step_peak_bytes": peak_memory(step, device)[1]}
    except torch.OutOfMemoryError:
        return {"held_bytes": None, "step_peak_bytes": None}


def memory(variant: str, case: UpdateCase) -> dict[str, int]:
    """:func:`_memory_in_this_process` in a fresh process (peak RSS needs a fresh allocator)."""
    command = [sys.executable, "-m", "benchmarks.center_update", "--probe", variant, json.dumps(asdict(case))]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def bytes_per_class(variant: str, batch: int, dim: int, sample_rate: float,
                    sizes: tuple[int, int]) -> tuple[float, float]:
    """``(bytes per class, fixed bytes)`` of a training step's memory (held + peak), fitted as a
    line through two measured class counts."""
    totals = []
    for num_classes in sizes:
        measured = memory(variant, UpdateCase(batch, dim, num_classes, sample_rate))
        totals.append(measured["held_bytes"] + measured["step_peak_bytes"])
    slope = (totals[1] - totals[0]) / (sizes[1] - sizes[0])
    return slope, totals[0] - slope * sizes[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", nargs=2, metavar=("VARIANT", "CASE"), help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--confirm", action="store_true",
                        help="on CUDA, train one step at 95%% of the estimated largest C (minutes: the centers of "
                             "tens of millions of classes are initialised on the host)")
    parser.add_argument("--capacity-gb", type=float, default=141.0,
                        help="memory the largest-C estimate fills (default: one H200's 141 GB)")
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(_memory_in_this_process(args.probe[0], UpdateCase(**json.loads(args.probe[1])))))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    slug, description = device_slug()
    lines = [f"# Loss + center update on {description}", "",
             "Medians of one training step of the centers, side by side in one run.", ""]
    for case in cases_for(device):
        medians = {}
        for variant in VARIANTS:
            medians[variant] = time_step(make_step(variant, case, device), args.rounds)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        table = [f"## {case.name}", "", "| variant | ms | × loss alone | held MB | step peak MB | total MB |",
                 "|---|---:|---:|---:|---:|---:|"]
        for variant, seconds in medians.items():
            held, peak = (value / 2**20 for value in memory(variant, case).values())
            table.append(f"| {variant} | {1e3 * seconds:.1f} | {seconds / medians['loss']:.2f} | {held:,.0f} | "
                         f"{peak:,.0f} | {held + peak:,.0f} |")
        table += ["", "held: centers and optimizer state between steps; step peak: above that during a step "
                  "(measured in a fresh process).", ""]
        print("\n".join(table), flush=True)  # each case as soon as it is measured: a timeout keeps it
        lines += table
    budget = args.capacity_gb * 1e9
    sizes = (100_000, 400_000) if device.type == "cpu" else (1_000_000, 4_000_000)
    capacity = [f"## Largest C at D=512, sample rate 0.1, B=1024, in {args.capacity_gb:g} GB", "",
                f"Memory of a training step (centers + optimizer state + the step's peak), fitted from C = "
                f"{sizes[0]:,} and {sizes[1]:,} measured on {description}.", "",
                "| variant | bytes per class | fixed MB | largest C |", "|---|---:|---:|---:|"]
    for variant in ("sparse-sgd", "sparse-adamw", "dense-sgd", "dense-adamw"):
        slope, fixed = bytes_per_class(variant, 1024, 512, 0.1, sizes)
        capacity.append(f"| {variant} | {slope:,.0f} | {fixed / 2**20:,.0f} | {(budget - fixed) / slope / 1e6:.1f}M |")
        if args.confirm and device.type == "cuda" and variant.startswith("sparse"):  # 95% of it must train
            total = torch.cuda.get_device_properties(device).total_memory
            classes = int(0.95 * (total - fixed) / slope)
            fits = memory(variant, UpdateCase(1024, 512, classes, 0.1))["held_bytes"] is not None
            capacity.append(f"| {variant}: a step at C = {classes:,} on this device | | | "
                            f"{'trains' if fits else 'out of memory'} |")
    print("\n".join(capacity))
    lines += capacity
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"center-update-{slug}.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
