"""`crosslayer frontier`: every KV budget of a pretrained model, from one plan search, scored on held-out text."""

from __future__ import annotations

import argparse

from . import add_calibration_flags, add_device_flags, add_json_flags, add_progress_flag, emit, positive_int
from .convert import _fraction


def register(sub: argparse._SubParsersAction) -> None:
    from ..frontier import HELDOUT_TOKENS, HELDOUT_WINDOW

    p = sub.add_parser(
        "frontier", help="measure every KV budget of a model before converting it: KL and held-out perplexity",
        description="Run the plan search of `crosslayer convert --plan search` once, from the dense model down to "
        "--floor producers, and score the plan of every producer count on the way (each after one pass of boundary "
        "moves; K/V maps fitted on --calibration) by its KL to the original on the calibration tokens and its "
        "perplexity on --heldout text (the first --heldout-tokens tokens in disjoint windows). Writes OUT/frontier.json, "
        "frontier.md, frontier.png (KV fraction against perplexity) and plans/producers-P.json, each a plan "
        "`crosslayer convert SRC --plan FILE --calibration ...` reuses.",
    )
    p.add_argument("model", help="source: checkpoint folder, hub id, or .gguf file")
    p.add_argument("--out", required=True, metavar="DIR", help="new folder for the results (must not exist)")
    p.add_argument("--gguf-file", default=None, metavar="NAME", help="read this GGUF file of the folder or hub id MODEL")
    p.add_argument("--calibration", required=True, metavar="DATA",
                   help="text file or glob (or a folder prepared with the model's tokenizer) the search and the K/V "
                        "fits read; not the text you evaluate on")
    p.add_argument("--heldout", required=True, metavar="TEXT",
                   help="text file, glob or hf:NAME[:CONFIG[:SPLIT]] every budget is scored on (in fp32)")
    p.add_argument("--floor", type=positive_int, default=None, metavar="N", help="the fewest producers measured")
    p.add_argument("--min-kv-fraction", type=_fraction, default=None, metavar="F",
                   help="instead of --floor: the smallest KV fraction measured (0.5: down to half the producers)")
    add_calibration_flags(p)
    p.add_argument("--heldout-tokens", type=positive_int, default=HELDOUT_TOKENS,
                   help=f"held-out tokens scored, from the start of the text (default: {HELDOUT_TOKENS})")
    p.add_argument("--heldout-window", type=positive_int, default=HELDOUT_WINDOW,
                   help=f"in disjoint windows of this many tokens (default: {HELDOUT_WINDOW})")
    p.add_argument("--no-refine", action="store_true",
                   help="keep each count's merged plan (no boundary moves above the floor: faster)")
    add_device_flags(p, dtype_default=None)
    add_progress_flag(p)
    add_json_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..frontier import frontier
    from ..plan import SEARCH_TOKENS

    r = frontier(args.model, args.calibration, args.heldout, args.out, floor=args.floor,
                 min_kv_fraction=args.min_kv_fraction, gguf_file=args.gguf_file, compute_dtype=args.compute_dtype,
                 calibration_tokens=args.calibration_tokens, calibration_seq_len=args.calibration_seq_len,
                 search_tokens=args.search_tokens or SEARCH_TOKENS, heldout_tokens=args.heldout_tokens,
                 heldout_window=args.heldout_window, refine=not args.no_refine, progress=not args.no_progress,
                 device=args.device)
    c, h, s = r["calibration"], r["heldout"], r["seconds"]
    print(f"source            {r['source']} ({r['layers']} layers), down to {r['floor']} producers")
    print(f"calibration       {c['tokens']:,} tokens ({c['tokens'] // c['seq_len']} x {c['seq_len']}) of {c['data']}, "
          f"{c['compute_dtype']}; plans scored on the first {c['search_tokens']:,}")
    print(f"held-out          the first {h['tokens']:,} tokens of {h['data']} ({h['windows']} x {h['window']:,}, "
          f"{h['tokens_scored']:,} scored, {h['dtype']})")
    print(f"plans             {r['plans']}: {r['search']['evaluations']} plans measured")
    print(f"time              {s['total']:.0f} s (loading {s['load']:.0f}, calibration {s['calibration']:.0f}, search "
          f"{s['search']:.0f}, held-out {s['scoring']:.0f}) on {r['device']}")
    print(f"\n{'producers':>9s} {'KV':>6s} {'KV bytes':>9s} {'calib KL':>9s} {'held-out ppl':>13s}  plan")
    for row in r["rows"]:
        print(f"{row['producers']:>9d} {row['kv_fraction']:>6.3f} {row['kv_bytes_per_token']:>9,} "
              f"{row['calibration_kl']:>9.4f} {row['heldout_ppl']:>13.2f}{'' if row['pareto'] else '*'} {row['plan']}")
    if not all(row["pareto"] for row in r["rows"]):
        print("(*: a budget with fewer KV bytes scores better)")
    print(f"\nwrote             {r['out']} (frontier.json, frontier.md, frontier.png, plans/producers-P.json)")
    return emit(r, args)
