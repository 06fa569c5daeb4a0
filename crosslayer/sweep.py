"""`crosslayer sweep`: a design-space grid (model configs x learning rates x seeds) on one dataset.

A sweep YAML names a prepared dataset, the models (preset names or config mappings), the learning
rates and seeds, the training keys every run shares, and optionally a text file for a WikiText-style
perplexity. Runs go one after another, each in its own folder under `out/runs/`; a run that finished
(it has a `record.json`) is skipped, an interrupted one resumes from its newest checkpoint (train()
resumes a run folder). After every run `results.jsonl` and `results.csv` are rewritten from the
records, in grid order, one row per run.

    data: runs/data/gutenberg            # made by `crosslayer prepare`
    out: runs/sweep                      # --out overrides
    model_defaults: {num_hidden_layers: 8}   # merged into every model below
    models:
      - tiny-H32-MQA                     # a preset name
      - {name: mine, preset: tiny-H32-MQA-CLA2, intermediate_size: 320}
      - {name: tiny-H32-MQA-CLA2, lrs: [3.0e-3, 4.5e-3], seeds: [0], best_lr_seeds: [1, 2]}
    lrs: [2.0e-3, 3.0e-3]                # default for models that give none
    seeds: [0]
    best_lr_seeds: []                    # more seeds, run at the best of the model's LRs once those are done
    train: {seq_len: 128, batch_tokens: 8192, max_steps: 60, eval_tokens: 65536}
    wikitext: {path: ../shared/data/wikitext-2/wiki.test.raw, context: 128, stride: 64, max_bytes: 300000}
    launcher: torchrun --standalone --nproc_per_node 2   # optional: each run as `LAUNCHER -m crosslayer train`
"""

from __future__ import annotations

import csv
import fcntl
import fnmatch
import json
import logging
import os
import shlex
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import list_checkpoints
from .config import load_config
from .data import read_meta
from .errors import CrossLayerError, TrainingDiverged
from .eval.perplexity import perplexity
from .loading import load_model
from .plot import best_lr_of, lr_scores
from .recipe import read_yaml
from .train import TrainConfig, build_model_config, diverged_marker, train

log = logging.getLogger(__name__)

SWEEP_KEYS = ("data", "out", "models", "model_defaults", "lrs", "seeds", "best_lr_seeds", "train", "wikitext",
              "launcher")
GRID_KEYS = ("lrs", "seeds", "best_lr_seeds")  # a model mapping may override these
WIKITEXT_KEYS = ("path", "context", "stride", "batch_size", "max_bytes")
GRID_OWNED = ("model", "data", "out", "lr", "seed", "init")  # training keys the grid sets itself
COLUMNS = ("run", "config", "cla", "layers", "producer_layers", "kv_bytes_per_token", "parameters", "tokens", "lr",
           "seed", "best_val_ppl", "final_val_ppl", "final_val_loss", "wikitext_ppl", "wikitext_bits_per_byte",
           "diverged", "wall_s", "resumed_from_step")


# ----------------------------------------------------------------------------------------------
# The sweep file


@dataclass
class ModelSpec:
    name: str
    spec: str | dict[str, Any]  # what TrainConfig.model takes
    lrs: list[float]
    seeds: list[int]
    best_lr_seeds: list[int]


@dataclass
class Sweep:
    data: str
    out: str
    models: list[ModelSpec]
    train: dict[str, Any] = field(default_factory=dict)
    wikitext: dict[str, Any] | None = None
    launcher: str | None = None


def _number_list(where: str, value: Any, kind: type) -> list:
    if not isinstance(value, list) or not value and where.split(".")[-1] != "best_lr_seeds":
        raise CrossLayerError(f"{where}: expected a non-empty list, got {value!r}")
    out = []
    for v in value:
        try:
            if isinstance(v, bool) or (kind is int and float(v) != int(float(v))):
                raise ValueError
            x = kind(float(v)) if kind is int else kind(v)
        except (TypeError, ValueError):
            raise CrossLayerError(f"{where}: {v!r} is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not x > 0:
            raise CrossLayerError(f"{where}: learning rates must be > 0, got {v!r}")
        out.append(x)
    if len(set(out)) != len(out):
        raise CrossLayerError(f"{where}: {value!r} repeats a value")
    return out


def load_sweep(path: str | Path, out: str | None = None, check_data: bool = True) -> Sweep:
    """Read and check a sweep YAML; every model config and the training keys are validated up front."""
    path = Path(path)
    raw = read_yaml(path, "sweep file")
    unknown = set(raw) - set(SWEEP_KEYS)
    if unknown:
        raise CrossLayerError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(SWEEP_KEYS)}")
    for key in ("data", "models"):
        if not raw.get(key):
            raise CrossLayerError(f"{path}: `{key}` is required")
    if check_data:
        read_meta(raw["data"])  # a clear error now if the dataset is missing, not at the first run
    out = out or raw.get("out")
    if not out:
        raise CrossLayerError(f"{path}: give `out` (the sweep folder) or --out")
    models = _models(raw)
    train_keys = _train_keys(raw, models[0], out)
    wikitext = _wikitext_settings(raw.get("wikitext"))
    launcher = raw.get("launcher")
    if launcher is not None and (not isinstance(launcher, str) or not launcher.strip()):
        raise CrossLayerError(f"launcher: expected a command such as 'torchrun --standalone --nproc_per_node 2', "
                              f"got {launcher!r}")
    return Sweep(str(raw["data"]), str(out), models, train_keys, wikitext, launcher)


