"""`crosslayer eval ppl|tasks|passkey|all`: evaluate any causal LM as papers do.

Every command takes any causal LM that transformers loads (our CLA models, converted models, plain
transformers models, GGUF files), so baselines go through the same code.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import typing
from pathlib import Path

from . import (
    add_json_flags,
    add_model_flags,
    add_progress_flag,
    emit,
    float_list,
    int_list,
    load_model_from_args,
    non_negative_int,
    positive_int,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model: ppl, tasks, passkey, all",
                       description="Evaluate any causal LM: strided perplexity, lm-eval's zero-shot tasks, passkey "
                       "retrieval, or all of them in one report.")
    evals = p.add_subparsers(dest="evaluation", metavar="EVAL", required=True, parser_class=type(p))
    _register_ppl(evals)
    _register_tasks(evals)
    _register_passkey(evals)
    _register_all(evals)


# ----------------------------------------------------------------------------------------------
# ppl


def _register_ppl(sub) -> None:
    from ..eval import perplexity

    p = sub.add_parser("ppl", help="sliding-window perplexity, bits per byte, word perplexity",
                       description=perplexity.__doc__)
    add_model_flags(p)
    p.add_argument("--data", required=True, metavar="DATA",
                   help="text file or glob, a `crosslayer prepare` folder (made with this model's tokenizer), or "
                        "hf:NAME[:CONFIG[:SPLIT]] (e.g. hf:wikitext:wikitext-2-raw-v1:test)")
    p.add_argument("--context", type=positive_int, default=None,
                   help="window length in tokens (none: the model's, at most 2048)")
    p.add_argument("--stride", type=positive_int, default=None, help="window step in tokens (none: context/2)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward pass")
    p.add_argument("--split", default="val", choices=("train", "val"), help="split of a prepared folder")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="score only the first N tokens")
    add_progress_flag(p)
    add_json_flags(p)
    p.set_defaults(func=run_ppl)


def run_ppl(args: argparse.Namespace) -> int:
    from ..eval.perplexity import perplexity

    model, tokenizer = load_model_from_args(args)
    result = perplexity(model, tokenizer, args.data, args.context, args.stride, args.batch_size, args.split,
                        args.max_tokens, progress=not args.no_progress)
    result["model"] = str(args.model)
    line = f"perplexity {result['perplexity']:.3f} over {result['tokens_scored']:,} tokens"
    if "bits_per_byte" in result:
        line += f", {result['bits_per_byte']:.4f} bits/byte"
    if "word_perplexity" in result:
        line += f", word perplexity {result['word_perplexity']:.3f}"
    print(line + f" (context {result['context']}, stride {result['stride']})")
    return emit(result, args)


# ----------------------------------------------------------------------------------------------
# tasks


def _register_tasks(sub) -> None:
    from ..eval import tasks
    from ..eval.tasks import TASKS

    p = sub.add_parser("tasks", help="zero-shot benchmarks through lm-eval (hellaswag, piqa, ...)",
                       description=tasks.__doc__)
    add_model_flags(p)
    p.add_argument("--tasks", default=",".join(TASKS), metavar="NAMES", help=f"comma-separated, of: {', '.join(TASKS)}")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="local copies of the data, one folder per task as in shared/data (none: the hub)")
    p.add_argument("--limit", type=positive_int, default=None, help="score only the first N items of each task")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass")
    p.add_argument("--out", default=None, metavar="DIR", help="folder for results.json and results.md")
    p.add_argument("--log-samples", action="store_true",
                   help="keep per-item prompts, log-likelihoods and scores (samples_<task>.jsonl in --out)")
    add_progress_flag(p)
    add_json_flags(p)
    p.set_defaults(func=run_tasks)


def run_tasks(args: argparse.Namespace) -> int:
    from ..errors import CrossLayerError
    from ..eval.tasks import markdown_table, parse_tasks, run_tasks, write_results

    names = parse_tasks(args.tasks)  # the cheap checks before the model loads
    if args.log_samples and not args.out:
        raise CrossLayerError("--log-samples needs --out (the samples go to samples_<task>.jsonl there)")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise CrossLayerError(f"--data-dir: folder not found: {args.data_dir}")
    model, tokenizer = load_model_from_args(args)
    with _data_dir_flag():
        result = run_tasks(model, tokenizer, names, data_dir=args.data_dir, limit=args.limit,
                           batch_size=args.batch_size, log_samples=args.log_samples)
    result["model"] = str(args.model)
    if args.out:
        write_results(result, args.out)
    print(markdown_table(result), end="")
    return emit({k: v for k, v in result.items() if k != "samples"}, args)


@contextlib.contextmanager
def _data_dir_flag():
    """The library's "cannot reach the hub" error, its way out worded as the --data-dir flag."""
    from ..errors import CrossLayerError
    from ..eval.tasks import HubUnreachable

    try:
        yield
    except HubUnreachable as e:
        raise CrossLayerError(f"{e.reason}. Without network access, run on local copies with --data-dir DIR "
                              "(laid out like shared/data)") from None


