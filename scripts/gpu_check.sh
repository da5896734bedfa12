#!/usr/bin/env bash
# The one prepared run for a lent GPU (device tool): install without network, the CUDA tests, the
# torchrun demo under NCCL at world size 1, and the quick benchmark report. Files land in $OUT.
#   device run: bash scripts/gpu_check.sh      (timeout_s ~ 560)
# The second prepared call (issue 5's GPU check: a short bf16/Triton training, images/s and the
# loss's share of a step), after the same install:
#   python3 scripts/gpu_train_check.py --classes 200000 --steps 300 --batch-size 256   (timeout_s ~ 300)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/fastpfc-gpu}"
mkdir -p "$OUT"
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . ; then
    # An older setuptools may not read pyproject.toml: lay the package out by hand instead.
    site=/tmp/fastpfc-site && rm -rf "$site" && mkdir -p "$site"
    cp -r fastpfc "$site/" && cp -r kernels "$site/fastpfc/kernels"
    export PYTHONPATH="$site:$PWD"
fi
python3 -c "import fastpfc.kernels" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

echo "== CUDA tests"
timeout 200 python3 -m pytest -q -x tests/test_cuda.py tests/test_correctness.py 2>&1 | tee "$OUT/tests.log" | tail -25

echo "== torchrun demo, NCCL, world size 1"
timeout 60 python3 -m torch.distributed.run --standalone --nproc_per_node=1 examples/distributed_demo.py
timeout 60 python3 examples/distributed_demo.py

echo "== quick benchmark report"
timeout 240 python3 -m benchmarks.report --quick --no-capacity 2>&1 | tail -15
cp benchmarks/results/*.md benchmarks/results/*.png "$OUT/" 2>/dev/null
cat benchmarks/results/nvidia-*.md 2>/dev/null
