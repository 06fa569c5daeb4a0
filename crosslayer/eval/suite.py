"""`crosslayer eval all`: perplexity, zero-shot tasks and passkey in one run, one report.

The suite: WikiText-2 test perplexity (token, bits per byte, word level), optionally the model's
own validation split, the eight zero-shot tasks of the paper's tables through lm-eval, and passkey
retrieval. Flags, or a YAML file whose keys are the flag names (`--config`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from ..errors import CrossLayerError
from .common import load_model
from .passkey import heatmap, passkey
from .perplexity import perplexity
from .tasks import TASKS, markdown_table, parse_tasks, run_tasks

DEFAULTS: dict[str, Any] = {
    "data_dir": None,  # local copies (layout of ../shared/data); None: the hub
    "val": None,  # a `crosslayer prepare` folder: also report its validation perplexity
    "tasks": ",".join(TASKS),
    "limit": None,  # items per task (None: all)
    "batch_size": 16,
    "context": None,  # perplexity window (default: the model's, at most 2048)
    "ppl_max_tokens": None,  # evaluate perplexity on the first N tokens only (None: all)
    "passkey_lengths": None,  # default: 256, 512, ... up to the model's max_position_embeddings
    "passkey_depths": "0,0.25,0.5,0.75,1",
    "passkey_trials": 5,
    "device": "auto",
    "dtype": "auto",
}


def run_suite(model_spec: str, out: str | Path, settings: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Run every evaluation and write out/report.json, out/report.md and out/passkey.png."""
    s = {**DEFAULTS, **settings}
    tasks = parse_tasks(s["tasks"]) if s["tasks"] else []
    data_dir = Path(s["data_dir"]) if s["data_dir"] else None
    if data_dir is not None and not data_dir.is_dir():
        raise CrossLayerError(f"data_dir {data_dir} does not exist")
    model, tokenizer = load_model(model_spec, s["device"], s["dtype"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"model": str(model_spec), "date": dt.datetime.now(dt.timezone.utc).isoformat(),
                              "settings": s, "perplexity": {}}
    wikitext = str(data_dir / "wikitext-2" / "wiki.test.raw") if data_dir else "hf:wikitext:wikitext-2-raw-v1:test"
    _say(progress, f"perplexity on {wikitext}")
    report["perplexity"]["wikitext2_test"] = perplexity(model, tokenizer, wikitext, s["context"], None, s["batch_size"],
                                                        max_tokens=s["ppl_max_tokens"], progress=progress)
    if s["val"]:
        _say(progress, f"perplexity on {s['val']} (val split)")
        report["perplexity"]["val"] = perplexity(model, tokenizer, s["val"], s["context"], None, s["batch_size"],
                                                 max_tokens=s["ppl_max_tokens"], progress=progress)
    if tasks:
        _say(progress, f"zero-shot tasks: {', '.join(tasks)}")
        report["tasks"] = run_tasks(model, tokenizer, tasks, data_dir, s["limit"], s["batch_size"])
    max_pos = getattr(model.config, "max_position_embeddings", 2048)
    lengths = ([int(x) for x in str(s["passkey_lengths"]).split(",")] if s["passkey_lengths"]
               else [n for n in (256, 512, 1024, 2048, 4096, 8192) if n <= max_pos] or [max_pos])
    depths = [float(x) for x in str(s["passkey_depths"]).split(",")]
    _say(progress, f"passkey at {lengths} tokens")
    report["passkey"] = passkey(model, tokenizer, lengths, depths, s["passkey_trials"], progress=progress)
    heatmap(report["passkey"], out / "passkey.png", f"passkey retrieval: {Path(str(model_spec)).name}")
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(markdown_report(report))
    return report


def markdown_report(report: dict[str, Any]) -> str:
    lines = [f"# Evaluation of `{report['model']}`", "", f"Date: {report['date']}", "", "## Perplexity", "",
             "| data | tokens | context / stride | token ppl | bits/byte | word ppl |", "|---|---:|---|---:|---:|---:|"]
    for name, r in report["perplexity"].items():
        bpb = f"{r['bits_per_byte']:.4f}" if "bits_per_byte" in r else "-"
        wppl = f"{r['word_perplexity']:.2f}" if "word_perplexity" in r else "-"
        lines.append(f"| {name} | {r['tokens_scored']:,} | {r['context']} / {r['stride']} | {r['perplexity']:.3f} "
                     f"| {bpb} | {wppl} |")
    if "tasks" in report:
        lines += ["", "## Zero-shot tasks (lm-eval)", "", markdown_table(report["tasks"])]
    pk = report["passkey"]
    lengths = sorted({c["length"] for c in pk["cells"]})
    depths = sorted({c["depth"] for c in pk["cells"]})
    lines += ["", f"## Passkey retrieval (accuracy over {pk['cells'][0]['trials']} keys per cell)", "",
              "| depth \\ length | " + " | ".join(str(n) for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for d in depths:
        row = [next(c["accuracy"] for c in pk["cells"] if c["length"] == n and c["depth"] == d) for n in lengths]
        lines.append(f"| {d:g} | " + " | ".join(f"{a:.0%}" for a in row) + " |")
    lines += ["", "![passkey](passkey.png)", ""]
    return "\n".join(lines)


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"== {message}", file=sys.stderr, flush=True)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("all", help="the whole evaluation suite, one report", description=__doc__)
    p.add_argument("model", help="model folder or hub id")
    p.add_argument("--out", required=True, help="folder for report.md, report.json, passkey.png")
    p.add_argument("--config", default=None, help="YAML with any of the settings below")
    for key, default in DEFAULTS.items():
        p.add_argument(f"--{key.replace('_', '-')}", default=None, help=f"(default: {default})")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings: dict[str, Any] = {}
    if args.config:
        try:
            settings = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise CrossLayerError(f"cannot read suite config {args.config}: {e}") from None
        unknown = set(settings) - set(DEFAULTS)
        if unknown:
            raise CrossLayerError(f"unknown suite setting(s) {', '.join(sorted(unknown))}; allowed: {', '.join(DEFAULTS)}")
    for key in DEFAULTS:
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    for key in ("limit", "batch_size", "context", "passkey_trials", "ppl_max_tokens"):
        if settings.get(key) is not None:
            try:
                settings[key] = int(settings[key])
            except (TypeError, ValueError):
                raise CrossLayerError(f"{key} must be an integer, got {settings[key]!r}") from None
    report = run_suite(args.model, args.out, settings, progress=not args.no_progress)
    print(markdown_report(report))
    return 0