# ----------------------------------------------------------------------------------------------
# passkey


def _register_passkey(sub) -> None:
    from ..eval import passkey

    p = sub.add_parser("passkey", help="passkey retrieval accuracy by length and depth, with a heat map",
                       description=passkey.__doc__)
    add_model_flags(p)
    p.add_argument("--lengths", type=int_list, default=[256, 512, 1024], help="prompt lengths in tokens")
    p.add_argument("--depths", type=float_list, default=[0, 0.25, 0.5, 0.75, 1], help="key depths in [0, 1]")
    p.add_argument("--trials", type=positive_int, default=5, help="prompts per cell")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the keys")
    p.add_argument("--out", default=None, metavar="DIR", help="folder for passkey.json and passkey.png")
    add_progress_flag(p)
    add_json_flags(p)
    p.set_defaults(func=run_passkey)


def run_passkey(args: argparse.Namespace) -> int:
    from ..eval.passkey import heatmap, passkey

    model, tokenizer = load_model_from_args(args)
    result = passkey(model, tokenizer, args.lengths, args.depths, args.trials, args.seed, progress=not args.no_progress)
    result["model"] = str(args.model)
    print(f"{'length':>8s} " + " ".join(f"d={d:<5g}" for d in args.depths))
    for n in args.lengths:
        row = [c for c in result["cells"] if c["length"] == n]
        print(f"{n:>8d} " + " ".join(f"{c['accuracy']:>7.0%}" for c in row))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "passkey.json").write_text(json.dumps(result, indent=2))
        heatmap(result, out / "passkey.png", f"passkey retrieval: {Path(str(args.model)).name}")
    return emit(result, args)


# ----------------------------------------------------------------------------------------------
# all


def _register_all(sub) -> None:
    from ..eval import suite
    from ..eval.suite import SuiteSettings

    p = sub.add_parser("all", help="the whole evaluation suite, one report", description=suite.__doc__)
    add_model_flags(p)
    p.add_argument("--out", required=True, metavar="DIR", help="folder for report.md, report.json, passkey.png")
    p.add_argument("--config", default=None, metavar="YAML", help="settings file; its keys are the flag names below "
                   "with underscores (flags given here win)")
    hints = typing.get_type_hints(SuiteSettings)
    for f in dataclasses.fields(SuiteSettings):
        kind = positive_int if "int" in str(hints[f.name]) else str
        # default None here: a flag not given leaves the --config file's value (or the setting's default)
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None,
                       help=f"{f.metadata['help']} ({'int >= 1' if kind is positive_int else 'text'}, "
                            f"default: {'none' if f.default is None else f.default})")
    add_progress_flag(p)
    add_json_flags(p)
    p.set_defaults(func=run_all)


def run_all(args: argparse.Namespace) -> int:
    from ..eval.suite import SuiteSettings, markdown_report, run_suite
    from ..recipe import read_yaml, settings_from

    raw = read_yaml(args.config, "suite settings") if args.config else {}
    for f in dataclasses.fields(SuiteSettings):
        if getattr(args, f.name) is not None:
            raw[f.name] = getattr(args, f.name)
    settings = settings_from(SuiteSettings, raw, "suite setting")
    model, tokenizer = load_model_from_args(args)
    with _data_dir_flag():
        report = run_suite(model, tokenizer, str(args.model), args.out, settings, progress=not args.no_progress)
    print(markdown_report(report))
    return emit(report, args)
