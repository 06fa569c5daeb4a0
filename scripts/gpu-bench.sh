#!/usr/bin/env bash
# Every measurement that needs a GPU, in one run of at most 9 minutes (the device tool's budget is 15 minutes a task,
# start-up included). Replaces gpu-bench-train.sh and gpu-bench-decode.sh. Writes $OUT/*.json and *.log, then a table.
#   prepare on the CPU:   python -c "from crosslayer.loading import load_tokenizer; load_tokenizer('../shared/models/\
#                           smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf').save_pretrained('runs/gpu-tokenizer')"
#                         (the random models' tokenizer: ../shared is not on the lent machine; carry runs/gpu-tokenizer)
#   on the lent machine:  bash scripts/gpu-bench.sh            (OUT=out by default; carry .whl/ for transformers)
#   dry run on a CPU:     DRY_RUN=1 bash scripts/gpu-bench.sh   (tiny presets, a few steps: checks the script, not speed)
# Each step has its own time cap, cut further to what is left of the whole run's (BUDGET_S), so one that hangs cannot
# take the rest with it. Steps 3-5 are the conversion pipeline of docs/uptraining-smollm2.md ("On GPUs") on a random
# 1.1B-shape model: plan search on the device, the frontier, a fit conversion from its plan, logit-distillation recovery.
set -uo pipefail
DRY_RUN=${DRY_RUN:-0}
BUDGET_S=${BUDGET_S:-530}
TOKENIZER=${TOKENIZER:-runs/gpu-tokenizer}
if [ "$DRY_RUN" = 1 ]; then
  OUT=${OUT:-runs/gpu-dry}; mkdir -p "$OUT"; export PYTHONPATH=$PWD
  DEV=cpu; TRAIN=small-H64-MQA,small-H64-MQA-CLA2; DECODE=small-H64-MQA-CLA2; SEQ=128; MB=2; STEPS=1; NEW=8; PROMPT=32
  MODES=eager; BUDGET=256MiB  # a CPU compiles with GEMM autotuning: minutes, not what a dry run checks
  SHAPE=tiny; FLOOR=1; RSTEPS=2; RSEQ=128; RTOKENS=512; RMB=2; BUDGET_S=${DRY_BUDGET_S:-900}
else
  source scripts/gpu-env.sh
  DEV=cuda; TRAIN=1b-H128-MQA,1b-H128-MQA-CLA2; DECODE=1b-H128-MQA-CLA2; SEQ=2048; MB=4; STEPS=5; NEW=128; PROMPT=1920
  MODES=compiled; BUDGET=80GiB; SHAPE=tinyllama-1.1b; FLOOR=11; RSTEPS=12; RSEQ=1024; RTOKENS=32768; RMB=8
  timeout 60 python3 scripts/gpu_check.py | tee "$OUT/gpu-check.json" || exit 1
fi
TOKENIZER_FLAG=()
[ -d "$TOKENIZER" ] && TOKENIZER_FLAG=(--tokenizer "$TOKENIZER")
START=$SECONDS
step() {  # step NAME SECONDS COMMAND...: run (at most SECONDS, and no longer than the run has left), keep its log
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET_S - (SECONDS - START)))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then echo "$name skipped (the run's $BUDGET_S s are spent)" | tee -a "$OUT/status.txt"; return; fi
  echo "== $name (at most $limit s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name exit $?" | tee -a "$OUT/status.txt"
  tail -n 12 "$OUT/$name.log"
}
# 1. training throughput and MFU: our trainer vs transformers' Llama of the same shape, bf16 autocast
step train 150 python3 -m crosslayer bench train --presets "$TRAIN" --seq-len "$SEQ" --micro-batch "$MB" --steps "$STEPS" \
  --warmup 1 --repeats 2 --device "$DEV" --dtype bf16 --json-out "$OUT/train.json"
