#!/usr/bin/env bash
# Runs `lowbit bench` jobs one after another on one GPU, each in its own process with its own time
# limit, keeping every job's JSON and log in $OUT (a timeout or a crash keeps what finished).
#   GPU=0 OUT=out bash benchmarks/bench_queue.sh "name|seconds|bench args" ...
# e.g. "q30-bf16|200|--synthetic qwen3-30b-a3b --scheme bf16 --prompt-lens 2048 --batches 1,32"
# Several queues can run side by side on a multi-GPU host (GPU=0 ... & GPU=1 ... &): each job sees
# only its GPU, so the timings of one queue are not mixed with another's.
set -u
OUT=${OUT:-out}; GPU=${GPU:-0}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
for job in "$@"; do
  IFS='|' read -r name secs args <<< "$job"
  start=$(date +%s)
  # shellcheck disable=SC2086
  CUDA_VISIBLE_DEVICES=$GPU timeout "$secs" python3 -m lowbit bench $args --json > "$OUT/$name.json" 2> "$OUT/$name.log"
  rc=$?
  echo "[gpu $GPU] $name rc=$rc $(( $(date +%s) - start ))s"
  [ $rc -ne 0 ] && tail -5 "$OUT/$name.log"
done
