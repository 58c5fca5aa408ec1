#!/usr/bin/env bash
# One device call for issue 15's load figures: `lowbit bench`'s batch-64 decode as the baseline,
# then a real `lowbit serve` of the same synthetic model under Poisson load from real streaming
# openai clients (benchmarks/serve.py): all-at-once (capacity), then 80% of the measured capacity,
# then the prefix-cache probe (a repeated 2k-token system prompt, cold vs warm TTFT).
#   MODEL=llama-3-8b SCHEME=nvfp4 OUT=out bash benchmarks/serve_gpu.sh
set -u
MODEL=${MODEL:-llama-3-8b}; SCHEME=${SCHEME:-nvfp4}; OUT=${OUT:-out}; PORT=${PORT:-8031}
SEQS=${SEQS:-64}; REQS=${REQS:-256}; PROMPT=${PROMPT:-512}; GEN=${GEN:-128}; CLIENTS=${CLIENTS:-4}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
tag="$MODEL-$SCHEME"
timeout "${BENCH_S:-150}" python3 -m lowbit bench --synthetic "$MODEL" --scheme "$SCHEME" --prompt-lens 2048 \
    --batches "$SEQS" --decode-prompt "$PROMPT" --new-tokens 64 --json > "$OUT/bench-$tag.json" 2> "$OUT/bench-$tag.log"
bench_tok_s=$(python3 -c "import json; print(json.load(open('$OUT/bench-$tag.json'))['decode']['$SEQS']['tok_s'])" 2>/dev/null || echo "")
echo "bench batch-$SEQS decode: ${bench_tok_s:-failed} tok/s"
python3 -m lowbit serve --synthetic "$MODEL" --scheme "$SCHEME" --max-num-seqs "$SEQS" --max-model-len 4096 \
    --port "$PORT" > "$OUT/serve-$tag.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 1 240); do
  python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2>/dev/null && break
  kill -0 $server 2>/dev/null || { echo "server died:"; tail -20 "$OUT/serve-$tag.log"; exit 1; }
  sleep 1
done
url=http://127.0.0.1:$PORT
extra=(); [ -n "$bench_tok_s" ] && extra=(--bench-tok-s "$bench_tok_s")
timeout "${CAP_S:-150}" python3 benchmarks/serve.py --url "$url" --rates inf --requests "$REQS" --prompt-len "$PROMPT" \
    --max-tokens "$GEN" --clients "$CLIENTS" "${extra[@]}" --json "$OUT/serve-cap-$tag.json" | tee "$OUT/serve-cap-$tag.txt"
rate=$(python3 -c "
import json; d = json.load(open('$OUT/serve-cap-$tag.json'))
print(round(0.8 * d['rates'][0]['req_s'], 2))" 2>/dev/null || echo 4)
echo "80% of capacity: $rate requests/s"
timeout "${LOAD_S:-150}" python3 benchmarks/serve.py --url "$url" --rates "$rate" --requests "$REQS" --prompt-len "$PROMPT" \
    --max-tokens "$GEN" --clients "$CLIENTS" "${extra[@]}" --prefix-probe --prefix-len 2048 --json "$OUT/serve-80-$tag.json" \
    | tee "$OUT/serve-80-$tag.txt"
python3 -c "import urllib.request as u; print(u.urlopen('$url/metrics').read().decode())" | grep -E "^lowbit_(prefix|kv|requests|queue)" | head -20
