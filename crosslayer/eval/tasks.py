"""Zero-shot benchmarks (HellaSwag, PIQA, WinoGrande, SciQ, OpenBookQA, BoolQ, ARC-Easy, LAMBADA) through lm-eval.

Prompts, metrics and standard errors are lm-eval's own, computed by its Hugging Face model wrapper
on the already-loaded model, so acc / acc_norm compare with published lm-eval tables.

Without --data-dir, lm-eval's standard tasks load their data from the Hugging Face hub as lm-eval
always does. With --data-dir DIR (laid out like shared/data: one folder per task) the same task
configs run on local copies: the templates in crosslayer/eval/lm_eval_tasks include lm-eval's
installed task YAML and override only the data location and split. Where the folder lacks the
split lm-eval reports (SciQ test), the split that is there is used and the result says so.
"""

from __future__ import annotations

import datetime
import json
import string
import tempfile
from pathlib import Path
from typing import Any

from ..errors import CrossLayerError
from .lm_eval_tasks import local_data

# Supported tasks: lm-eval's config (relative to lm_eval/tasks/) and the split lm-eval reports.
TASKS: dict[str, tuple[str, str]] = {
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
    "piqa": ("piqa/piqa.yaml", "validation"),
    "winogrande": ("winogrande/default.yaml", "validation"),
    "sciq": ("sciq/sciq.yaml", "test"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "test"),
    "boolq": ("super_glue/boolq/default.yaml", "validation"),
    "arc_easy": ("arc/arc_easy.yaml", "test"),
    "lambada_openai": ("lambada/lambada_openai.yaml", "test"),
}
TEMPLATES = Path(__file__).parent / "lm_eval_tasks"
TABLE_METRICS = ("acc", "acc_norm", "perplexity")  # columns of the markdown table


class HubUnreachable(CrossLayerError):
    """lm-eval could not load the tasks' data from the Hugging Face hub; `reason` says why, the message
    adds the way out (local copies), which the command line words as its flag."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}. Without network access, run on local copies with data_dir=DIR "
                         "(laid out like shared/data)")


def parse_tasks(tasks: str | list[str]) -> list[str]:
    """Task names from a comma-separated string or a list, checked against TASKS (order kept, duplicates dropped)."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        what = f"unknown task(s): {', '.join(unknown)}" if unknown else "no task given"
        raise CrossLayerError(f"{what}; supported: {', '.join(TASKS)}")
    return names


def lm_eval_tasks_dir() -> Path:
    """lm-eval's installed task folder (holding hellaswag/hellaswag.yaml and the rest)."""
    try:
        import lm_eval.tasks
    except ImportError:
        raise CrossLayerError("the zero-shot tasks need lm-eval: pip install 'crosslayer[eval]'") from None
    return Path(lm_eval.tasks.__file__).parent


def render_configs(names: list[str], data_dir: Path, out_dir: Path) -> dict[str, dict[str, Any]]:
    """Write an lm-eval config per task to out_dir/tasks, reading data from data_dir (converted into out_dir/data).

    Returns, per task, the split used, the file lm-eval reads and a note on any conversion.
    """
    def quoted(path: Path) -> str:  # the inside of a YAML double-quoted string (JSON escapes are valid there)
        return json.dumps(str(path))[1:-1]

    (out_dir / "tasks").mkdir()
    (out_dir / "data").mkdir()
    info = {}
    for name in names:
        data_file, source = local_data.prepare(name, data_dir, out_dir / "data")
        template = string.Template((TEMPLATES / f"{name}.yaml").read_text(encoding="utf-8"))
        config = template.substitute(
            lm_eval_tasks=quoted(lm_eval_tasks_dir()), data_file=quoted(data_file),
            cache_dir=quoted(out_dir / "cache"),  # datasets' arrow cache lives and dies with the run
            split=source.split,
            # lm-eval scores the test split when a config names one, else validation: name only ours
            validation_split="validation" if source.split == "validation" else "null",
            test_split="test" if source.split == "test" else "null",
        )
        (out_dir / "tasks" / f"{name}.yaml").write_text(config, encoding="utf-8")
        notes = [source.note] if source.note else []
        if source.split != TASKS[name][1]:
            notes.append(f"lm-eval reports the {TASKS[name][1]} split, which the data folder lacks: "
                         f"{source.split} figures are not directly comparable with published ones")
        info[name] = {"split": source.split, "data": str(data_dir / source.file), "note": "; ".join(notes)}
    return info


