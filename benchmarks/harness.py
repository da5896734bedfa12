"""What the benchmarks measure: the cases, the implementations, their inputs and their memory.

Shared by the pytest-benchmark suite (``test_loss.py``) and the report (``report.py``), so both
measure exactly the same thing. Every implementation computes forward (+ backward) of one loss
step on the same inputs; ``fastpfc`` and ``reference`` include the PartialFC sampling when the
case samples (``fastpfc`` without its input validation, which the reference does not do either),
the plain-softmax peers run with the margin off on pre-normalized inputs.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import resource
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from fastpfc import CosFace, partial_fc_loss, reference_partial_fc_loss, sample_centers
from fastpfc.profiling import peak_memory

MARGIN = CosFace(s=64.0, m=0.4)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    """One problem: B embeddings of dim D against C sampled classes (out of C / sample_rate)."""

    batch: int
    dim: int
    classes: int
    dtype: str = "fp32"
    sample_rate: float = 1.0

    @property
    def total_classes(self) -> int:
        return round(self.classes / self.sample_rate)

    @property
    def name(self) -> str:
        classes = f"{self.classes // 1000}k" if self.classes % 1000 == 0 else str(self.classes)
        sampled = "" if self.sample_rate == 1.0 else f"-sr{self.sample_rate:g}"
        return f"B{self.batch}-D{self.dim}-C{classes}{sampled}-{self.dtype}"

    def flops(self, backward: bool) -> float:
        """Necessary matmul FLOPs: 2BCD forward, 2BCD for each of the two gradients."""
        return (6 if backward else 2) * self.batch * self.classes * self.dim


def cases_for(device: torch.device) -> list[Case]:
    """The sweep for this device: small on CPU (the whole suite in minutes on 2 cores)."""
    if device.type == "cpu":
        return [Case(256, 128, 16_000), Case(256, 128, 50_000), Case(256, 128, 200_000),
                Case(256, 128, 60_000, sample_rate=0.3)]
    return [Case(b, d, c, dt, sr)
            for dt in ("bf16", "fp16", "fp32")
            for b in (512, 1024, 4096)
            for d in (256, 512)
            for c in (16_000, 100_000, 400_000, 1_300_000)
            for sr in ((1.0, 0.3) if (b, d, c) == (1024, 512, 400_000) else (1.0,))]


def quick_cases(device: torch.device) -> list[Case]:
    """A few cases around the headline shape, for a short device lease."""
    if device.type == "cpu":
        return [Case(256, 128, 200_000)]
    return [Case(1024, 512, c, dt) for dt in ("bf16", "fp32") for c in (100_000, 400_000, 1_300_000)] + [
        Case(1024, 512, 400_000, "bf16", 0.3), Case(4096, 256, 400_000, "bf16")]


class Unavailable(Exception):
    """The implementation does not run here (package missing, no CUDA, unsupported case)."""


@dataclass
class Inputs:
    embeddings: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    generator: torch.Generator

    def clear_grads(self) -> None:
        self.embeddings.grad = self.weight.grad = None


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(case.batch, case.dim, generator=gen, device=device).to(DTYPES[case.dtype])
    w = torch.randn(case.total_classes, case.dim, generator=gen, device=device).mul_(0.01)
    labels = torch.randint(0, case.total_classes, (case.batch,), generator=gen, device=device)
    return Inputs(x.requires_grad_(), w.requires_grad_(), labels, gen)


LossFn = Callable[[Inputs], torch.Tensor]


def _sampled(loss_fn: Callable, case: Case) -> LossFn:
    """Wrap a (x, w, labels, margin, index) loss so that the sampling is part of the step."""
    def step(inp: Inputs) -> torch.Tensor:
        index = None
        if case.sample_rate < 1.0:
            index, _ = sample_centers(inp.labels, case.total_classes, case.sample_rate, inp.generator)
        return loss_fn(inp.embeddings, inp.weight, inp.labels, MARGIN, index)
    return step


def _plain_softmax_peer(linear_ce: Callable, case: Case, inputs: Inputs) -> LossFn:
    """A fused plain-softmax kernel on pre-normalized, pre-scaled inputs (margin off)."""
    if case.sample_rate < 1.0:
        raise Unavailable("plain-softmax peers run only without sampling")
    dtype = DTYPES[case.dtype]
    with torch.no_grad():
        x = (torch.nn.functional.normalize(inputs.embeddings.float()) * MARGIN.s).to(dtype)
        w = torch.nn.functional.normalize(inputs.weight).to(dtype)
    x.requires_grad_(), w.requires_grad_()
    return lambda inp: linear_ce(x, w, inp.labels)


def _liger(case: Case, device: torch.device, inputs: Inputs) -> LossFn:
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()
    return _plain_softmax_peer(lambda x, w, y: loss(w, x, y), case, inputs)


def _cut_cross_entropy(case: Case, device: torch.device, inputs: Inputs) -> LossFn:
    from cut_cross_entropy import linear_cross_entropy

    if case.dtype == "fp32":
        raise Unavailable("cut-cross-entropy needs fp16/bf16")
    return _plain_softmax_peer(linear_cross_entropy, case, inputs)


def _torch_chunked_ce(case: Case, device: torch.device, inputs: Inputs) -> LossFn:
    options = torch.nn.LinearCrossEntropyOptions
    return _plain_softmax_peer(
        lambda x, w, y: torch.nn.functional.linear_cross_entropy(x, w, y, options=options()), case, inputs)


def _metric_learning_cosface(case: Case, device: torch.device, inputs: Inputs) -> LossFn:
    """pytorch-metric-learning's ``CosFaceLoss`` (the same loss as the reference, same value: it
    owns its centers, transposed, which get the inputs' values), a library people use."""
    from pytorch_metric_learning.losses import CosFaceLoss

    if case.sample_rate < 1.0:
        raise Unavailable("pytorch-metric-learning has no class sampling")
    if case.dtype != "fp32":
        raise Unavailable("pytorch-metric-learning's centers are fp32: fp32 embeddings only")
    loss = CosFaceLoss(num_classes=case.total_classes, embedding_size=case.dim, margin=MARGIN.m,
                       scale=MARGIN.s).to(device)
    with torch.no_grad():
        loss.W.copy_(inputs.weight.T)
    return lambda inp: loss(inp.embeddings, inp.labels)


