#!/usr/bin/env bash
# The registry walkthrough on the default run's checkpoint: register one clean image per unseen
# synthetic type (half of them), classify captures of all types at the FPR=1e-4 threshold, add the
# other half without retraining, classify again; then sub-labels and the ONNX export.
# Usage: scripts/registry_demo.sh [RUN_DIR] [WORK_DIR]
set -euo pipefail
run=${1:-runs/default}
work=${2:-runs/registry-demo}
model=$run/checkpoint.pt
rm -rf "$work" && mkdir -p "$work"
set -x
fastpfc-doc --quiet synth "$work/docs"
fastpfc-doc --quiet register -m "$model" -r "$work/registry.npz" "$work/docs/register"
fastpfc-doc --quiet classify -m "$model" -r "$work/registry.npz" --fpr 1e-4 --labelled "$work/docs/queries"
fastpfc-doc --quiet register -m "$model" -r "$work/registry.npz" "$work/docs/new"
fastpfc-doc --quiet classify -m "$model" -r "$work/registry.npz" --fpr 1e-4 --labelled "$work/docs/queries"
fastpfc-doc --quiet synth --types 40 --sub-labels "$work/sub"
fastpfc-doc --quiet register -m "$model" -r "$work/sub.npz" "$work/sub/register"
fastpfc-doc --quiet classify -m "$model" -r "$work/sub.npz" --fpr 1e-4 --labelled "$work/sub/queries"
fastpfc-doc --quiet export -m "$model" -o "$work/model.onnx"
fastpfc-doc --quiet classify -m "$work/model.onnx" -r "$work/registry.npz" --fpr 1e-4 --labelled "$work/docs/queries"
