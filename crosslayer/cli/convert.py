"""`crosslayer convert`: a pretrained checkpoint (folder, hub id, GGUF file) -> a CLA model folder."""

from __future__ import annotations

import argparse
import re

from . import add_json_flags, add_progress_flag, emit, non_negative_float, positive_int


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


_fraction.type_name = "number in (0, 1]"


def _size(text: str) -> int:
    """Bytes from a size like 5GB, 500MB or 2GiB (a plain number: bytes)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match[2].upper() not in units or float(match[1]) * units[match[2].upper()] < 1:
        raise argparse.ArgumentTypeError(f"expected a size like 5GB or 500MB, got {text!r}")
    return int(float(match[1]) * units[match[2].upper()])


_size.type_name = "size"


def register(sub: argparse._SubParsersAction) -> None:
    from ..config import CLA_PATTERNS
    from ..convert import KV_INITS
    from ..device import DTYPE_CHOICES
    from ..plan import METRICS
    from . import add_calibration_flags, add_device_flags

    p = sub.add_parser(
        "convert", help="convert a Llama / Mistral / Qwen2 (or dense crosslayer) checkpoint into a CLA model",
        description="Turn a pretrained checkpoint (a folder, a hub id, or a GGUF file, dequantised) into a CLA model "
        "folder: each sharing group's K/V projections are initialised from the group's layers; everything else is "
        "copied, with the tokenizer, chat template and generation config; plan.json records the plan. The plan is "
        "--cla-factor (with --cla-pattern), a --plan FILE, or --plan search with --producers, --kv-budget or "
        "--max-kl: the contiguous groups that cost least (KL to the original model) on --calibration text. Recover quality "
        "afterwards with `crosslayer train RECIPE --init OUT`.",
    )
    p.add_argument("src", help="source: checkpoint folder, hub id, or .gguf file")
    p.add_argument("--out", required=True, metavar="DIR", help="new model folder (must not exist, or be empty)")
    p.add_argument("--gguf-file", default=None, metavar="NAME", help="read this GGUF file of the folder or hub id SRC")
    p.add_argument("--cla-factor", type=positive_int, default=None, help="layers per sharing group (1: an exact copy)")
    p.add_argument("--cla-pattern", default="uniform", choices=CLA_PATTERNS, help="which layers produce K/V")
    p.add_argument("--plan", default=None, metavar="search|FILE",
                   help="search: measure and choose the plan (with --producers, --kv-budget or --max-kl); FILE: a plan.json "
                        "(e.g. of an earlier conversion) or a JSON list of K/V source layers")
    p.add_argument("--producers", type=positive_int, default=None, help="plan search: layers that produce K/V")
    p.add_argument("--kv-budget", type=_fraction, default=None,
                   help="plan search: KV bytes as a fraction of the source's (0.5: at most half the producers)")
    p.add_argument("--max-kl", type=non_negative_float, default=None, metavar="X",
                   help="plan search: the fewest producers whose KL to the original model (nats/token on the "
                        "calibration tokens) stays <= X: merging stops before a merge that would cost more (see "
                        "`crosslayer frontier` for the KL and held-out perplexity of every budget)")
    p.add_argument("--metric", default="kl", choices=METRICS,
                   help="plan search: cost of a plan on the calibration tokens (kl: to the original model; loss: "
                        "cross-entropy)")
    p.add_argument("--kv-init", default="fit", choices=KV_INITS,
                   help="fit: least squares on --calibration to each member's K/V, weighted by what its queries and "
                        "o_proj see; mean: average each group's K/V weights and norm scales; mean-folded: average the "
                        "maps W diag(norm); first: keep the group's first layer's")
    p.add_argument("--calibration", default=None, metavar="DATA",
                   help="text file or glob (or a folder prepared with the model's tokenizer) for --kv-init fit and "
                        "--plan search; not the text you evaluate on")
    add_calibration_flags(p)
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="weights of OUT (auto: the source's), whatever --compute-dtype is")
    add_device_flags(p, dtype_default=None)
    p.add_argument("--activations", default="auto", metavar="auto|memory|DIR",
                   help="where a CPU keeps the calibration activations: memory, a folder (written there, read back "
                        "memory-mapped), or auto (a temporary folder beside OUT, removed after, when they would fill "
                        "more than a quarter of the memory available)")
    p.add_argument("--max-shard-size", type=_size, default="5GB", metavar="SIZE",
                   help="OUT's weights in safetensors files of at most this size (default 5GB; one model.safetensors "
                        "when the model fits in one)")
    add_progress_flag(p)
    add_json_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..convert import convert
    from ..errors import CrossLayerError
    from ..plan import SEARCH_TOKENS, Searcher

    if args.cla_factor is None and args.plan is None:
        raise CrossLayerError("--cla-factor: give the layers per sharing group (1 copies the model exactly), or "
                              "--plan search|FILE")
    if args.cla_factor is not None and args.plan is not None:
        raise CrossLayerError("give --cla-factor or --plan, not both")
    searching = args.plan == "search"
    if not searching and (args.producers is not None or args.kv_budget is not None or args.search_tokens is not None):
        raise CrossLayerError("--producers, --kv-budget and --search-tokens belong to --plan search")
    if not searching and args.max_kl is not None:
        raise CrossLayerError("--max-kl belongs to --plan search")
    search = Searcher(args.producers, args.kv_budget, args.metric, args.search_tokens or SEARCH_TOKENS,
                      progress=not args.no_progress, max_kl=args.max_kl) if searching else None
    s = convert(args.src, args.out, args.cla_factor, args.cla_pattern, args.kv_init, args.dtype,
                gguf_file=args.gguf_file, plan=None if searching else args.plan, search=search,
                calibration=args.calibration, calibration_tokens=args.calibration_tokens,
                calibration_seq_len=args.calibration_seq_len, compute_dtype=args.compute_dtype,
                device=args.device, max_shard_bytes=args.max_shard_size,
                activations=None if args.activations == "memory" else args.activations, progress=not args.no_progress)
    n = s["layers"]
    print(f"source            {s['source']} ({s['architecture']}, {n} layers)")
    if s["calibration"]:
        c = s["calibration"]
        print(f"calibration       {c['tokens']:,} tokens ({c['tokens'] // c['seq_len']} x {c['seq_len']}) of "
              f"{c['data']}, computed in {c['compute_dtype']} on {c['device']}, kept in {c['activations']}")
    if s["search"]:
        r = s["search"]
        unit = "nats/token KL to the original" if r["metric"] == "kl" else "nats/token loss above the original's"
        print(f"plan search       {r['evaluations']} plans measured on {r['search_tokens']:,} tokens in "
              f"{r['seconds']:.0f} s; cost in {unit}")
        print(f"  {'producers':>9s} {'cost':>8s}  step")
        for step in r["steps"]:
            print(f"  {step['producers']:>9d} {step['cost']:>8.4f}  {step['step']}")
        if r["refused"]:
            print(f"  {'':>9s} {r['refused']['cost']:>8.4f}  not taken: {r['refused']['step']} (over --max-kl "
                  f"{r['max_kl']:g})")
    print(f"K/V producers     {n} -> {len(s['producers'])} of {n} layers ({s['chosen_by']}, kv_init {s['kv_init']})")
    print(f"sharing groups    {s['plan']}")
    print(f"KV bytes / token  {s['kv_bytes_before']:,} -> {s['kv_bytes_after']:,} (16-bit)")
    print(f"parameters        {s['params_before'] / 1e6:,.2f}M -> {s['params_after'] / 1e6:,.2f}M ({s['dtype']})")
    print(f"weights           {', '.join(s['weight_files'])}")
    print(f"tokenizer         {', '.join(s['tokenizer_files']) or 'none in the source folder'}")
    print(f"wrote             {s['out']} (plan in plan.json)")
    return emit(s, args)
