"""`crosslayer generate`: text from any causal LM folder or hub id, streamed to the terminal.

Temperature, top-k, top-p (`--temperature 0` is greedy); one prompt streamed as it is produced, or a
file of prompts (one per line) decoded as a left-padded batch. Our models decode through the fast
path (`crosslayer.decode`: a preallocated cache of producer layers only; `--compile` compiles the
decode step); any other causal LM, or `--cache dynamic|static`, goes through transformers' `generate`.
Ends with a line on stderr: tokens generated, tokens/s, and the KV-cache bytes held.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .decode import fast_generate
from .errors import CrossLayerError
from .eval.common import load_model
from .kv import cache_nbytes
from .modeling import CLAForCausalLM

CACHES = ("auto", "fast", "dynamic", "static")


def generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.8,
                   top_k: int | None = 50, top_p: float | None = 0.95, seed: int | None = None,
                   cache: str = "auto", stream: bool = False, compile: bool = False) -> dict:
    """Completions of `prompts` (continuations only) with timing and the cache's bytes.

    cache: `fast` (our decode path; CLA models only), `dynamic` or `static` (transformers' generate),
    `auto` (fast for our models, dynamic otherwise)."""
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
        raise CrossLayerError("--compile applies to the fast path (--cache fast, crosslayer models)")
    if seed is not None:
        torch.manual_seed(seed)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only: pad on the left so every row continues from its last token
    device = next(model.parameters()).device
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
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
                            eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, generator=generator,
                            compile=compile, streamer=streamer)
    else:
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True,
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
    new = out.sequences[:, batch["input_ids"].shape[1]:]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    return {"texts": texts, "new_tokens": int(new.numel()), "seconds": seconds, "cache": cache,
            "kv_cache_bytes": cache_nbytes(out.cache) if getattr(out, "cache", None) is not None else 0}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text from a model, streamed", description=__doc__)
    p.add_argument("model", help="model folder or hub id")
    p.add_argument("--prompt", default=None, help="one prompt (streamed)")
    p.add_argument("--prompts-file", default=None, help="a file of prompts, one per line, decoded as one batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--cache", default="auto",
                   help="fast: our preallocated producer-only cache (crosslayer models); dynamic / static: "
                        "transformers' generate (producers only too); auto: fast where it applies")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast path's decode step")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--no-stream", action="store_true", help="print the completion at the end")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.prompts_file is None):
        raise CrossLayerError("give exactly one of --prompt or --prompts-file")
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise CrossLayerError(f"prompts file not found: {path}")
        prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        prompts = [args.prompt]
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    stream = len(prompts) == 1 and not args.no_stream
    if stream:
        print(prompts[0], end="", flush=True)
    result = generate_texts(model, tokenizer, prompts, args.max_new_tokens, args.temperature, args.top_k,
                            args.top_p, args.seed, args.cache, stream=stream, compile=args.compile)
    if not stream:
        for prompt, text in zip(prompts, result["texts"], strict=True):
            print(prompt + text)
            if len(prompts) > 1:
                print("-" * 40)
    print(f"[{result['new_tokens']} tokens in {result['seconds']:.2f} s, "
          f"{result['new_tokens'] / max(result['seconds'], 1e-9):.1f} tokens/s; {result['cache']} KV cache "
          f"{result['kv_cache_bytes']:,} bytes]", file=sys.stderr)
    return 0
