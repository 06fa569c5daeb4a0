"""What an fp8 KV cache costs a converted SmolLM2 under vLLM: perplexity from vLLM's prompt logprobs.

SmolLM2-135M-Instruct (../shared/models, GGUF Q4_1, dequantised) converted twice: CLA1, an exact copy
(every layer its own producer), and CLA2 by a hand plan (layers 0 and 1 dense, then pairs (2,3) ...
(28,29) sharing, K/V mean-initialised; 16 producers, no uptraining). Each is served by vLLM in bf16
with a bf16 KV cache, an fp8 (e4m3) cache at vLLM's default scale of 1.0, and an fp8 cache with
per-producer scales calibrated on WikiText-2 validation text (kv_scales.json; consumers use their
producer's). Perplexity over WINDOWS x 512 tokens of WikiText-2 test; KV capacity at a 256 MiB budget.
Prints a table and one JSON line. Needs the vLLM environment; run under the CPU lock here.

    VENV/bin/python scripts/vllm-fp8-quality.py --out runs/fp8-quality
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from crosslayer.bench.serve import prompt_perplexity
from crosslayer.convert import from_hf
from crosslayer.serving.kv_scales import FILE, calibrate_kv_scales, write_kv_scales

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SMOLLM2, GGUF = SHARED / "models" / "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI = SHARED / "data" / "wikitext-2"
PLANS = {"CLA1 (copy)": list(range(30)), "CLA2 (hand plan)": [0, 1] + [2 + 2 * (i // 2) for i in range(28)]}


def windows(tokenizer, path: Path, n: int, size: int = 512) -> list[list[int]]:
    ids = tokenizer(path.read_text()[: 40 * size * n]).input_ids
    if len(ids) < n * size:
        raise SystemExit(f"{path} gives only {len(ids)} tokens, {n * size} needed")
    return [ids[i * size:(i + 1) * size] for i in range(n)]


def main() -> int:
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/fp8-quality")
    p.add_argument("--windows", type=int, default=8, help="512-token windows of WikiText-2 test")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = AutoModelForCausalLM.from_pretrained(SMOLLM2, gguf_file=GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2, gguf_file=GGUF)
    test = windows(tokenizer, WIKI / "wiki.test.raw", args.windows)
    calibration = [torch.tensor([w]) for w in windows(tokenizer, WIKI / "wiki.valid.raw", 8)]
    rows = []
    for name, plan in PLANS.items():
        folder = Path(args.out) / name.split()[0].lower()
        model = from_hf(source, kv_sources=plan)
        scales = calibrate_kv_scales(model, calibration)  # fp32, before rounding the weights to bf16
        model.to(torch.bfloat16).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / FILE).unlink(missing_ok=True)
        for label, kv in (("bf16", "auto"), ("fp8, scale 1.0", "fp8"), ("fp8, calibrated", "fp8")):
            if label == "fp8, calibrated":
                write_kv_scales(folder, scales)
            r = prompt_perplexity(folder, test, kv_cache_dtype=kv, dtype="bfloat16")
            rows.append({"model": name, "producers": model.config.num_producer_layers, "kv_cache": label, **r})
            print(f"{name:18s} {label:16s} ppl {r['perplexity']:8.3f}  KV capacity {r['kv_capacity_tokens']:>9,}",
                  file=sys.stderr, flush=True)
    base = {r["model"]: r for r in rows if r["kv_cache"] == "bf16"}
    cla1 = rows[0]
    print(f"{'model':18s} {'KV cache':16s} {'ppl':>8s} {'vs bf16':>8s} {'KV tokens @256MiB':>18s} {'x CLA1 bf16':>11s}")
    for r in rows:
        r["ppl_vs_bf16"] = r["perplexity"] / base[r["model"]]["perplexity"] - 1
        r["capacity_vs_cla1_bf16"] = r["kv_capacity_tokens"] / cla1["kv_capacity_tokens"]
        print(f"{r['model']:18s} {r['kv_cache']:16s} {r['perplexity']:8.3f} {r['ppl_vs_bf16']:>+8.2%} "
              f"{r['kv_capacity_tokens']:>18,} {r['capacity_vs_cla1_bf16']:>11.2f}")
    print(f"({args.windows} x 512 tokens of WikiText-2 test, vLLM prompt logprobs, bf16 weights)")
    print(json.dumps({"benchmark": "fp8-kv-quality", "windows": args.windows, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
