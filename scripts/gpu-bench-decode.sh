#!/usr/bin/env bash
# Issues 5 and 14's GPU measurements, to run once on a lent H100/H200 (device tool), files under $OUT:
#   bash scripts/gpu-bench-decode.sh        (about 11 minutes; the longest steps are compiling)
# Needs the transformers 5.24 wheel in .whl/ (the GPU image ships an older transformers).
# Order: correctness first, then memory and capacity (fast), then decode speed, each capped by `timeout`.
set -uo pipefail
source scripts/gpu-env.sh
# the fast path's greedy tokens == transformers' on a real GPU (fp32, tiny), eager and compiled, 16-bit and int8
# caches, against transformers' eager generate and its static-cache compiled generate
timeout 180 python3 -m crosslayer bench decode --preset tiny-H32-MQA-CLA2 --batch-sizes 1,8 --prompt-len 64 \
  --new-tokens 32 --repeats 1 --dtype fp32 --kv-dtypes auto,int8 --json-out "$OUT/decode-check.json" 2>&1 \
  | tail -n 6 | tee "$OUT/decode-check.log"
# KV bytes measured vs analytic (bf16 and int8 + scales), peak allocated, largest batch in 80 GiB at 2048 and
# 8192 tokens and the decode tokens/s at that batch (16 tokens after random K/V)
timeout 240 python3 -m crosslayer bench memory --presets 1b-H128-MQA,1b-H128-MQA-CLA2 --kv-dtypes auto,int8 \
  --batch-sizes 1,8 --context-lengths 2048,8192 --budget 80GiB --decode-tokens 16 --dtype bf16 \
  --plot "$OUT/kv-vs-context-1b.png" --json-out "$OUT/memory-1b.json" 2>&1 | tail -n 24 | tee "$OUT/memory-1b.log"
# decode speed, 1B, bf16, 2048 tokens of context (prompt + new): ours compiled (CUDA graphs), bf16 and int8
# caches, against transformers' eager and static-compiled generate
timeout 300 python3 -m crosslayer bench decode --preset 1b-H128-MQA-CLA2 --batch-sizes 1,16,64 --prompt-len 1920 \
  --new-tokens 128 --modes compiled --kv-dtypes auto,int8 --repeats 3 --json-out "$OUT/decode-1b-1920.json" 2>&1 \
  | tail -n 24 | tee "$OUT/decode-1b-1920.log"
echo done