def _models(raw: dict[str, Any]) -> list[ModelSpec]:
    """The `models` list, each with its grid (its own lrs/seeds or the top-level ones) and a checked config."""
    defaults = {k: _number_list(k, raw[k], float if k == "lrs" else int) for k in GRID_KEYS if k in raw}
    defaults.setdefault("seeds", [0])
    defaults.setdefault("best_lr_seeds", [])
    model_defaults = raw.get("model_defaults") or {}
    if not isinstance(model_defaults, dict):
        raise CrossLayerError(f"model_defaults: expected a mapping of config fields, got {model_defaults!r}")
    if not isinstance(raw["models"], list):
        raise CrossLayerError("models: expected a list of preset names or mappings")
    models = [_model_spec(f"models[{i}]", entry, defaults, model_defaults) for i, entry in enumerate(raw["models"])]
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise CrossLayerError(f"models: names must be unique; repeated: {sorted({n for n in names if names.count(n) > 1})}")
    return models


def _model_spec(where: str, entry: Any, defaults: dict[str, list], model_defaults: dict[str, Any]) -> ModelSpec:
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict):
        raise CrossLayerError(f"{where}: expected a preset name or a mapping, got {entry!r}")
    entry = dict(entry)
    name = entry.pop("name", None) or entry.get("preset")
    if not isinstance(name, str) or not name or any(c in name for c in "/\\ "):
        raise CrossLayerError(f"{where}: give a `name` (no spaces or slashes), got {name!r}")
    grid = {k: _number_list(f"{where}.{k}", entry.pop(k), float if k == "lrs" else int)
            for k in GRID_KEYS if k in entry}
    grid = {**defaults, **grid}
    if "lrs" not in grid:
        raise CrossLayerError(f"{where} ({name}): no learning rates; give `lrs` at the top or in the model")
    fields = {**model_defaults, **entry}
    if "preset" not in fields and "hidden_size" not in fields:
        fields["preset"] = name  # the name is a preset name, model_defaults adjust it
    try:
        load_config(dict(fields))
    except CrossLayerError as e:
        raise CrossLayerError(f"{where} ({name}): {e}") from None
    except TypeError as e:
        raise CrossLayerError(f"{where} ({name}): {e}") from None
    return ModelSpec(name, fields, grid["lrs"], grid["seeds"], grid["best_lr_seeds"])


def _train_keys(raw: dict[str, Any], first: ModelSpec, out: str) -> dict[str, Any]:
    """The `train` mapping, checked now (every key and type) as the first run's recipe, not an hour into the sweep."""
    train_keys = raw.get("train") or {}
    if not isinstance(train_keys, dict):
        raise CrossLayerError(f"train: expected a mapping of training keys, got {train_keys!r}")
    owned = set(train_keys) & set(GRID_OWNED)
    if owned:
        raise CrossLayerError(f"train: {', '.join(sorted(owned))} cannot be set here; the sweep sets "
                              f"{', '.join(GRID_OWNED)} for each run (data at the top, lrs/seeds as lists)")
    try:
        TrainConfig.from_dict({**train_keys, "model": first.spec, "data": raw["data"], "out": out, "lr": first.lrs[0]})
    except CrossLayerError as e:
        raise CrossLayerError(f"train: {e}") from None
    return dict(train_keys)


