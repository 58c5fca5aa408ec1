#!/usr/bin/env bash
# One device call that runs the whole test suite on a GPU (CUDA tests included) and prints the
# fixture error table. Run from the repo root on the GPU machine, with fixtures carried in:
#   LOWBIT_FIXTURES=.gpu_fixtures bash benchmarks/gpu_check.sh
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
OUT=${OUT:-/tmp/lowbit-gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q -p no:cacheprovider -rs --durations=10 tests/ "$@" 2>&1 | tee "$OUT/pytest_gpu.log" | tail -60
python3 benchmarks/fixture_errors.py --device cuda --json "$OUT/fixture_errors.json" 2>&1 | tee "$OUT/fixture_errors.txt"
