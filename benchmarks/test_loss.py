"""``pytest benchmarks --benchmark-only``: every implementation of each case side by side.

Each test times one loss step (forward, or forward + backward) of one implementation on one case;
``--benchmark-group-by=group`` (the default set here) puts the implementations of a case in one
table. ``extra_info`` holds the peak extra memory, TFLOP/s and the ratios to the reference.
"""

import os
import statistics

import pytest
import torch

from benchmarks import summary
from benchmarks.harness import (
    IMPLEMENTATIONS,
    Unavailable,
    cases_for,
    make_inputs,
    measure_peak,
    missing_here,
    probe,
    quick_cases,
    run_step,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PASSES = {"fwd+bwd": True, "fwd": False}
ROUNDS = 5 if DEVICE.type == "cpu" else 20

#: (case name, pass) -> (median seconds, peak bytes) of the reference, for the ratios.
_REFERENCE: dict[tuple[str, str], tuple[float, int | None]] = {}

#: ``FASTPFC_BENCH_QUICK=1`` (``python -m benchmarks.report --quick``) runs the few cases of
#: ``quick_cases`` and leaves out the compiled reference, whose compilation per shape takes minutes.
QUICK = os.environ.get("FASTPFC_BENCH_QUICK") == "1"
CASES = quick_cases(DEVICE) if QUICK else cases_for(DEVICE)
#: Implementations that cannot run on this machine are not collected; the summary names them once.
summary.NOT_RUN.update({impl: why for impl in IMPLEMENTATIONS if (why := missing_here(impl, DEVICE))})
PARAMS = [pytest.param(case, pass_name, impl, id=f"{case.name}-{pass_name}-{impl}")
          for case in CASES for pass_name in PASSES for impl in IMPLEMENTATIONS
          if impl not in summary.NOT_RUN and not (QUICK and impl == "reference-compiled")]


@pytest.mark.parametrize("case, pass_name, impl", PARAMS)
def test_loss_step(benchmark, case, pass_name, impl):
    benchmark.group = f"{case.name} {pass_name}"
    inputs = make_inputs(case, DEVICE)
    try:
        step = IMPLEMENTATIONS[impl](case, DEVICE, inputs)
    except Unavailable as reason:
        pytest.skip(str(reason))
    backward = PASSES[pass_name]
    # A warm-up step (compilation, autotuning, first-use buffers) also finds out-of-memory; then the
    # peak of a steady-state step. CPU memory is measured in a fresh process (see harness.probe).
    if DEVICE.type == "cpu":
        peak = probe(impl, case, backward).peak_bytes
    else:
        peak = measure_peak(step, inputs, backward, DEVICE) and measure_peak(step, inputs, backward, DEVICE)
    benchmark.extra_info.update(impl=impl, case=case.name, pass_name=pass_name, classes=case.classes,
                                family=f"B{case.batch}-D{case.dim}-{case.dtype}", sampled=case.sample_rate < 1,
                                oom=peak is None, peak_mb=None if peak is None else peak / 2**20)
    if peak is None:
        pytest.skip("out of memory")
    if DEVICE.type == "cpu":
        run_step(step, inputs, backward, DEVICE)  # warm-up in this process
    benchmark.pedantic(run_step, args=(step, inputs, backward, DEVICE), setup=inputs.clear_grads,
                       rounds=ROUNDS, warmup_rounds=1)
    median = statistics.median(benchmark.stats.stats.data)
    benchmark.extra_info["tflops"] = case.flops(backward) / median / 1e12
    if impl == "reference":
        _REFERENCE[case.name, pass_name] = (median, peak)
    elif (case.name, pass_name) in _REFERENCE:
        ref_time, ref_peak = _REFERENCE[case.name, pass_name]
        benchmark.extra_info["speedup"] = ref_time / median
        benchmark.extra_info["memory_ratio"] = None if not ref_peak else peak / ref_peak
    summary.RESULTS.append(summary.Result(case.name, pass_name, impl, 1e3 * median, peak / 2**20,
                                          benchmark.extra_info.get("speedup"),
                                          benchmark.extra_info.get("memory_ratio")))
