"""Local copies of the benchmark data, in the schema each of lm-eval's standard tasks expects.

A data folder is laid out like `shared/data`: one folder per task, holding the files listed in
`SOURCES`. Most files are row-for-row dumps of the Hugging Face datasets lm-eval reads and are used
as they are; the others are converted here, at run time, into JSON lines with the fields the
lm-eval task reads (its prompt templates and `process_docs` stay untouched).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ...errors import CrossLayerError


def _jsonl(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise CrossLayerError(f"{path}:{number}: not valid JSON ({e})") from None


def _split_hellaswag_ctx(ctx: str) -> tuple[str, str]:
    """(ctx_a, ctx_b) of a HellaSwag context whose two parts were joined with a space.

    lm-eval prompts with `ctx_a + " " + ctx_b.capitalize()`, so the boundary matters. ctx_b is the
    unfinished sentence the endings complete ("... sitting on a roof. he"); a context that ends a
    sentence (the WikiHow items) has an empty ctx_b.
    """
    if ctx.endswith((".", "!", "?")):
        return ctx, ""
    match = re.fullmatch(r"(.*[.!?]) (.+)", ctx, flags=re.DOTALL)
    return (match[1], match[2]) if match else (ctx, "")


def hellaswag_docs(path: Path) -> Iterator[dict]:
    """llama.cpp's 6-lines-per-item text form -> the HF `Rowan/hellaswag` fields lm-eval's process_docs reads."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or len(lines) % 6:
        raise CrossLayerError(f"{path}: expected 6 lines per item (context, label, 4 endings); got {len(lines)} lines")
    for i in range(0, len(lines), 6):
        head, label, *endings = lines[i : i + 6]
        activity, sep, ctx = head.partition(": ")
        if not sep or label not in ("0", "1", "2", "3"):
            raise CrossLayerError(f"{path}:{i + 1}: not a HellaSwag item (want '<activity>: <context>' then a label 0-3)")
        ctx_a, ctx_b = _split_hellaswag_ctx(ctx)
        yield {"ind": i // 6, "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx,
               "endings": endings, "label": label}


def piqa_docs(path: Path) -> Iterator[dict]:
    """The original `valid.jsonl` + `valid-labels.lst` -> one row with `label`, as in the HF dataset."""
    labels_path = path.with_name(path.stem + "-labels.lst")
    if not labels_path.exists():
        raise CrossLayerError(f"{labels_path} not found: PIQA's labels come in a separate file beside {path.name}")
    labels = labels_path.read_text(encoding="utf-8").split()
    docs = list(_jsonl(path))
    if len(labels) != len(docs) or set(labels) - {"0", "1"}:
        raise CrossLayerError(f"{labels_path}: want one label 0/1 per item of {path.name} ({len(docs)}); got {len(labels)}")
    for doc, label in zip(docs, labels, strict=True):
        yield {"goal": doc["goal"], "sol1": doc["sol1"], "sol2": doc["sol2"], "label": int(label)}


def boolq_docs(path: Path) -> Iterator[dict]:
    """HF `boolq` rows (`answer`: bool) -> the `super_glue/boolq` fields lm-eval's task reads (`label`: 0 no, 1 yes)."""
    for i, doc in enumerate(_jsonl(path)):
        yield {"question": doc["question"], "passage": doc["passage"], "idx": i, "label": int(bool(doc["answer"]))}


def _olmes_docs(path: Path, question_field: str) -> Iterator[dict]:
    """OLMES request docs (question, choices, 0-based gold) -> the HF schema: choices {text, label}, answerKey.

    The original letter labels are not in these files; lm-eval only uses the index of the answer
    among the labels, so letters A, B, C... give the same targets.
    """
    for doc in _jsonl(path):
        labels = [chr(ord("A") + k) for k in range(len(doc["choices"]))]
        yield {"id": doc["id"], question_field: doc["question"], "choices": {"text": doc["choices"], "label": labels},
               "answerKey": labels[doc["gold"]]}


def lambada_docs(path: Path) -> Iterator[dict]:
    """{context, continuation} -> {text}: lm-eval splits `text` at its last space into context and target word."""
    for doc in _jsonl(path):
        yield {"text": doc["context"] + " " + doc["continuation"]}


@dataclass(frozen=True)
class Source:
    """One local file for a task, the split it holds, and how it reaches lm-eval's schema."""

    file: str  # relative to the data folder
    split: str
    convert: Callable[[Path], Iterator[dict]] | None = None  # None: already in lm-eval's schema
    note: str = ""


# Per task, in order of preference: the split lm-eval reports first, when the folder has it.
SOURCES: dict[str, list[Source]] = {
    "hellaswag": [Source("hellaswag/hellaswag_val_full.txt", "validation", hellaswag_docs,
                         "rebuilt from llama.cpp's text form, whose contexts lost the ctx_a/ctx_b boundary; it is "
                         "inferred (the unfinished last sentence), so a few prompts may differ from lm-eval's in "
                         "capitalisation")],
    "piqa": [Source("piqa/valid.jsonl", "validation", piqa_docs, "labels joined from valid-labels.lst")],
    "winogrande": [Source("winogrande/validation.jsonl", "validation")],
    "sciq": [Source("sciq/validation.jsonl", "validation")],
    "openbookqa": [Source("openbookqa/test.jsonl", "test", lambda p: _olmes_docs(p, "question_stem"),
                          "converted from OLMES docs (question, choices, gold) to the HF schema"),
                   Source("openbookqa/validation.jsonl", "validation")],
    "boolq": [Source("boolq/validation.jsonl", "validation", boolq_docs, "label = answer (HF boolq -> super_glue schema)")],
    "arc_easy": [Source("arc_easy/test.jsonl", "test", lambda p: _olmes_docs(p, "question"),
                        "converted from OLMES docs (question, choices, gold) to the HF schema"),
                 Source("arc_easy/validation.jsonl", "validation")],
    "lambada_openai": [Source("lambada_openai/lambada_openai.jsonl", "test", lambada_docs,
                              "text = context + ' ' + continuation")],
}


def find_source(task: str, data_dir: Path) -> Source:
    """The first of the task's files that exists in data_dir."""
    for source in SOURCES[task]:
        if (data_dir / source.file).is_file():
            return source
    wanted = " or ".join(str(data_dir / s.file) for s in SOURCES[task])
    raise CrossLayerError(f"no local data for {task}: {wanted} not found")


def prepare(task: str, data_dir: Path, out_dir: Path) -> tuple[Path, Source]:
    """(file in lm-eval's schema, its source): the local file itself, or a converted copy written to out_dir."""
    source = find_source(task, data_dir)
    path = data_dir / source.file
    if source.convert is None:
        return path, source
    out = out_dir / f"{task}.{source.split}.jsonl"
    try:
        with out.open("w", encoding="utf-8") as f:
            for doc in source.convert(path):
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    except CrossLayerError:
        raise
    except (KeyError, TypeError, IndexError, ValueError) as e:  # a field missing or of the wrong type
        raise CrossLayerError(f"{path}: unexpected schema for {task} ({type(e).__name__}: {e})") from None
    return out, source
