"""vLLM's offline engine as a reference row for `crosslayer bench decode` (run by it, in vLLM's Python).

    VLLM_PYTHON scripts/vllm_decode_reference.py MODEL_DIR --prompts prompts.json --new-tokens 48 --repeats 3

MODEL_DIR is a transformers checkpoint (the bench saves its Llama there); prompts.json maps a batch
size to its prompts' token ids. For each batch: one untimed warm-up, then `repeats` timed calls of
`LLM.generate` (greedy, exactly `new-tokens` tokens, no detokenisation); end-to-end tokens/s = batch x
new tokens / wall time of the call (prefill included), median. Prints one JSON line with the figures
and the greedy tokens of the last call. Imports vLLM only (not crosslayer, whose transformers vLLM's
environment may not match), so it runs in any environment vLLM runs in.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="transformers checkpoint folder")
    parser.add_argument("--prompts", required=True, help="JSON file: {batch size: [[token ids], ...]}")
    parser.add_argument("--new-tokens", type=int, required=True, help="tokens generated per prompt")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per batch size (median)")
    parser.add_argument("--dtype", default="float32", help="vLLM dtype (float32 to match the bench's fp32 runs)")
    args = parser.parse_args()

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: the engine runs here
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV pages; plenty for these batches
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = {int(b): ids for b, ids in json.loads(open(args.prompts).read()).items()}
    longest = max(len(row) for rows in prompts.values() for row in rows)
    llm = LLM(model=args.model, dtype=args.dtype, skip_tokenizer_init=True, seed=0,
              max_model_len=longest + args.new_tokens, max_num_seqs=max(prompts))
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, min_tokens=args.new_tokens, ignore_eos=True,
                            detokenize=False)
    batches = {}
    for batch, rows in sorted(prompts.items()):
        requests = [TokensPrompt(prompt_token_ids=row) for row in rows]
        llm.generate(requests, params, use_tqdm=False)  # warm-up (compilation, first touches)
        rates = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            outputs = llm.generate(requests, params, use_tqdm=False)
            rates.append(batch * args.new_tokens / (time.perf_counter() - start))
        batches[batch] = {"tokens_per_s": statistics.median(rates), "tokens_per_s_all": rates, "dtype": args.dtype,
                          "tokens": [list(o.outputs[0].token_ids) for o in outputs]}
    print(json.dumps({"vllm": vllm.__version__, "batches": batches}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
