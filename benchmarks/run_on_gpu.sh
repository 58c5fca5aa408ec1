#!/usr/bin/env bash
# One device call for the kernels: GPU tests, an optional tiling sweep, then the full benchmark.
# Everything lands in $OUT (default ./out): tests.txt, sweep.{txt,json}, bench.{txt,json}.
#   SWEEP_S=120 SWEEP_MS=1,16 SWEEP_SHAPES=gate_up,down bash benchmarks/run_on_gpu.sh
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
timeout "${TESTS_S:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gemm.py \
    tests/test_kernels_w8a8.py tests/test_kernels_dispatch.py tests/test_kernels_w4.py 2>&1 | tail -25 | tee "$OUT/tests.txt"
if [ "${SWEEP_S:-0}" -gt 0 ]; then
  timeout "$SWEEP_S" python3 benchmarks/kernels.py --sweep --ms "${SWEEP_MS:-1,16}" \
      --shapes "${SWEEP_SHAPES:-gate_up,down}" --json "$OUT/sweep.json" > "$OUT/sweep.txt" 2>&1
  grep "best\|skip\|Error" "$OUT/sweep.txt" | tail -20
fi
timeout "${BENCH_S:-330}" python3 benchmarks/kernels.py --ms "${BENCH_MS:-1,2,4,8,16,32,64,128,256,1024,4096}" \
    --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
grep -v "done$" "$OUT/bench.txt" | grep -v "^\(qkv\|o\|gate_up\|down\|lm_head\) " | tail -40
