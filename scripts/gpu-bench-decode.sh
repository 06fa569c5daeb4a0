#!/usr/bin/env bash
# Issue 5's GPU measurements, to run once on a lent H100/H200 (device tool), files under $OUT:
#   bash scripts/gpu-bench-decode.sh        (about 8 minutes; the longest step is compiling)
# Needs the transformers 5.24 wheel in .whl/ (the GPU image ships an older transformers).
# Order: correctness first, then memory (fast), then decode speed, each capped by `timeout`.
set -uo pipefail
source scripts/gpu-env.sh
# the fast path's greedy tokens == transformers' on a real GPU (fp32, tiny), eager and compiled
timeout 120 python3 -m crosslayer bench decode --preset tiny-H32-MQA-CLA2 --batch-sizes 1,8 --prompt-len 64 \
  --new-tokens 32 --repeats 1 --dtype fp32 --json-out "$OUT/decode-check.json" 2>&1 | tail -n 4 | tee "$OUT/decode-check.log"
# KV bytes measured vs analytic, peak allocated, largest batch in 80 GiB at 2048 and 8192 tokens
timeout 150 python3 -m crosslayer bench memory --presets 1b-H128-MQA,1b-H128-MQA-CLA2 --batch-sizes 1,8 \
  --context-lengths 2048,8192 --budget 80GiB --dtype bf16 --plot "$OUT/kv-vs-context-1b.png" \
  --json-out "$OUT/memory-1b.json" 2>&1 | tail -n 12 | tee "$OUT/memory-1b.log"
# decode speed, 1B, bf16: 2048 and 8192 tokens of context (prompt + new)
for prompt in 1920 8064; do
  timeout 240 python3 -m crosslayer bench decode --preset 1b-H128-MQA-CLA2 --batch-sizes 1,16,64 \
    --prompt-len $prompt --new-tokens 128 --repeats 3 --json-out "$OUT/decode-1b-$prompt.json" 2>&1 \
    | tail -n 14 | tee "$OUT/decode-1b-$prompt.log"
done
echo done
