#!/usr/bin/env bash
# One device call that runs the whole test suite on the GPU(s) (CUDA tests included) and prints the
# fixture error table. Run from the repo root on the GPU machine, with fixtures carried in:
#   LOWBIT_FIXTURES=.gpu_fixtures bash benchmarks/gpu_check.sh [pytest args]
# With several GPUs the test files are split into one shard per GPU, run side by side (each shard
# sees one GPU through CUDA_VISIBLE_DEVICES), then the tests that need two GPUs (NCCL) run on all of
# them. SHARDS=1 runs everything in one process. Logs land in $OUT (default /tmp/lowbit-gpu).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
OUT=${OUT:-/tmp/lowbit-gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
GPUS=$(nvidia-smi -L | wc -l)
SHARDS=${SHARDS:-$GPUS}
PYTEST=(python3 -m pytest -q -p no:cacheprovider -rfEs --durations=15)
if [ "$SHARDS" -le 1 ]; then
  "${PYTEST[@]}" tests/ "$@" 2>&1 | tee "$OUT/pytest_gpu.log" | tail -60
else
  # Files round-robin over the shards, largest first, so the shards take about as long.
  mapfile -t FILES < <(find tests -name 'test_*.py' -printf '%s %p\n' | sort -rn | cut -d' ' -f2)
  pids=()
  for ((s = 0; s < SHARDS; s++)); do
    mine=()
    for ((i = s; i < ${#FILES[@]}; i += SHARDS)); do mine+=("${FILES[$i]}"); done
    CUDA_VISIBLE_DEVICES=$s "${PYTEST[@]}" -k "not nccl" "${mine[@]}" "$@" > "$OUT/pytest_gpu_$s.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  for ((s = 0; s < SHARDS; s++)); do echo "== shard $s"; tail -40 "$OUT/pytest_gpu_$s.log"; done
  echo "== two-GPU tests"
  "${PYTEST[@]}" -k nccl tests/test_tp.py tests/test_serve_tp.py "$@" 2>&1 | tee "$OUT/pytest_gpu_nccl.log" | tail -20
fi
python3 benchmarks/fixture_errors.py --device cuda --json "$OUT/fixture_errors.json" 2>&1 | tee "$OUT/fixture_errors.txt"
