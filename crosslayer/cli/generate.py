"""`crosslayer generate`: text from a model, streamed to the terminal."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import add_json_flags, add_model_flags, emit, load_model_from_args, non_negative_float, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    from ..device import KV_DTYPES
    from ..generate import CACHES

    p = sub.add_parser(
        "generate", help="generate text from a model, streamed",
        description="Temperature, top-k, top-p sampling (--temperature 0 is greedy); one prompt streamed as it is "
        "produced, or a file of prompts (one per line) decoded as a left-padded batch. crosslayer models decode "
        "through the fast path (a preallocated cache of producer layers only; --compile compiles the decode step; "
        "--kv-dtype int8|fp8 stores it in 8 bits); "
        "any other causal LM, or --cache dynamic|static, through transformers' generate. Ends with a line on stderr: "
        "tokens generated, tokens/s, and the KV-cache bytes held.",
    )
    add_model_flags(p)
    p.add_argument("--prompt", default=None, help="one prompt (streamed)")
    p.add_argument("--prompts-file", default=None, metavar="FILE", help="prompts, one per line, decoded as one batch")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template as a user turn")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=non_negative_float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=positive_int, default=50, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=0.95, help="sample within this probability mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler")
    p.add_argument("--cache", default="auto", choices=CACHES,
                   help="fast: our preallocated producer-only cache (crosslayer models); dynamic / static: "
                        "transformers' generate (producers only too); auto: fast where it applies")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast path's decode step")
    p.add_argument("--kv-dtype", default="auto", choices=KV_DTYPES,
                   help="how the fast path's cache stores K/V: auto (the weights' dtype), a float dtype, or 8-bit "
                        "int8 / fp8 (with one scale per token and K/V head)")
    p.add_argument("--no-stream", action="store_true", help="print the completion at the end")
    add_json_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import CrossLayerError
    from ..generate import generate_texts

    if (args.prompt is None) == (args.prompts_file is None):
        raise CrossLayerError("give exactly one of --prompt or --prompts-file")
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise CrossLayerError(f"--prompts-file: file not found: {path}")
        prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise CrossLayerError(f"--prompts-file: {path} holds no non-empty line")
    else:
        prompts = [args.prompt]
    model, tokenizer = load_model_from_args(args)
    stream = len(prompts) == 1 and not args.no_stream and not args.json
    if stream and not args.chat:
        print(prompts[0], end="", flush=True)
    result = generate_texts(model, tokenizer, prompts, args.max_new_tokens, args.temperature, args.top_k,
                            args.top_p, args.seed, args.cache, stream=stream, compile=args.compile, chat=args.chat,
                            kv_dtype=args.kv_dtype)
    if stream:
        print()
    else:
        for prompt, text in zip(prompts, result["texts"], strict=True):
            print(text if args.chat else prompt + text)
            if len(prompts) > 1:
                print("-" * 40)
    print(f"[{result['new_tokens']} tokens in {result['seconds']:.2f} s, "
          f"{result['new_tokens'] / max(result['seconds'], 1e-9):.1f} tokens/s; {result['cache']} KV cache "
          f"{result['kv_cache_bytes']:,} bytes]", file=sys.stderr)
    return emit({"prompts": prompts, **result}, args)
