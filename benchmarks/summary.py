"""The compact end-of-run summary of ``pytest benchmarks --benchmark-only``: per case, fastpfc and
each peer against the reference (time and peak-memory ratios), in numeric order of the cases, and
the peers that could not run here, once each."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass
class Result:
    case: str
    pass_name: str
    impl: str
    median_ms: float
    peak_mb: float | None
    speedup: float | None
    memory_ratio: float | None


@dataclass
class Update:
    case: str
    variant: str
    median_ms: float


#: Filled by ``benchmarks/test_loss.py`` and ``benchmarks/test_center_update.py`` as they run.
RESULTS: list[Result] = []
UPDATES: list[Update] = []
#: Implementation -> why it did not run on this machine.
NOT_RUN: dict[str, str] = {}


def natural_key(text: str) -> list:
    """Sort key that orders numbers inside names by value: C16k < C50k < C200k."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def lines() -> list[str]:
    """One row per measured (case, pass, implementation), reference first within a case."""
    out = []
    if RESULTS:
        out.append(f"{'case':<28} {'pass':<8} {'implementation':<20} {'ms':>9} {'peak MB':>8} {'speed-up':>9} "
                   f"{'memory':>7}")
        order = sorted(RESULTS, key=lambda r: (natural_key(r.case), r.pass_name, r.impl != "reference"))
        for r in order:
            speedup = "—" if r.speedup is None else f"{r.speedup:.2f}×"
            memory = "—" if r.memory_ratio is None else f"{r.memory_ratio:.3f}"
            peak = "—" if r.peak_mb is None else f"{r.peak_mb:.0f}"
            out.append(f"{r.case:<28} {r.pass_name:<8} {r.impl:<20} {r.median_ms:>9.1f} {peak:>8} {speedup:>9} "
                       f"{memory:>7}")
        out.append("speed-up and memory are against `reference` in the same run (peak extra memory of one step)")
    for case in sorted({u.case for u in UPDATES}, key=natural_key):
        runs = {u.variant: u.median_ms for u in UPDATES if u.case == case}
        alone = runs.get("loss")
        out.append(f"loss + center update, {case}: " + ", ".join(
            f"{variant} {ms:.0f} ms" + (f" ({ms / alone:.2f}× the loss alone)" if alone and variant != "loss" else "")
            for variant, ms in runs.items()))
    if NOT_RUN:
        out.append("not run here: " + "; ".join(f"{impl} ({why})" for impl, why in sorted(NOT_RUN.items())))
    return out
