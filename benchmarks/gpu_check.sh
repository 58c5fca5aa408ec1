#!/usr/bin/env bash
# One device call that runs the whole test suite on the GPU(s) (CUDA tests included) and prints the
# fixture error table. Run from the repo root on the GPU machine, with fixtures carried in:
#   LOWBIT_FIXTURES=.gpu_fixtures bash benchmarks/gpu_check.sh [pytest args]
# With several GPUs the test files are split into one shard per GPU, run side by side (each shard
# sees one GPU through CUDA_VISIBLE_DEVICES), then the tests that need two GPUs (NCCL) run on all of
# them. SHARDS=1 runs everything in one process. Logs land in $OUT (default /tmp/lowbit-gpu), with
# gpu_durations.txt (seconds per test file): copy it to benchmarks/ to balance the next run's shards.
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
  # Files to shards by weight, heaviest first, each to the lightest shard so far (weight: seconds
  # from benchmarks/gpu_durations.txt, "file seconds" lines from an earlier run, else the file's size
  # in KB), so the shards take about as long.
  mapfile -t ASSIGN < <(python3 - "$SHARDS" <<'PY'
import os, sys
shards = int(sys.argv[1])
known = {}
if os.path.exists("benchmarks/gpu_durations.txt"):
    for line in open("benchmarks/gpu_durations.txt"):
        if line.strip() and not line.startswith("#"):
            f, sec = line.split()
            known[f] = float(sec)
files = [os.path.join(d, f) for d, _, fs in os.walk("tests") for f in fs if f.startswith("test_") and f.endswith(".py")]
weight = {f: known.get(f, os.path.getsize(f) / 1000) for f in files}
load = [0.0] * shards
for f in sorted(files, key=lambda f: -weight[f]):
    s = load.index(min(load))
    load[s] += weight[f]
    print(s, f)
PY
)
  pids=()
  for ((s = 0; s < SHARDS; s++)); do
    mine=()
    for line in "${ASSIGN[@]}"; do [ "${line%% *}" = "$s" ] && mine+=("${line#* }"); done
    CUDA_VISIBLE_DEVICES=$s "${PYTEST[@]}" -k "not nccl" --junitxml="$OUT/junit_$s.xml" "${mine[@]}" "$@" \
        > "$OUT/pytest_gpu_$s.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  for ((s = 0; s < SHARDS; s++)); do echo "== shard $s"; tail -40 "$OUT/pytest_gpu_$s.log"; done
  # seconds per test file, for the next run's sharding (copy to benchmarks/gpu_durations.txt)
  python3 - "$OUT" <<'PY' > "$OUT/gpu_durations.txt"
import collections, glob, sys, xml.etree.ElementTree as ET
secs = collections.Counter()
for f in glob.glob(sys.argv[1] + "/junit_*.xml"):
    for case in ET.parse(f).iter("testcase"):
        parts = case.get("classname", "").split(".")  # tests.faults.test_corpus[.TestClass]
        upto = next((i for i, p in enumerate(parts) if p.startswith("test_")), len(parts) - 1)
        secs["/".join(parts[:upto + 1]) + ".py"] += float(case.get("time") or 0)
print("# seconds per test file on the GPU (benchmarks/gpu_check.sh)")
for name, t in secs.most_common():
    print(name, round(t, 1))
PY
  echo "== two-GPU tests"  # NCCL_K narrows them (a pytest -k expression), e.g. NCCL_K="nccl and hybrid"
  "${PYTEST[@]}" -k "${NCCL_K:-nccl}" tests/test_tp.py tests/test_serve_tp.py "$@" 2>&1 | tee "$OUT/pytest_gpu_nccl.log" | tail -20
fi
python3 benchmarks/fixture_errors.py --device cuda --json "$OUT/fixture_errors.json" 2>&1 | tee "$OUT/fixture_errors.txt"
