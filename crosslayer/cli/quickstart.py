"""`crosslayer quickstart`: the paper's three-way comparison, offline, in minutes on a CPU."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import add_json_flags, add_progress_flag, emit, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    from .. import quickstart

    p = sub.add_parser("quickstart", help="train MQA, MQA-CLA2 and half-head-dim MQA on the built-in corpus and compare",
                       description=quickstart.__doc__)
    p.add_argument("--out", default="runs/quickstart", metavar="DIR", help="folder for data, runs and results.json")
    p.add_argument("--steps", type=positive_int, default=120, help="optimizer steps per model")
    p.add_argument("--seq-len", type=positive_int, default=128, help="tokens per training sequence")
    p.add_argument("--batch-tokens", type=positive_int, default=8192, help="tokens per optimizer step")
    add_progress_flag(p)
    add_json_flags(p)
    p.set_defaults(func=run)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'model':20s} {'KV bytes/token':>14s} {'params':>9s} {'val ppl':>9s} {'train s':>8s}"]
    for r in rows:
        lines.append(f"{r['model']:20s} {r['kv_bytes_per_token']:>14,} {r['parameters'] / 1e6:>8.2f}M "
                     f"{r['val_ppl']:>9.2f} {r['seconds']:>8.1f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..quickstart import quickstart

    rows = quickstart(args.out, args.steps, args.seq_len, args.batch_tokens, progress=not args.no_progress)
    print()
    print(format_table(rows))
    print(f"\nSame tokens for each ({rows[0]['tokens']:,}). CLA2 and half head_dim both halve the KV cache; "
          f"the paper finds CLA2 loses less perplexity. Results: {Path(args.out) / 'results.json'}")
    front = ", ".join(r["model"] for r in rows if r["pareto"])
    print(f"Pareto frontier (no other model has fewer KV bytes and lower perplexity): {front}; "
          f"plot: {Path(args.out) / 'pareto.png'}")
    return emit({"rows": rows}, args)
