"""Where our bf16 greedy decode parts from transformers' (the models and prompts of `crosslayer bench decode`):
for each row whose tokens differ, the first step that differs and the fp32 model's top-2 logit gap there, on
the prefix both still share. A small gap (next to bf16's rounding of the logits) is a near-tie: either token
is the greedy choice within the precision the step computes in. Prints a table, then one JSON line.
usage: python scripts/bf16_greedy_divergence.py [--preset small-H64-MQA-CLA2] [--batch 16] [--prompt-len 64]
       [--new-tokens 48] [--compile]"""

import argparse
import copy
import json

import torch

from crosslayer.bench.decode import build_models
from crosslayer.decode import fast_generate
from crosslayer.device import cpu_capabilities

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small-H64-MQA-CLA2")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    cpu = torch.device("cpu")
    P, N = args.prompt_len, args.new_tokens
    llama, cla1, _ = build_models(args.preset, cpu, torch.bfloat16, P + N)
    reference = copy.deepcopy(llama).float().eval()  # fp32: the judge of how close a call was
    prompts = torch.Generator().manual_seed(args.batch)  # the prompts bench decode uses at this batch
    ids = torch.randint(0, llama.config.vocab_size, (args.batch, P), generator=prompts)
    with torch.no_grad():
        theirs = llama.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0)
    ours = fast_generate(cla1, ids, max_new_tokens=N, compile=args.compile).sequences
    rows = []
    for r in range(args.batch):
        differ = (theirs[r, P:] != ours[r, P:]).nonzero()
        if not len(differ):
            continue
        t = int(differ[0])
        with torch.no_grad():
            logits = reference(theirs[r:r + 1, :P + t]).logits[0, -1]  # fp32, on the shared prefix
        top = logits.topk(2)
        a, b = int(theirs[r, P + t]), int(ours[r, P + t])
        rows.append({"row": r, "step": t, "transformers": a, "ours": b, "fp32_top2": top.indices.tolist(),
                     "fp32_gap": round(float(top.values[0] - top.values[1]), 4),
                     "fp32_logit_gap_between_the_two": round(float(logits[a] - logits[b]), 4),
                     "logit_scale": round(float(logits.abs().max()), 2)})
    print(f"{args.batch - len(rows)} of {args.batch} rows equal over {N} tokens")
    for row in rows:
        print(f"row {row['row']:2d} parts at step {row['step']:2d}: transformers {row['transformers']}, ours "
              f"{row['ours']}; fp32 top-2 {row['fp32_top2']} gap {row['fp32_gap']:.4f}, the two differ by "
              f"{row['fp32_logit_gap_between_the_two']:+.4f} (max |logit| {row['logit_scale']})")
    print(json.dumps({"preset": args.preset, "batch": args.batch, "prompt_len": P, "new_tokens": N,
                      "compile": args.compile, "rows": rows, "cpu": cpu_capabilities()}))