def _compiled_reference(case: Case, device: torch.device, inputs: Inputs) -> LossFn:
    return _sampled(torch.compile(reference_partial_fc_loss, dynamic=False), case)


def _package_missing(package: str, module: str, device: torch.device) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{package} is not installed"
    return None if device.type == "cuda" else f"{package} needs CUDA"


#: Implementation name -> why it cannot run on this machine at all (a package, CUDA, the torch
#: version), or ``None``. Checked before any case is built; case-dependent limits raise
#: :class:`Unavailable` from the factory.
MISSING_HERE: dict[str, Callable[[torch.device], str | None]] = {
    "reference-compiled": lambda device: None if device.type == "cuda" else "measured on CUDA only",
    "torch-chunked-ce": lambda device: (None if hasattr(torch.nn, "LinearCrossEntropyOptions")
                                        else "this torch has no chunked linear_cross_entropy"),
    "liger": lambda device: _package_missing("liger-kernel", "liger_kernel", device),
    "cut-cross-entropy": lambda device: _package_missing("cut-cross-entropy", "cut_cross_entropy", device),
    "metric-learning": lambda device: (None if importlib.util.find_spec("pytorch_metric_learning")
                                       else "pytorch-metric-learning is not installed"),
}


def missing_here(impl: str, device: torch.device) -> str | None:
    """Why ``impl`` cannot run on ``device`` of this machine, or ``None`` when it can."""
    check = MISSING_HERE.get(impl)
    return None if check is None else check(device)


def _stored_numerators(case: Case, device: torch.device, inputs: Inputs) -> LossFn:
    """fastpfc with a memory budget for every softmax numerator (fp32, and the Triton tile maxima)."""
    budget = 5 * case.batch * case.classes
    return _sampled(functools.partial(partial_fc_loss, validate=False, memory_budget=budget), case)