# 2. decode at batch 1 and 16 (compiled step, 16-bit and int8 caches) against the HBM roofline bench decode reports
step decode 150 python3 -m crosslayer bench decode --preset "$DECODE" --batch-sizes 1,16 --prompt-len "$PROMPT" \
  --new-tokens "$NEW" --modes "$MODES" --kv-dtypes auto,int8 --repeats 2 --device "$DEV" --dtype bf16 \
  --json-out "$OUT/decode.json"
# 3. conversion on the GPU: a random 1.1B-shape bf16 model (made outside $OUT, never fetched back), plan search to
#    half the KV on the device (time and peak memory), calibration on this repository's docs
SCRATCH=$(mktemp -d)
step random-model 90 python3 scripts/random_model.py "$SHAPE" "$SCRATCH/source" "${TOKENIZER_FLAG[@]}"
step convert 150 python3 scripts/peak_memory.py --json "$OUT/convert-memory.json" --weights-of "$SCRATCH/source" -- \
  python3 -m crosslayer convert "$SCRATCH/source" --out "$SCRATCH/cla" --plan search --kv-budget 0.5 \
  --calibration "docs/*.md" --device "$DEV" --no-progress --json-out "$OUT/convert.json"
# 4. the frontier on the device, from the dense model down to half the producers (merged plans, no boundary moves)
step frontier 120 python3 -m crosslayer frontier "$SCRATCH/source" --out "$SCRATCH/frontier" --calibration "docs/*.md" \
  --heldout README.md --heldout-tokens 1024 --heldout-window 512 --floor "$FLOOR" --no-refine --device "$DEV" \
  --no-progress --json-out "$OUT/frontier.json"
# 5. recovery tokens/s: logit distillation (configs/recover-logits.yaml) of the searched model, its source the teacher
step prepare 60 python3 -m crosslayer prepare "text:docs/*.md" --tokenizer "hf:$SCRATCH/source" --out "$SCRATCH/data" \
  --no-progress
step recover 150 python3 -m crosslayer train configs/recover-logits.yaml --init "$SCRATCH/cla" --out "$SCRATCH/recover" \
  --set teacher="$SCRATCH/source" --set data="$SCRATCH/data" --set max_steps="$RSTEPS" --set seq_len="$RSEQ" \
  --set batch_tokens="$RTOKENS" --set micro_batch="$RMB" --set dtype=bf16 --set device="$DEV" --set eval_tokens="$RTOKENS" \
  --set log_every=1 --no-progress
cp "$SCRATCH/recover/metrics.jsonl" "$OUT/recover-metrics.jsonl" 2>/dev/null
rm -rf "$SCRATCH"
# 6. KV memory at a fixed budget: sequences that fit and their decode tokens/s, CLA2 vs its MQA twin
step memory 120 python3 -m crosslayer bench memory --presets "${TRAIN}" --kv-dtypes auto,int8 --batch-sizes 1 \
  --context-lengths "$((PROMPT + NEW))" --budget "$BUDGET" --decode-tokens 16 \
  --dtype bf16 --device "$DEV" --json-out "$OUT/memory.json"
# the table last: one line per JSON written
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for name in ("train", "decode", "memory", "convert-memory", "frontier"):
    path = out / f"{name}.json"
    if not path.is_file():
        print(f"{name:14s} (no result: see {name}.log)")
        continue
    r = json.loads(path.read_text())
    keys = {k: r[k] for k in ("device", "ours_over_transformers", "second_over_first", "wall_s", "ratio", "seconds")
            if k in r}
    if name == "frontier":
        keys["rows"] = [(row["producers"], round(row["calibration_kl"], 4)) for row in r["rows"]]
    print(f"{name:14s} {json.dumps(keys)}")
path = out / "recover-metrics.jsonl"
steps = [json.loads(ln) for ln in path.read_text().splitlines() if "tokens_per_s" in ln] if path.is_file() else []
if steps:
    later = [s["tokens_per_s"] for s in steps[1:]] or [steps[0]["tokens_per_s"]]
    print(f"{'recover':14s} {len(steps)} steps, tokens/s after the first: {sum(later) / len(later):,.0f}")
else:
    print(f"{'recover':14s} (no result: see recover.log)")
PY