def _wikitext_settings(wikitext: Any) -> dict[str, Any] | None:
    """The `wikitext` entry (a path, or a mapping of WIKITEXT_KEYS) as a checked mapping; None if absent."""
    if wikitext is None:
        return None
    if isinstance(wikitext, str):
        wikitext = {"path": wikitext}
    if not isinstance(wikitext, dict) or "path" not in wikitext:
        raise CrossLayerError("wikitext: expected a path or a mapping with `path` (and context, stride, "
                              "batch_size, max_bytes)")
    bad = set(wikitext) - set(WIKITEXT_KEYS)
    if bad:
        raise CrossLayerError(f"wikitext: unknown key(s) {', '.join(sorted(bad))}; allowed: {', '.join(WIKITEXT_KEYS)}")
    if not Path(wikitext["path"]).is_file():
        raise CrossLayerError(f"wikitext.path: no such file {wikitext['path']!r}")
    for k in ("context", "stride", "batch_size", "max_bytes"):
        v = wikitext.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise CrossLayerError(f"wikitext.{k}: expected a positive integer, got {v!r}")
    return wikitext


# ----------------------------------------------------------------------------------------------
# The grid


def run_name(model: str, lr: float, seed: int) -> str:
    return f"{model}_lr{lr:g}_s{seed}"


def _record_path(sweep: Sweep, name: str) -> Path:
    return Path(sweep.out) / "runs" / name / "record.json"


def read_record(sweep: Sweep, name: str) -> dict | None:
    path = _record_path(sweep, name)
    return json.loads(path.read_text()) if path.exists() else None


def plan(sweep: Sweep) -> list[tuple[ModelSpec, float | None, int]]:
    """Every run of the grid, model by model: its LR x seed runs, then its best-LR seeds.

    A best-LR run whose LR is not known yet (the model's LR runs are unfinished) has lr None."""
    runs: list[tuple[ModelSpec, float | None, int]] = []
    for m in sweep.models:
        base = [(m, lr, seed) for lr in m.lrs for seed in m.seeds]
        runs += base
        extra = [s for s in m.best_lr_seeds if s not in m.seeds]
        if extra:
            records = [read_record(sweep, run_name(m.name, lr, seed)) for _, lr, seed in base]
            lr = best_lr_of(lr_scores(records)) if all(records) else None
            runs += [(m, lr, seed) for seed in extra]
    return runs


