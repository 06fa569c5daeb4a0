"""vLLM's offline engine as a reference for `crosslayer bench decode`, run in vLLM's own Python.

`crosslayer.bench.decode.vllm_reference` runs this file by its path with an interpreter that has vLLM
(crosslayer need not be installed there) and writes it a request, a JSON object, on stdin:
  model       a transformers checkpoint folder (the bench saves its Llama there);
  prompts     {batch size: [[token ids], ...]};
  new_tokens  tokens generated per prompt; repeats: timed calls per batch size; dtype: vLLM's dtype;
  out         the file the result is written to.
For each batch: one untimed warm-up, then `repeats` timed calls of `LLM.generate` (greedy, exactly
`new_tokens` tokens, no detokenisation); end-to-end tokens/s = batch x new tokens / wall time of the call
(prefill included), median. The result holds vLLM's version and, per batch, the figures and the greedy
tokens of the last call. Imports vLLM and the standard library only (not crosslayer, whose transformers
vLLM's environment may not match), so it runs in any environment vLLM runs in.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time


def run(request: dict) -> dict:
    """vLLM's figures and greedy tokens for `request` (the fields above but `out`)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: the engine runs here
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV pages; plenty for these batches
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = {int(b): ids for b, ids in request["prompts"].items()}
    new_tokens, repeats = request["new_tokens"], request["repeats"]
    longest = max(len(row) for rows in prompts.values() for row in rows)
    llm = LLM(model=request["model"], dtype=request["dtype"], skip_tokenizer_init=True, seed=0,
              max_model_len=longest + new_tokens, max_num_seqs=max(prompts))
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True,
                            detokenize=False)
    batches = {}
    for batch, rows in sorted(prompts.items()):
        requests = [TokensPrompt(prompt_token_ids=row) for row in rows]
        llm.generate(requests, params, use_tqdm=False)  # warm-up (compilation, first touches)
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            outputs = llm.generate(requests, params, use_tqdm=False)
            rates.append(batch * new_tokens / (time.perf_counter() - start))
        batches[batch] = {"tokens_per_s": statistics.median(rates), "tokens_per_s_all": rates,
                          "dtype": request["dtype"], "tokens": [list(o.outputs[0].token_ids) for o in outputs]}
    return {"vllm": vllm.__version__, "batches": batches}


if __name__ == "__main__":
    request = json.load(sys.stdin)
    with open(request["out"], "w") as f:
        json.dump(run(request), f)