def run_tasks(model, tokenizer, tasks: list[str], data_dir: str | Path | None = None, limit: int | None = None,
              batch_size: int = 8, log_samples: bool = False) -> dict[str, Any]:
    """Score a loaded causal LM on lm-eval tasks, zero-shot.

    Returns {"tasks": {name: {"metrics", "n", "split", ...}}, "lm_eval_version", "date", ...}, plus
    "samples" (lm-eval's per-item records: prompts, log-likelihoods, scores) with log_samples.
    """
    names = parse_tasks(tasks)
    if limit is not None and limit < 1:
        raise CrossLayerError(f"limit must be a positive number of items per task; got {limit}")
    if batch_size < 1:
        raise CrossLayerError(f"batch size must be >= 1; got {batch_size}")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise CrossLayerError(f"data folder not found: {data_dir}")
    lm_dir = lm_eval_tasks_dir()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="crosslayer-tasks-") as tmp:
        if data_dir is None:
            # lm-eval's own configs, found by name; indexing only their folders skips a scan of ~15k task configs
            manager = TaskManager(include_path=[str(lm_dir / Path(TASKS[n][0]).parent) for n in names],
                                  include_defaults=False)
        else:
            info = render_configs(names, Path(data_dir).resolve(), Path(tmp))
            manager = TaskManager(include_path=str(Path(tmp) / "tasks"), include_defaults=False)
        try:  # building a task loads its data set
            loaded = manager.load(names)["tasks"]
        except Exception as e:  # datasets and the hub client raise many types; the user needs the message
            if data_dir is None:
                raise HubUnreachable(
                    f"cannot load {', '.join(names)} from the Hugging Face hub ({type(e).__name__}: {e})") from None
            raise CrossLayerError(f"cannot load the local task data from {data_dir}: {type(e).__name__}: {e}") from None
        if data_dir is None:
            info = {n: {"split": TASKS[n][1], "data": f"hub:{loaded[n].config.dataset_path}", "note": ""} for n in names}
        lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=[loaded[n] for n in names], task_manager=manager,
                                      limit=limit, log_samples=log_samples)

    result: dict[str, Any] = {
        "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "lm_eval_version": lm_eval.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "data": "hub" if data_dir is None else str(data_dir),
        "num_fewshot": 0, "limit": limit, "batch_size": batch_size,
        "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
        "tasks": {},
    }
    for name in names:
        metrics = {}
        for key, value in out["results"][name].items():  # lm-eval keys are "<metric>,<filter>", e.g. "acc,none"
            metric, _, _ = key.partition(",")
            if metric != "alias":
                metrics[metric] = value
        result["tasks"][name] = {"metrics": metrics, "n": out["n-samples"][name]["effective"], **info[name],
                                 "lm_eval_split": TASKS[name][1], "version": out["versions"].get(name)}
    if log_samples:
        result["samples"] = {name: out["samples"][name] for name in names}
    return result


def _cell(metrics: dict[str, Any], metric: str) -> str:
    if metric not in metrics:
        return "–"
    def fmt(x: float) -> str:  # perplexity of an untrained model can be astronomical
        return f"{x:.4f}" if metric != "perplexity" else f"{x:.2f}" if abs(x) < 1e6 else f"{x:.3g}"

    value, stderr = metrics[metric], metrics.get(f"{metric}_stderr")
    return f"{fmt(value)} ± {fmt(stderr)}" if isinstance(stderr, (int, float)) else fmt(value)


def markdown_table(result: dict[str, Any]) -> str:
    """One row per task: split, items, acc / acc_norm / perplexity with ± stderr; notes below."""
    lines = [f"model {result['model']}, lm-eval {result['lm_eval_version']}, {result['num_fewshot']}-shot, "
             f"data {result['data']}" + (f", first {result['limit']} items per task" if result["limit"] else ""),
             "",
             "| task | split | n | " + " | ".join(TABLE_METRICS) + " |",
             "|---|---|---:|" + "---:|" * len(TABLE_METRICS)]
    for name, task in result["tasks"].items():
        cells = [name, task["split"], str(task["n"])] + [_cell(task["metrics"], m) for m in TABLE_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {name}: {task['note']}" for name, task in result["tasks"].items() if task["note"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write_results(result: dict[str, Any], output: str | Path) -> Path:
    """results.json (without samples), results.md, and samples_<task>.jsonl when samples were kept."""
    from lm_eval.utils import handle_non_serializable  # numpy scalars and the like in samples

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in result.items() if k != "samples"}
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=handle_non_serializable) + "\n")
    (out / "results.md").write_text(markdown_table(result), encoding="utf-8")
    for name, samples in result.get("samples", {}).items():
        with (out / f"samples_{name}.jsonl").open("w", encoding="utf-8") as f:
            for sample in samples:
                f.write(json.dumps(sample, ensure_ascii=False, default=handle_non_serializable) + "\n")
    return out
