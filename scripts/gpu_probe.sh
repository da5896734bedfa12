#!/usr/bin/env bash
# The first prepared run for a lent GPU (device tool), on a bare machine: install without network,
# then benchmarks/gpu_probe.py (ceilings, per-kernel medians, tile sweep, training steps of fastpfc,
# the eager and the torch.compile'd reference, C = 1M / 2M). JSON lines land in $OUT/probe.jsonl as
# they are measured, the table in $OUT/probe.md.
#   device run: bash scripts/gpu_probe.sh      (timeout_s ~ 540: the probe starts no step after 420 s)
set -uo pipefail
# shellcheck source=scripts/gpu_setup.sh
. "$(dirname "$0")/gpu_setup.sh"
timeout 500 python3 -m benchmarks.gpu_probe --out "$OUT" --budget-s "${PROBE_BUDGET_S:-420}"
