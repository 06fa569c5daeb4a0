"""`crosslayer convert`: a pretrained checkpoint (folder, hub id, GGUF file) -> a CLA model folder."""

from __future__ import annotations

import argparse

from . import add_json_flags, add_progress_flag, emit, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    from ..config import CLA_PATTERNS
    from ..convert import KV_INITS
    from ..runtime import DTYPE_CHOICES

    p = sub.add_parser(
        "convert", help="convert a Llama / Mistral / Qwen2 (or dense crosslayer) checkpoint into a CLA model",
        description="Turn a pretrained checkpoint (a folder, a hub id, or a GGUF file, dequantised) into a CLA model "
        "folder: each sharing group's K/V projections are initialised from the group's layers; everything else is "
        "copied, with the tokenizer, chat template and generation config. Recover quality afterwards with "
        "`crosslayer train RECIPE --init OUT`.",
    )
    p.add_argument("src", help="source: checkpoint folder, hub id, or .gguf file")
    p.add_argument("--out", required=True, metavar="DIR", help="new model folder (must not exist, or be empty)")
    p.add_argument("--gguf-file", default=None, metavar="NAME", help="read this GGUF file of the folder or hub id SRC")
    p.add_argument("--cla-factor", type=positive_int, default=None, help="layers per sharing group (1: an exact copy)")
    p.add_argument("--cla-pattern", default="uniform", choices=CLA_PATTERNS, help="which layers produce K/V")
    p.add_argument("--kv-init", default="mean", choices=KV_INITS,
                   help="mean: average each group's K/V weights; first: keep the group's first layer's")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="weights of OUT (auto: the source's)")
    add_progress_flag(p)
    add_json_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..convert import convert
    from ..errors import CrossLayerError

    if args.cla_factor is None:
        raise CrossLayerError("--cla-factor: give the layers per sharing group (1 copies the model exactly)")
    s = convert(args.src, args.out, args.cla_factor, args.cla_pattern, args.kv_init, args.dtype,
                gguf_file=args.gguf_file)
    n = s["layers"]
    print(f"source            {s['source']} ({s['architecture']}, {n} layers)")
    print(f"K/V producers     {n} -> {len(s['producers'])} of {n} layers {s['producers']} "
          f"(cla_factor {args.cla_factor}, {args.cla_pattern}, kv_init {s['kv_init']})")
    print(f"KV bytes / token  {s['kv_bytes_before']:,} -> {s['kv_bytes_after']:,} (16-bit)")
    print(f"parameters        {s['params_before'] / 1e6:,.2f}M -> {s['params_after'] / 1e6:,.2f}M ({s['dtype']})")
    print(f"tokenizer         {', '.join(s['tokenizer_files']) or 'none in the source folder'}")
    print(f"wrote             {s['out']}")
    return emit(s, args)