@contextmanager
def locked(path: str | None):
    """Hold an exclusive flock on `path` (shared CPUs: other jobs get their turn between runs)."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _wikitext_file(sweep: Sweep) -> Path | None:
    """The evaluation text; with max_bytes, its first whole lines up to that size, written once into out/."""
    if not sweep.wikitext:
        return None
    src = Path(sweep.wikitext["path"])
    limit = sweep.wikitext.get("max_bytes")
    if not limit:
        return src
    data = src.read_bytes()
    if len(data) <= limit:
        return src
    cut = data[:limit]
    cut = cut[: cut.rfind(b"\n") + 1] or cut
    dst = Path(sweep.out) / f"wikitext-first-{len(cut)}-bytes.txt"
    if not dst.exists() or dst.read_bytes() != cut:
        dst.write_bytes(cut)
    return dst


def _train_in_process(cfg: TrainConfig) -> dict:
    try:
        return train(cfg)
    except TrainingDiverged as e:
        log.warning(f"  {e}")
        return {"diverged": True}


def _train_launched(cfg: TrainConfig, launcher: str, run_dir: Path) -> dict:
    recipe = run_dir.parent / f"{run_dir.name}.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    cmd = [*shlex.split(launcher), "-m", "crosslayer", "train", str(recipe)]
    proc = subprocess.run(cmd)
    if proc.returncode != 0 and diverged_marker(run_dir).exists():  # the trainer's own record of a divergence
        log.warning(f"  {run_dir.name} diverged: {diverged_marker(run_dir).read_text().strip()}")
        return {"diverged": True}
    if proc.returncode != 0:
        raise CrossLayerError(f"{' '.join(cmd)} exited with {proc.returncode}; fix it and run the sweep again "
                              "(finished runs are kept)")
    return json.loads((run_dir / "summary.json").read_text())


def run_one(sweep: Sweep, model: ModelSpec, lr: float, seed: int, wikitext: Path | None,
            progress: bool = True) -> dict:
    """Train (or resume) one run, evaluate it, and write its record.json."""
    name = run_name(model.name, lr, seed)
    run_dir = Path(sweep.out) / "runs" / name
    cfg = TrainConfig.from_dict({**sweep.train, "model": model.spec, "data": sweep.data, "out": str(run_dir),
                                 "lr": lr, "seed": seed, **({} if progress else {"progress": False})})
    existing = list_checkpoints(run_dir) if run_dir.exists() else []
    resumed = int(existing[-1].name.split("_")[-1]) if existing else 0
    start = time.perf_counter()
    summary = _train_launched(cfg, sweep.launcher, run_dir) if sweep.launcher else _train_in_process(cfg)
    config = build_model_config(cfg, read_meta(sweep.data))  # the model the trainer built, vocabulary included
    evals = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        evals = [r for r in map(json.loads, metrics.read_text().splitlines()) if "val_ppl" in r]
    diverged = bool(summary.get("diverged"))
    record = {
        "run": name, "config": model.name, "cla": config.num_producer_layers < config.num_hidden_layers,
        "layers": config.num_hidden_layers, "producer_layers": config.num_producer_layers,
        "kv_bytes_per_token": summary.get("kv_bytes_per_token", config.kv_bytes_per_token()),
        "parameters": summary.get("parameters"), "tokens": cfg.total_steps * cfg.batch_tokens, "lr": lr, "seed": seed,
        "best_val_ppl": min((r["val_ppl"] for r in evals), default=None),
        "final_val_ppl": None if diverged else summary.get("val_ppl"),
        "final_val_loss": None if diverged else summary.get("val_loss"),
        "wikitext_ppl": None, "wikitext_bits_per_byte": None, "diverged": diverged,
    }
    if wikitext is not None and not diverged:
        record.update(_wikitext_scores(run_dir, wikitext, sweep.wikitext, cfg.seq_len, record["parameters"]))
    if record["parameters"] is None:
        record["parameters"] = config.num_parameters()
    record.update(wall_s=round(time.perf_counter() - start, 1), resumed_from_step=resumed)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "record.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, run_dir / "record.json")
    return record


def _wikitext_scores(run_dir: Path, wikitext: Path, settings: dict[str, Any], seq_len: int,
                     parameters: int | None) -> dict[str, Any]:
    """The record's wikitext fields: the run's saved model scored on the text (and its parameters, if unknown)."""
    lm, tok = load_model(run_dir, "auto", "auto")
    result = perplexity(lm, tok, str(wikitext), settings.get("context", seq_len), settings.get("stride"),
                        settings.get("batch_size", 8), progress=False)
    return {"parameters": parameters if parameters is not None else sum(p.numel() for p in lm.parameters()),
            "wikitext_ppl": result["perplexity"], "wikitext_bits_per_byte": result.get("bits_per_byte"),
            "wikitext_tokens": result["tokens_scored"], "wikitext_file": str(wikitext)}


def write_results(sweep: Sweep) -> list[dict]:
    """Rewrite results.jsonl and results.csv from the records of the planned runs, in grid order."""
    rows = []
    for model, lr, seed in plan(sweep):
        if lr is None:
            continue
        record = read_record(sweep, run_name(model.name, lr, seed))
        if record:
            rows.append(record)
    out = Path(sweep.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, out / "results.jsonl")
    tmp = out / "results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / "results.csv")
    return rows


def run_sweep(sweep: Sweep, only: list[str] = (), lock: str | None = None, progress: bool = True) -> list[dict]:
    """Run every unfinished run of the grid (those matching `only`, if given); returns all records."""
    Path(sweep.out).mkdir(parents=True, exist_ok=True)
    wikitext = _wikitext_file(sweep)
    done_here, t0 = 0, time.perf_counter()
    while True:  # re-plan after every run: best-LR seeds become known as the LR runs finish
        planned = [(m, lr, s, lr is not None and read_record(sweep, run_name(m.name, lr, s)) is not None)
                   for m, lr, s in plan(sweep)]
        todo = [(m, lr, s) for m, lr, s, done in planned
                if lr is not None and not done
                and (not only or any(fnmatch.fnmatch(run_name(m.name, lr, s), p) for p in only))]
        total, finished = len(planned), sum(done for *_, done in planned)
        if not todo:
            break
        model, lr, seed = todo[0]
        eta = ""
        if done_here:
            eta = f", ~{(time.perf_counter() - t0) / done_here * len(todo) / 60:.0f} min left"
        log.info(f"[sweep {finished + 1}/{total}{eta}] {run_name(model.name, lr, seed)}")
        with locked(lock):
            record = run_one(sweep, model, lr, seed, wikitext, progress)
        write_results(sweep)
        done_here += 1
        ppl = record["final_val_ppl"]
        log.info(f"[sweep] {record['run']}: val ppl {ppl:.2f}" if ppl is not None else f"[sweep] {record['run']}: diverged")
    rows = write_results(sweep)
    waiting = [f"{m.name}_lr?_s{s}" for m, lr, s in plan(sweep) if lr is None]
    log.info(f"[sweep] {len(rows)} of {len(plan(sweep))} runs finished ({done_here} this time, "
             f"{(time.perf_counter() - t0) / 60:.1f} min); results in {Path(sweep.out) / 'results.csv'}")
    if waiting:
        log.info(f"[sweep] waiting for their LR runs: {', '.join(waiting)}")
    return rows
