#!/usr/bin/env bash
# Every measurement that needs a GPU, in one run of at most 9 minutes (the device tool's budget is 15 minutes a task,
# start-up included). Replaces gpu-bench-train.sh and gpu-bench-decode.sh. Writes $OUT/*.json and *.log, then a table.
#   on the lent machine:  bash scripts/gpu-bench.sh            (OUT=out by default; carry .whl/ for transformers)
#   dry run on a CPU:     DRY_RUN=1 bash scripts/gpu-bench.sh   (tiny presets, a few steps: checks the script, not speed)
# Each step has its own timeout, so one that hangs cannot take the rest with it.
set -uo pipefail
DRY_RUN=${DRY_RUN:-0}
if [ "$DRY_RUN" = 1 ]; then
  OUT=${OUT:-runs/gpu-dry}; mkdir -p "$OUT"; export PYTHONPATH=$PWD
  DEV=cpu; TRAIN=small-H64-MQA,small-H64-MQA-CLA2; DECODE=small-H64-MQA-CLA2; SEQ=128; MB=2; STEPS=1; NEW=8; PROMPT=32
  MODES=eager; BUDGET=256MiB  # a CPU compiles with GEMM autotuning: minutes, not what a dry run checks
  SHAPE=tiny
else
  source scripts/gpu-env.sh
  DEV=cuda; TRAIN=1b-H128-MQA,1b-H128-MQA-CLA2; DECODE=1b-H128-MQA-CLA2; SEQ=2048; MB=4; STEPS=5; NEW=128; PROMPT=1920
  MODES=compiled; BUDGET=80GiB; SHAPE=tinyllama-1.1b
  timeout 60 python3 scripts/gpu_check.py | tee "$OUT/gpu-check.json" || exit 1
fi
step() {  # step NAME SECONDS COMMAND...: run, keep its log, note its exit status
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name exit $?" | tee -a "$OUT/status.txt"
  tail -n 12 "$OUT/$name.log"
}
# 1. training throughput and MFU: our trainer vs transformers' Llama of the same shape, bf16 autocast
step train 200 python3 -m crosslayer bench train --presets "$TRAIN" --seq-len "$SEQ" --micro-batch "$MB" --steps "$STEPS" \
  --warmup 1 --repeats 2 --device "$DEV" --dtype bf16 --json-out "$OUT/train.json"
# 2. decode at batch 1 and 16 (compiled step, 16-bit and int8 caches) against the HBM roofline bench decode reports
step decode 200 python3 -m crosslayer bench decode --preset "$DECODE" --batch-sizes 1,16 --prompt-len "$PROMPT" \
  --new-tokens "$NEW" --modes "$MODES" --kv-dtypes auto,int8 --repeats 2 --device "$DEV" --dtype bf16 \
  --json-out "$OUT/decode.json"
# 3. KV memory at a fixed budget: sequences that fit and their decode tokens/s, CLA2 vs its MQA twin
step memory 120 python3 -m crosslayer bench memory --presets "${TRAIN}" --kv-dtypes auto,int8 --batch-sizes 1 \
  --context-lengths "$((PROMPT + NEW))" --budget "$BUDGET" --decode-tokens 16 \
  --dtype bf16 --device "$DEV" --json-out "$OUT/memory.json"
# 4. conversion on the GPU: a random 1.1B-shape bf16 model (made outside $OUT, never fetched back), plan search to
#    half the KV on the device, calibration on this repository's docs (../shared is not on the lent machine)
SCRATCH=$(mktemp -d)
step random-model 120 python3 scripts/random_model.py "$SHAPE" "$SCRATCH/source"
step convert 240 python3 scripts/peak_memory.py --json "$OUT/convert-memory.json" --weights-of "$SCRATCH/source" -- \
  python3 -m crosslayer convert "$SCRATCH/source" --out "$SCRATCH/cla" --plan search --kv-budget 0.5 \
  --calibration "docs/*.md" --device "$DEV" --no-progress --json-out "$OUT/convert.json"
rm -rf "$SCRATCH"
# the table last: one line per JSON written
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for name in ("train", "decode", "memory", "convert-memory"):
    path = out / f"{name}.json"
    if not path.is_file():
        print(f"{name:8s} (no result: see {name}.log)")
        continue
    r = json.loads(path.read_text())
    keys = {k: r[k] for k in ("device", "ours_over_transformers", "second_over_first", "wall_s", "ratio") if k in r}
    print(f"{name:8s} {json.dumps(keys)}")
PY
