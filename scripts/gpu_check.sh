#!/usr/bin/env bash
# The second prepared run for a lent GPU (after gpu_probe.sh): install without network, the CUDA tests, the
# torchrun demo under NCCL at world size 1, and the quick benchmark report. Files land in $OUT.
#   device run: bash scripts/gpu_check.sh      (timeout_s ~ 560)
# With 15 minutes of device time for a session, the first lease (2026-11-29, H200) ran both scripts
# in one call: `PROBE_BUDGET_S=150 bash scripts/gpu_probe.sh > $OUT/probe.log 2>&1; bash
# scripts/gpu_check.sh 2>&1 | tee $OUT/check.log` with timeout_s 450. The probe and the tests
# finished (the tests in 48 s); center_update and the quick report did not within their timeouts.
# The second prepared call (issue 5's GPU check: a short bf16/Triton training, images/s and the
# loss's share of a step), after the same install:
#   python3 scripts/gpu_train_check.py --classes 200000 --steps 300 --batch-size 256   (timeout_s ~ 300)
set -uo pipefail
# shellcheck source=scripts/gpu_setup.sh
. "$(dirname "$0")/gpu_setup.sh"

echo "== CUDA tests"
timeout 200 python3 -m pytest -q tests/test_cuda.py tests/test_correctness.py tests/test_optim.py 2>&1 | tee "$OUT/tests.log" | tail -25

echo "== torchrun demo, NCCL, world size 1"
timeout 60 python3 -m torch.distributed.run --standalone --nproc_per_node=1 examples/distributed_demo.py
timeout 60 python3 examples/distributed_demo.py

echo "== loss + center update (row-sparse optimizers against torch.optim), bytes per class"
timeout 150 python3 -m benchmarks.center_update --rounds 10 2>&1  # prints each case as it is measured
find benchmarks/results -type f -newer "$OUT/tests.log" -exec cp {} "$OUT/" \;

echo "== quick benchmark report"
timeout 240 python3 -m benchmarks.report --quick --no-capacity 2>&1
# only what this run wrote: the device tool brings back at most 8 files
find benchmarks/results -type f -newer "$OUT/tests.log" -exec cp {} "$OUT/" \;
cat benchmarks/results/nvidia-*.md 2>/dev/null
