"""Quality cost of an 8-bit KV cache, measured where the cache is read (issue 14):

    python scripts/quant_quality.py --out docs/benchmarks/quant-quality.json

Models: SmolLM2-135M-Instruct (the shared GGUF file, dequantised to fp32) converted with
`crosslayer.convert.convert` into its exact CLA1 copy and a CLA2 model (layers 0 and 1 dense, then
pairs: kv_sources 0, 1, 2, 2, 4, 4, ..., 28, 28; K/V mean-initialised, not uptrained), written once
under --work. Weights are fp32 throughout; only the cache's storage changes between rows:
fp32 (reference), bf16, and int8 / fp8 with one scale per token and K/V head (`token`) or, for keys,
per channel calibrated on the first chunk (`channel`).

Perplexity: the first --tokens tokens of WikiText-2 test (after a BOS token), cut into segments of
--segment tokens; of each, the first --prefill tokens are fed at once as a prompt (full precision
among themselves; they calibrate per-channel key scales), then every further token is a decode step
through the cache (`crosslayer.decode.chunked_nll`, chunk 1): it attends to all earlier tokens of
its segment, and to itself, as the cache stores them, which is what decoding reads (a single full
prefill would never read the cache). Every token but each segment's first is scored.
Passkey: `crosslayer.eval.passkey.build_prompt` prompts (lengths x depths x trials, random 5-digit
keys), prefilled in full precision, answered greedily by `fast_generate` through the cache.
Greedy check: the chat prompt "What is the capital of France?", 32 tokens, each cache against bf16.
Prints a table and writes every figure to --out (JSON). `--kv-bytes`: only the bytes per token of a
live cache per model and cache, measured against the analytic figure (seconds, not minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GGUF = REPO.parent / "shared" / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI = REPO.parent / "shared" / "data" / "wikitext-2" / "wiki.test.raw"
CLA2_PLAN = [0, 1] + [i - (i % 2) for i in range(2, 30)]  # 0, 1, 2, 2, 4, 4, ..., 28, 28


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def models(work: Path) -> dict[str, Path]:
    """The CLA1 copy and the CLA2 conversion of SmolLM2, converted once into `work`."""
    from crosslayer.convert import convert

    out = {"CLA1": work / "smollm2-cla1", "CLA2": work / "smollm2-cla2"}
    for name, folder in out.items():
        if not (folder / "config.json").is_file():
            log(f"converting {GGUF.name} -> {folder} ({name})")
            convert(GGUF, folder, kv_sources=CLA2_PLAN if name == "CLA2" else None, dtype="fp32")
    return out


def passkey_accuracy(model, tokenizer, kv_dtype: str, granularity: str, lengths: list[int], depths: list[float],
                     trials: int) -> dict:
    from crosslayer.decode import fast_generate
    from crosslayer.eval.passkey import build_prompt

    rng = random.Random(0)
    hits, cells = 0, {}
    for length in lengths:
        for depth in depths:
            ok = 0
            for _ in range(trials):
                key = rng.randint(10000, 99999)
                ids = torch.tensor([build_prompt(tokenizer, length, depth, key)])
                out = fast_generate(model, ids, max_new_tokens=8, kv_dtype=kv_dtype, k_granularity=granularity)
                answer = tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
                digits = re.match(r"\s*(\d+)", answer)
                ok += bool(digits) and digits[1].startswith(str(key))
            cells[f"{length}@{depth}"] = ok / trials
            hits += ok
    return {"accuracy": hits / (len(lengths) * len(depths) * trials), "cells": cells}


def kv_bytes(folders: dict[str, Path], names: list[str], caches: list[str], out_path: Path) -> int:
    """Bytes per token of a live ProducerCache (crosslayer.kv.cache_nbytes over its slots) against the
    analytic crosslayer.kv.kv_bytes_per_token; ratios against the first model's bf16 cache."""
    from crosslayer.decode import fast_generate
    from crosslayer.kv import cache_nbytes, kv_bytes_per_token
    from crosslayer.loading import load_model

    rows = []
    for name in names:
        model, _ = load_model(folders[name], device="cpu", dtype="fp32")
        ids = torch.randint(0, model.config.vocab_size, (2, 100), generator=torch.Generator().manual_seed(0))
        for spec in caches:
            kv_dtype, _, granularity = spec.partition(":")
            out = fast_generate(model, ids, max_new_tokens=28, kv_dtype=kv_dtype, k_granularity=granularity or "token")
            slots = 2 * 128  # batch x (100 prompt + 28 new) preallocated
            rows.append({"model": name, "producers": model.config.num_producer_layers, "cache": spec,
                         "measured_per_token": cache_nbytes(out.cache) / slots,
                         "analytic_per_token": kv_bytes_per_token(model.config, kv_dtype)})
        del model
    base = rows[0]["measured_per_token"]
    print(f"{'model':10s} {'cache':14s} {'measured B/token':>16s} {'analytic':>9s} {'vs first':>8s}")
    for r in rows:
        r["vs_first"] = r["measured_per_token"] / base
        print(f"{r['model']:10s} {r['cache']:14s} {r['measured_per_token']:>16,.1f} {r['analytic_per_token']:>9,} "
              f"{r['vs_first']:>8.4f}")
    out_path.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/crosslayer-quant", help="where the converted models are kept")
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--tokens", type=int, default=8192, help="WikiText-2 test tokens scored")
    parser.add_argument("--segment", type=int, default=1024, help="tokens per independent segment")
    parser.add_argument("--prefill", type=int, default=64, help="tokens of each segment fed at once, as a prompt")
    parser.add_argument("--batch", type=int, default=8, help="segments decoded together")
    parser.add_argument("--models", default="CLA1,CLA2",
                        help="which models: CLA1 / CLA2 (converted into --work here), or NAME=DIR for a model folder "
                             "converted elsewhere (e.g. with a searched plan and --kv-init fit)")
    parser.add_argument("--caches", default="fp32,bf16,int8:token,int8:channel,fp8:token,fp8:channel",
                        help="KV dtype[:key granularity] per row")
    parser.add_argument("--passkey-lengths", default="256,512,1024")
    parser.add_argument("--passkey-depths", default="0,0.5,1")
    parser.add_argument("--passkey-trials", type=int, default=3)
    parser.add_argument("--kv-bytes", action="store_true",
                        help="only measure KV bytes per token: a live cache after a real prefill of 2 x 100 random "
                             "tokens and 28 decoded ones, per model and cache, against crosslayer.kv's analytic figure")
    args = parser.parse_args()

    from crosslayer.decode import chunked_nll, fast_generate
    from crosslayer.loading import load_model

    torch.manual_seed(0)
    names = [m.partition("=")[0] for m in args.models.split(",")]
    given = {name: Path(folder) for name, _, folder in (m.partition("=") for m in args.models.split(",")) if folder}
    folders = given | (models(Path(args.work)) if set(names) - set(given) else {})
    results = {"tokens": args.tokens, "segment": args.segment, "prefill": args.prefill, "chunk": 1, "gguf": GGUF.name,
               "cla2_plan": CLA2_PLAN, "models": {n: str(f) for n, f in folders.items()},
               "torch": torch.__version__, "rows": []}
    out_path = Path(args.out)
    if args.kv_bytes:
        return kv_bytes(folders, names, args.caches.split(","), out_path)
    for name in names:
        model, tokenizer = load_model(folders[name], device="cpu", dtype="fp32")
        text = WIKI.read_text(encoding="utf-8")
        ids = tokenizer(text[: 40 * args.tokens], add_special_tokens=False)["input_ids"][: args.tokens - 1]
        stream = torch.tensor([tokenizer.bos_token_id or tokenizer.eos_token_id] + ids)
        chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                             add_generation_prompt=True, return_tensors="pt", return_dict=True)
        greedy = {}
        for spec in args.caches.split(","):
            kv_dtype, _, granularity = spec.partition(":")
            granularity = granularity or "token"
            start = time.time()
            nll, count = chunked_nll(model, stream, args.segment, 1, kv_dtype=kv_dtype, k_granularity=granularity,
                                     batch_size=args.batch, prefill=args.prefill)
            ppl = math.exp(nll / count)
            log(f"{name} {spec}: ppl {ppl:.4f} over {count} tokens ({time.time() - start:.0f} s)")
            passkey = passkey_accuracy(model, tokenizer, kv_dtype, granularity,
                                       [int(x) for x in args.passkey_lengths.split(",")],
                                       [float(x) for x in args.passkey_depths.split(",")], args.passkey_trials)
            log(f"{name} {spec}: passkey {passkey['accuracy']:.3f} ({time.time() - start:.0f} s)")
            out = fast_generate(model, chat["input_ids"], chat["attention_mask"], max_new_tokens=32, kv_dtype=kv_dtype,
                                k_granularity=granularity)
            greedy[spec] = out.sequences[0, chat["input_ids"].shape[1]:].tolist()
            results["rows"].append({"model": name, "kv_dtype": kv_dtype, "k_granularity": granularity,
                                    "perplexity": ppl, "nll": nll, "tokens_scored": count,
                                    "passkey_accuracy": passkey["accuracy"], "passkey_cells": passkey["cells"],
                                    "greedy_text": tokenizer.decode(greedy[spec], skip_special_tokens=True)})
            out_path.write_text(json.dumps(results, indent=1) + "\n")  # partial results survive an interruption
        for row in results["rows"]:
            if row["model"] == name and "bf16" in greedy:
                spec = row["kv_dtype"] + ("" if row["kv_dtype"] in ("fp32", "bf16") else f":{row['k_granularity']}")
                row["greedy_equal_to_bf16"] = greedy[spec] == greedy["bf16"]
        del model
    reference = {r["model"]: r["perplexity"] for r in results["rows"] if r["kv_dtype"] == "bf16"}
    print(f"{'model':6s} {'cache':14s} {'ppl':>10s} {'vs bf16':>8s} {'passkey':>8s} {'greedy = bf16':>13s}")
    for r in results["rows"]:
        rel = r["perplexity"] / reference[r["model"]] - 1 if r["model"] in reference else float("nan")
        r["relative_to_bf16"] = rel
        print(f"{r['model']:6s} {r['kv_dtype'] + ':' + r['k_granularity']:14s} {r['perplexity']:>10.4f} {rel:>+8.2%} "
              f"{r['passkey_accuracy']:>8.3f} {str(r.get('greedy_equal_to_bf16', '')):>13s}")
    out_path.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
