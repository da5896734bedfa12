"""``pytest benchmarks --benchmark-only``: loss + center update, each variant of
``benchmarks/center_update.py`` side by side on the same case (time relative to the loss alone in
the end-of-run summary)."""

import pytest
import torch

from benchmarks import summary
from benchmarks.center_update import VARIANTS, cases_for, make_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = 3 if DEVICE.type == "cpu" else 20
PARAMS = [pytest.param(case, variant, id=f"{case.name}-{variant}")
          for case in cases_for(DEVICE) for variant in VARIANTS]


@pytest.mark.parametrize("case, variant", PARAMS)
def test_center_update_step(benchmark, case, variant):
    benchmark.group = f"{case.name} loss + center update"
    step = make_step(variant, case, DEVICE)
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)  # the warm-up creates the optimizer state
    benchmark.extra_info.update(case=case.name, variant=variant)
    summary.UPDATES.append(summary.Update(case.name, variant, 1e3 * benchmark.stats.stats.median))