#: Implementation name -> factory(case, device, inputs) -> loss step. The reference comes first:
#: speed-ups and memory ratios are relative to it.
IMPLEMENTATIONS: dict[str, Callable[[Case, torch.device, Inputs], LossFn]] = {
    "reference": lambda case, device, inputs: _sampled(reference_partial_fc_loss, case),
    "fastpfc": lambda case, device, inputs: _sampled(functools.partial(partial_fc_loss, validate=False), case),
    "fastpfc-stored": _stored_numerators,
    "reference-compiled": _compiled_reference,
    "metric-learning": _metric_learning_cosface,
    "torch-chunked-ce": _torch_chunked_ce,
    "liger": _liger,
    "cut-cross-entropy": _cut_cross_entropy,
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_step(step: LossFn, inputs: Inputs, backward: bool, device: torch.device) -> None:
    """One loss step, forward only or forward + backward, finished on the device."""
    loss = step(inputs)
    if backward:
        loss.backward()
    synchronize(device)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def measure_peak(step: LossFn, inputs: Inputs, backward: bool, device: torch.device) -> int | None:
    """Peak extra bytes of one step (grads cleared first), or ``None`` when it runs out of memory."""
    inputs.clear_grads()
    try:
        return peak_memory(lambda: run_step(step, inputs, backward, device), device)[1]
    except (torch.OutOfMemoryError, RuntimeError, MemoryError) as error:
        if not (isinstance(error, MemoryError) or is_out_of_memory(error)):
            raise
        return None
    finally:
        inputs.clear_grads()
        if device.type == "cuda":
            torch.cuda.empty_cache()


# --- measurements in a fresh process ------------------------------------------------------------
# On the CPU, peak memory is read as peak RSS, which needs glibc's allocator pinned process-wide
# (see fastpfc.profiling); that would slow every later timing in the same process, so CPU memory is
# measured in a child process. The capacity search needs a fresh allocation state per probe too.

@dataclass
class Probe:
    """One case run in a fresh process: did it fit, what its inputs took, the peak of one step."""

    classes: int
    ok: bool
    input_bytes: int | None
    peak_bytes: int | None


def _probe_in_this_process(impl: str, case: Case, backward: bool, budget_bytes: int | None) -> Probe:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if budget_bytes is not None:  # a hard cap too, so an over-budget CPU probe fails instead of swapping
        resource.setrlimit(resource.RLIMIT_AS, (_address_space_now() + 2 * budget_bytes,) * 2)
    try:
        inputs, input_bytes = peak_memory(lambda: make_inputs(case, device), device)
        step = IMPLEMENTATIONS[impl](case, device, inputs)
        peak = measure_peak(step, inputs, backward, device) and measure_peak(step, inputs, backward, device)
    except MemoryError:
        peak = None
    if peak is None:
        return Probe(case.classes, False, None, None)
    fits = budget_bytes is None or input_bytes + peak <= budget_bytes
    return Probe(case.classes, fits, input_bytes, peak)


def _address_space_now() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


def probe(impl: str, case: Case, backward: bool = True, budget_bytes: int | None = None) -> Probe:
    """Run ``case`` with ``impl`` in a new process: inputs, a warm-up step, then a measured step."""
    command = [sys.executable, "-m", "benchmarks.harness", impl, json.dumps(asdict(case)),
               "fwd+bwd" if backward else "fwd", str(budget_bytes or 0)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"probe of {impl} on {case.name} failed:\n{result.stderr[-2000:]}")
    return Probe(**json.loads(result.stdout.strip().splitlines()[-1]))


def max_classes(impl: str, batch: int, dim: int, dtype: str, budget_bytes: int | None,
                start: int = 16_000, precision: float = 0.05) -> tuple[int, list[Probe]]:
    """Largest C (within ``precision``) whose training step fits, inputs and gradients included:
    on CUDA in the device memory, on the CPU in ``budget_bytes``. Doubles C until a probe fails,
    then bisects."""
    probes: list[Probe] = []
    low, high = 0, start
    while True:
        probes.append(probe(impl, Case(batch, dim, high, dtype), budget_bytes=budget_bytes))
        if not probes[-1].ok:
            break
        low, high = high, high * 2
    while high - low > precision * max(low, 1):
        mid = (low + high) // 2
        probes.append(probe(impl, Case(batch, dim, mid, dtype), budget_bytes=budget_bytes))
        low, high = (mid, high) if probes[-1].ok else (low, mid)
    return low, probes


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one probe in a fresh process (used by probe())")
    parser.add_argument("impl", choices=sorted(IMPLEMENTATIONS))
    parser.add_argument("case", type=json.loads)
    parser.add_argument("pass_name", choices=["fwd", "fwd+bwd"])
    parser.add_argument("budget_bytes", type=int)
    args = parser.parse_args()
    outcome = _probe_in_this_process(args.impl, Case(**args.case), args.pass_name == "fwd+bwd",
                                     args.budget_bytes or None)
    print(json.dumps(asdict(outcome)))
