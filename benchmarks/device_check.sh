#!/usr/bin/env bash
# The one prepared GPU check of issue 13 (under 8 minutes on a CUDA machine): the device
# tests, then benchmarks/device_check.py (round vs clone, exact quire matmul vs
# round(float32 matmul) vs float32 matmul, LeNet-5 / ResNet-20 training steps/s).
#   benchmarks/device_check.sh            # on a machine with a CUDA GPU
#   benchmarks/device_check.sh --dry-run  # on the CPU: tiny sizes through Triton's interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_WAIT_POLICY=PASSIVE
if [[ "${1:-}" == "--dry-run" ]]; then
    exec timeout 600 python benchmarks/device_check.py --device cpu --tiny
fi
python -c "import torch, triton, sys; print('torch', torch.__version__, 'triton', triton.__version__); sys.exit(0 if torch.cuda.is_available() else 3)" \
    || { echo "device_check.sh: no CUDA device (or no triton); use --dry-run on a CPU" >&2; exit 2; }
# The device tests: with a GPU, tests/test_triton_backend.py runs the compiled kernels on CUDA tensors.
timeout 180 python -m pytest -q -p no:cacheprovider tests/test_triton_backend.py
echo "device tests exit code: $?"
timeout 270 python benchmarks/device_check.py --device cuda
