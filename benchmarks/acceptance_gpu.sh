#!/usr/bin/env bash
# One device call (~9 minutes on a 2-GPU host) for the speed figures the open issues' acceptance asks
# for and that were last measured short of their targets or not at all; the summary goes to stdout
# (a device call brings few files back). Run the whole suite (benchmarks/gpu_check.sh) in another call.
#   GPU 0: issue 11 (`--synthetic qwen3-30b-a3b` bf16 vs NVFP4: decode b1 / b32, prefill 2048) and
#          issue 13 (`--synthetic nemotron-h-8b` bf16 vs NVFP4 with a quantized lm_head);
#   GPU 1: issue 15 (benchmarks/serve_gpu.sh, 128-token prompts and 512 new tokens: capacity against
#          bench batch-64, TTFT at 80% of it, the prefix probe) and issue 12 (MTP on qwen3.5-27b).
# With one GPU (GPUS=1) the two queues run one after the other.
#   OUT=out bash benchmarks/acceptance_gpu.sh
set -u
OUT=${OUT:-out}; GPUS=${GPUS:-2}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
here=$(dirname "$0")
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1
moe_and_hybrid() {
  GPU=0 OUT=$OUT bash "$here/bench_queue.sh" \
    "q30-bf16|130|--synthetic qwen3-30b-a3b --scheme bf16 --prompt-lens 2048 --batches 1,32 --new-tokens 64" \
    "q30-nvfp4|130|--synthetic qwen3-30b-a3b --scheme nvfp4 --prompt-lens 2048 --batches 1,32 --new-tokens 64" \
    "nemo-bf16|90|--synthetic nemotron-h-8b --scheme bf16 --prompt-lens 2048 --batches 1,32 --new-tokens 64" \
    "nemo-nvfp4-head|90|--synthetic nemotron-h-8b --scheme nvfp4 --lm-head-quant --prompt-lens 2048 --batches 1,32 --new-tokens 64"
}
serve_and_mtp() {
  ( export CUDA_VISIBLE_DEVICES=$(( GPUS > 1 ? 1 : 0 ))
    SEQS=64 REQS=256 PROMPT=128 GEN=512 BENCH_S=100 CAP_S=100 LOAD_S=120 OUT=$OUT/serve timeout 360 \
      bash "$here/serve_gpu.sh" 2>&1 | grep -v "_created" )
  GPU=$(( GPUS > 1 ? 1 : 0 )) OUT=$OUT bash "$here/bench_queue.sh" \
    "q35-mtp|110|--synthetic qwen3.5-27b --speculative mtp --mtp-agree --batches 1 --prompt-lens 512 --new-tokens 64"
}
if [ "$GPUS" -gt 1 ]; then
  moe_and_hybrid > "$OUT/queue0.txt" 2>&1 &
  serve_and_mtp > "$OUT/queue1.txt" 2>&1 &
  wait
else
  moe_and_hybrid > "$OUT/queue0.txt" 2>&1
  serve_and_mtp > "$OUT/queue1.txt" 2>&1
fi
cat "$OUT/queue0.txt" "$OUT/queue1.txt"
echo "== bench summaries"
python3 "$here/bench_summary.py" "$OUT"/*.json
python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def tok(name, batch):
    try:
        return json.loads((out / f"{name}.json").read_text())["decode"][str(batch)]["tok_s"]
    except (OSError, ValueError, KeyError):
        return None
def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "n/a"
for model in ("q30", "nemo"):
    q = "q30-nvfp4" if model == "q30" else "nemo-nvfp4-head"
    print(f"{model}: NVFP4 / bf16 at b1 {ratio(tok(q, 1), tok(f'{model}-bf16', 1))}; "
          f"bf16 b32 / b1 {ratio(tok(f'{model}-bf16', 32), tok(f'{model}-bf16', 1))}")
EOF
