"""`crosslayer kv`: KV bytes per token, per sequence, and sequences that fit a memory budget."""

from __future__ import annotations

import argparse

from . import add_json_flags, emit, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    from ..config import CLA_PATTERNS
    from ..device import ELEMENT_BYTES

    p = sub.add_parser(
        "kv", help="KV-cache bytes per token, per sequence, and sequences that fit a memory budget",
        description="KV-cache arithmetic for a preset, a model folder, or a config file (JSON/YAML), with the "
        "sharing plan (which layers produce K/V, which reuse them). A transformers Llama config is read as its "
        "dense twin; --cla-factor shows what CLA does to it.",
    )
    p.add_argument("model", nargs="?", help="preset name, model folder, or config file")
    p.add_argument("--list-presets", action="store_true", help="list named presets with their KV bytes")
    p.add_argument("--seq-len", type=positive_int, default=None, help="tokens per sequence (none: the model's maximum)")
    p.add_argument("--memory", default=None, metavar="SIZE", help="memory budget, e.g. 80GiB; weights are subtracted")
    p.add_argument("--kv-dtype", default="bf16", choices=tuple(ELEMENT_BYTES),
                   help="cache element type; int8 and fp8 add one float16 scale per token, K/V head and K or V")
    p.add_argument("--weight-dtype", default="bf16", choices=tuple(ELEMENT_BYTES), help="weight element type")
    p.add_argument("--cla-factor", type=positive_int, default=None, help="override: share K/V across this many layers")
    p.add_argument("--cla-pattern", default=None, choices=CLA_PATTERNS, help="override: which layers produce K/V")
    add_json_flags(p)
    p.set_defaults(func=run)


def sharing_groups(kv_sources: list[int]) -> str:
    """`[0] [1] [2-3] [4-6]`: each producer with the consumers that read its K/V."""
    groups: dict[int, list[int]] = {}
    for layer, src in enumerate(kv_sources):
        groups.setdefault(src, []).append(layer)
    spans = []
    for members in groups.values():
        contiguous = members == list(range(members[0], members[-1] + 1))
        if len(members) == 1:
            spans.append(f"[{members[0]}]")
        elif contiguous:
            spans.append(f"[{members[0]}-{members[-1]}]")
        else:
            spans.append("[" + ",".join(map(str, members)) + "]")
    return " ".join(spans)


def run(args: argparse.Namespace) -> int:
    from ..config import PRESETS, CLAConfig, load_config
    from ..errors import CrossLayerError
    from ..kv import human_bytes, parse_bytes, plan

    if args.list_presets:
        rows = {n: CLAConfig.from_preset(n) for n in PRESETS}
        print(f"{'preset':32s} {'KV bytes/token':>14s} {'params':>10s}  producers")
        for n, c in rows.items():
            print(f"{n:32s} {c.kv_bytes_per_token():>14,} {c.num_parameters() / 1e6:>9.1f}M"
                  f"  {c.num_producer_layers}/{c.num_hidden_layers}")
        print("(KV bytes at 16 bits, as in the paper. Any <scale>-H<hd>-<MHA|GQA<n>|MQA>[-CLA<f>][-Pattern] "
              "name also works.)")
        return emit({n: {"kv_bytes_per_token": c.kv_bytes_per_token(), "parameters": c.num_parameters()}
                     for n, c in rows.items()}, args)
    if not args.model:
        raise CrossLayerError("give a preset name, model folder or config file (or --list-presets)")
    overrides = {}
    if args.cla_factor is not None:
        overrides.update(cla_factor=args.cla_factor, kv_sources=None)
    if args.cla_pattern is not None:
        overrides.update(cla_pattern=args.cla_pattern, kv_sources=None)
    config = load_config(args.model, **overrides)
    seq_len = args.seq_len or config.max_position_embeddings
    memory = parse_bytes(args.memory) if args.memory else None
    r = plan(config, seq_len, memory, args.kv_dtype, args.weight_dtype)
    r["model"] = args.model
    pattern = "custom" if config.cla_pattern == "custom" else f"cla_factor {config.cla_factor}, {config.cla_pattern}"
    print(f"model              {args.model}")
    print(f"attention          {config.num_attention_heads} query heads, {config.num_key_value_heads} KV heads, "
          f"head_dim {config.head_dim}")
    print(f"K/V producers      {config.num_producer_layers} of {config.num_hidden_layers} layers ({pattern})")
    print(f"sharing groups     {sharing_groups(config.kv_sources)}")
    print(f"parameters         {r['parameters'] / 1e6:,.1f}M ({human_bytes(r['weight_bytes'])} at {args.weight_dtype})")
    scales = r["kv_scale_bytes_per_token"]
    detail = f"{args.kv_dtype}: {r['kv_bytes_per_token'] - scales:,} values + {scales:,} scales" if scales else args.kv_dtype
    print(f"KV bytes / token   {r['kv_bytes_per_token']:,} ({detail})")
    print(f"KV / sequence      {human_bytes(r['kv_bytes_per_sequence'])} at {seq_len:,} tokens")
    if memory is not None:
        print(f"memory budget      {human_bytes(memory)}: {r['max_sequences']:,} sequences of {seq_len:,} tokens "
              f"({r['max_tokens']:,} tokens) beside the weights")
    return emit(r, args)
