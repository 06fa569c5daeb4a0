#!/usr/bin/env bash
# Issue 3's GPU measurements, run once on a lent H100/H200 (device tool), files under $OUT:
#   bash scripts/gpu-bench-train.sh
# Needs the transformers 5.24 wheel in .whl/ (the GPU image ships an older transformers).
set -uo pipefail
source scripts/gpu-env.sh
python3 scripts/gpu_check.py | tee "$OUT/gpu-check.json" || exit 1
python3 -m crosslayer bench train --presets 125m-H64-MQA,125m-H64-MQA-CLA2 --seq-len 2048 --micro-batch 8 \
  --steps 10 --warmup 3 --repeats 3 --json-out "$OUT/train-125m.json" 2>&1 | tee "$OUT/train-125m.log"
python3 -m crosslayer bench train --presets 1b-H128-MQA,1b-H128-MQA-CLA2 --seq-len 2048 --micro-batch 4 \
  --steps 5 --warmup 2 --repeats 3 --json-out "$OUT/train-1b.json" 2>&1 | tee "$OUT/train-1b.log"
timeout 240 python3 -m crosslayer bench train --presets 125m-H64-MQA,125m-H64-MQA-CLA2 --seq-len 2048 \
  --micro-batch 8 --steps 10 --warmup 3 --repeats 3 --compile --json-out "$OUT/train-125m-compile.json" \
  2>&1 | tee "$OUT/train-125m-compile.log"
echo done
