"""`crosslayer sweep` (a design-space grid, resumably) and `crosslayer plot` (Pareto plot, LR curves, table)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import add_json_flags, add_progress_flag, emit


def register(sub: argparse._SubParsersAction) -> None:
    from .. import plot, sweep
    from ..plot import METRICS

    p = sub.add_parser("sweep", help="run a grid of configs x learning rates x seeds, resumably",
                       description=sweep.__doc__)
    p.add_argument("sweep", help="sweep YAML (see configs/sweep-tiny.yaml)")
    p.add_argument("--out", default=None, metavar="DIR", help="sweep folder (overrides the YAML's out)")
    p.add_argument("--only", action="append", default=[], metavar="GLOB",
                   help="run only runs whose name (CONFIG_lrLR_sSEED) matches; repeatable")
    p.add_argument("--lock", default=None, metavar="FILE",
                   help="hold an exclusive flock on FILE during each run (and release it between runs)")
    p.add_argument("--list", action="store_true", help="print the planned runs and whether each is done, then exit")
    p.add_argument("--plot", action="store_true", help="when done, also write the plots and table (crosslayer plot)")
    add_progress_flag(p)
    add_json_flags(p)
    p.set_defaults(func=run_sweep)

    p = sub.add_parser("plot", help="Pareto plot (KV bytes vs perplexity), LR curves, table of a sweep",
                       description=plot.__doc__)
    p.add_argument("results", help="results.jsonl / results.csv of `crosslayer sweep`, or its folder")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder for pareto.png, lr_curves.png, table.md (none: beside RESULTS)")
    p.add_argument("--metric", default="final_val_ppl", choices=METRICS, help="what the y axis shows")
    add_json_flags(p)
    p.set_defaults(func=run_plot)


def run_sweep(args: argparse.Namespace) -> int:
    from ..sweep import load_sweep, plan, read_record, run_name, run_sweep

    sweep = load_sweep(args.sweep, args.out)
    if args.list:
        listed = []
        for m, lr, seed in plan(sweep):
            name = run_name(m.name, lr, seed) if lr is not None else f"{m.name}_lr?_s{seed} (best LR, not known yet)"
            status = "done" if lr is not None and read_record(sweep, name) else "todo"
            listed.append({"run": name, "status": status})
            print(f"{status}  {name}")
        return emit({"runs": listed}, args)
    rows = run_sweep(sweep, args.only, args.lock, progress=not args.no_progress)
    if args.plot and rows:
        from ..plot import plot_results

        paths = plot_results(Path(sweep.out) / "results.jsonl")
        print(paths["table"].read_text())
    return emit({"out": sweep.out, "runs": rows}, args)


def run_plot(args: argparse.Namespace) -> int:
    from ..plot import plot_results

    paths = plot_results(args.results, args.out, args.metric)
    print(paths["table"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return emit({k: str(v) for k, v in paths.items()}, args)
