"""Text from any causal LM: our fast decoding path for CLA models, transformers' `generate` for the rest.

`generate_texts` tokenises prompts as a left-padded batch, decodes (greedy or temperature / top-k /
top-p sampling), and returns the continuations with timing and the KV-cache bytes held. Our models
decode through `crosslayer.decode.fast_generate` (a preallocated cache of producer layers only, in
the weights' dtype or `kv_dtype`: 16-bit, or 8-bit int8 / fp8 with scales); any other causal LM, or
`cache="dynamic" | "static"`, goes through transformers' `generate`.
"""

from __future__ import annotations

import time

import torch

from .decode import fast_generate
from .device import KV_DTYPES
from .errors import CrossLayerError
from .kv import cache_nbytes
from .modeling import CACHE_NAME, CLAForCausalLM

CACHES = ("auto", "fast", "dynamic", "static")


def generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.8,
                   top_k: int | None = 50, top_p: float | None = 0.95, seed: int | None = None,
                   cache: str = "auto", stream: bool = False, compile: bool = False, chat: bool = False,
                   kv_dtype: str = "auto") -> dict:
    """Completions of `prompts` (continuations only) with timing and the cache's bytes.

    cache: `fast` (our decode path; CLA models only), `dynamic` or `static` (transformers' generate),
    `auto` (fast for our models, dynamic otherwise). kv_dtype: what the fast path's cache stores K/V as
    (`auto`: the weights' dtype; fp32, bf16, fp16; int8 or fp8 with scales). chat: each prompt becomes a
    user turn of the tokenizer's chat template. The tokenizer is not changed (padding is done here, on
    the left)."""
    if not prompts or any(not p for p in prompts):
        raise CrossLayerError("give at least one non-empty prompt")
    if temperature < 0:
        raise CrossLayerError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise CrossLayerError(f"top_p must lie in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise CrossLayerError(f"top_k must be >= 1, got {top_k}")
    if max_new_tokens < 1:
        raise CrossLayerError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if cache not in CACHES:
        raise CrossLayerError(f"cache must be one of {', '.join(CACHES)}; got {cache!r}")
    if cache == "auto":
        cache = "fast" if isinstance(model, CLAForCausalLM) else "dynamic"
    if compile and cache != "fast":
        raise CrossLayerError("compile applies to the fast path only (cache='fast', crosslayer models)")
    if kv_dtype not in KV_DTYPES:
        raise CrossLayerError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}; got {kv_dtype!r}")
    if kv_dtype != "auto" and cache != "fast":
        raise CrossLayerError("kv_dtype applies to the fast path only (cache='fast', crosslayer models)")
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise CrossLayerError("the tokenizer has neither a pad nor an EOS token to pad a batch with")
    batch = left_padded_batch(tokenizer, prompts, pad, chat)
    batch = {k: v.to(device) for k, v in batch.items()}
    streamer = None
    if stream:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    greedy = temperature == 0
    start = time.perf_counter()
    if cache == "fast":
        generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        out = fast_generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=None if greedy else top_k, top_p=None if greedy else top_p,
                            eos_token_id=eos, pad_token_id=pad, generator=generator,
                            compile=compile, streamer=streamer, kv_dtype=kv_dtype)
    else:
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, return_dict_in_generate=True,
                      streamer=streamer)
        if greedy:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        else:
            kwargs.update(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
        if cache == "static":
            kwargs["cache_implementation"] = "static"
        with torch.no_grad():
            out = model.generate(**batch, **kwargs)
    seconds = time.perf_counter() - start
    held = out.cache if cache == "fast" else getattr(out, CACHE_NAME, None)  # transformers 5.19 names it past_key_values
    new = out.sequences[:, batch["input_ids"].shape[1]:]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    return {"texts": texts, "new_tokens": int(new.numel()), "seconds": seconds, "cache": cache,
            "kv_cache_bytes": cache_nbytes(held) if held is not None else 0}


def left_padded_batch(tokenizer, prompts: list[str], pad_id: int, chat: bool = False) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask (B, T) of prompts padded on the left (decoder-only models continue
    each row from its last token); special tokens as the tokenizer adds them, or the chat template's."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise CrossLayerError("chat: this tokenizer has no chat template")
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=False) for p in prompts]
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    else:
        rows = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}
