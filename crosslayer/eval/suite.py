"""The evaluation suite: perplexity, zero-shot tasks and passkey in one run, one report.

WikiText-2 test perplexity (token, bits per byte, word level), optionally the model's own
validation split, the eight zero-shot tasks of the paper's tables through lm-eval, and passkey
retrieval. Settings are a `SuiteSettings` (flags of `crosslayer eval all`, or a YAML of the same keys).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CrossLayerError
from ..recipe import parse_list
from .passkey import heatmap, passkey
from .perplexity import perplexity
from .tasks import TASKS, markdown_table, parse_tasks, run_tasks

log = logging.getLogger(__name__)

@dataclass
class SuiteSettings:
    """What `eval all` runs; every field is also a flag (`--data-dir`, ...) and a key of a --config YAML."""

    data_dir: str | None = field(default=None, metadata={"help": "local copies of the data, laid out like shared/data "
                                                         "(none: the Hugging Face hub)"})
    val: str | None = field(default=None, metadata={"help": "a `crosslayer prepare` folder: also report its "
                                                    "validation perplexity"})
    tasks: str = field(default=",".join(TASKS), metadata={"help": "comma-separated lm-eval tasks; empty: none"})
    limit: int | None = field(default=None, metadata={"help": "items per task (none: all)"})
    batch_size: int = field(default=16, metadata={"help": "sequences per forward pass"})
    context: int | None = field(default=None, metadata={"help": "perplexity window in tokens (none: the model's, "
                                                        "at most 2048)"})
    ppl_max_tokens: int | None = field(default=None, metadata={"help": "score only the first N tokens (none: all)"})
    passkey_lengths: str | None = field(default=None, metadata={"help": "comma-separated prompt lengths (none: 256, "
                                                                "512, ... up to the model's maximum)"})
    passkey_depths: str = field(default="0,0.25,0.5,0.75,1", metadata={"help": "comma-separated key depths in [0, 1]"})
    passkey_trials: int = field(default=5, metadata={"help": "keys per passkey cell"})

    def __post_init__(self) -> None:
        for name in ("limit", "batch_size", "context", "ppl_max_tokens", "passkey_trials"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise CrossLayerError(f"{name} must be >= 1, got {value}")


def run_suite(model, tokenizer, name: str, out: str | Path, settings: SuiteSettings,
              progress: bool = True) -> dict[str, Any]:
    """Run every evaluation on a loaded model and write out/report.json, out/report.md and out/passkey.png."""
    s = settings
    tasks = parse_tasks(s.tasks) if s.tasks else []
    data_dir = Path(s.data_dir) if s.data_dir else None
    if data_dir is not None and not data_dir.is_dir():
        raise CrossLayerError(f"data_dir {data_dir} does not exist")
    depths = parse_list(s.passkey_depths, float, "passkey_depths")
    max_pos = getattr(model.config, "max_position_embeddings", 2048)
    lengths = (parse_list(s.passkey_lengths, int, "passkey_lengths") if s.passkey_lengths
               else [n for n in (256, 512, 1024, 2048, 4096, 8192) if n <= max_pos] or [max_pos])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"model": name, "date": dt.datetime.now(dt.timezone.utc).isoformat(),
                              "settings": asdict(s), "perplexity": {}}
    wikitext = str(data_dir / "wikitext-2" / "wiki.test.raw") if data_dir else "hf:wikitext:wikitext-2-raw-v1:test"
    log.info(f"== perplexity on {wikitext}")
    report["perplexity"]["wikitext2_test"] = perplexity(model, tokenizer, wikitext, s.context, None, s.batch_size,
                                                        max_tokens=s.ppl_max_tokens, progress=progress)
    if s.val:
        log.info(f"== perplexity on {s.val} (val split)")
        report["perplexity"]["val"] = perplexity(model, tokenizer, s.val, s.context, None, s.batch_size,
                                                 max_tokens=s.ppl_max_tokens, progress=progress)
    if tasks:
        log.info(f"== zero-shot tasks: {', '.join(tasks)}")
        report["tasks"] = run_tasks(model, tokenizer, tasks, data_dir, s.limit, s.batch_size)
    log.info(f"== passkey at {lengths} tokens")
    report["passkey"] = passkey(model, tokenizer, lengths, depths, s.passkey_trials, progress=progress)
    heatmap(report["passkey"], out / "passkey.png", f"passkey retrieval: {Path(name).name}")
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
