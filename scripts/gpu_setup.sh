# Sourced by the device scripts (gpu_probe.sh, gpu_check.sh): install fastpfc on the bare device
# image without network, report the machine, and set OUT (the folder the device tool brings back).
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
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
