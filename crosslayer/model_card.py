"""Model cards: the README.md the Hugging Face Hub shows for a converted or trained model folder.

A card is YAML front matter the Hub reads (base_model, library_name, tags, pipeline_tag) and a page
written from the folder's own facts only: the config (sharing plan, KV bytes per token), the plan
record `crosslayer convert` writes (plan.json: how the plan was chosen, the K/V initialisation, the
calibration data, a search's steps) and, for `crosslayer train`, the run's recipe and last validation.
Nothing measured is written here that the caller did not hand in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .config import CLAConfig, describe, kv_groups
from .kv import kv_bytes_per_token
from .loading import looks_like_path

CARD = "README.md"
TAGS = ["crosslayer", "cross-layer-attention", "kv-cache-compression", "custom_code"]
KV_INIT_TEXT = {
    "fit": "least squares on the calibration activations (each producer's map reproduces its group's K and V)",
    "mean": "each group's K/V projections and norm scales averaged (the paper's mean pooling)",
    "mean-folded": "the mean of each group's K/V maps, norm scales folded in",
    "first": "each group keeps its first layer's K/V projections",
    "copy": "none: every layer keeps its own K/V (an exact copy)",
}


def base_model_name(source: str | Path | None) -> str | None:
    """The Hub's `base_model` of `source`: a hub id as given, else the local path's name (folder or file)."""
    if not source:
        return None
    text = str(source)
    if Path(text).exists() or looks_like_path(text):
        return Path(text).resolve().name
    return text


def training_record(cfg: dict[str, Any], steps: int, validation: dict[str, Any] | None) -> dict[str, Any]:
    """The facts of a training run a card shows: its recipe (`TrainConfig.to_dict()`), the optimizer
    steps taken and the last validation record (val_loss at a step), if any."""
    keys = ("init", "data", "objective", "teacher", "teacher_topk", "distill_temperature", "trainable", "seq_len",
            "batch_tokens", "lr", "seed")
    return {**{k: cfg.get(k) for k in keys}, "steps": steps, "tokens": steps * cfg["batch_tokens"],
            "validation": validation or None}


def read_plan_record(folder: str | Path) -> dict[str, Any] | None:
    """The plan.json `crosslayer convert` wrote in `folder`, or None (a folder trained from scratch)."""
    path = Path(folder) / "plan.json"
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    return raw if isinstance(raw, dict) else None


def model_card(config: CLAConfig, name: str, plan: dict[str, Any] | None = None,
               training: dict[str, Any] | None = None) -> str:
    """The README.md of the model folder `name` with this `config`; `plan`: the plan.json of its
    conversion (this folder's, or for a trained model its init folder's); `training`: `training_record`."""
    source = (plan or {}).get("source") or (training or {}).get("init")
    base = base_model_name(source)
    front = {**({"base_model": base} if base else {}), "library_name": "transformers",
             "tags": TAGS + (["distillation"] if training and training.get("teacher") else []),
             "pipeline_tag": "text-generation"}
    made = (f"converted from `{source}` by `crosslayer convert`" if plan and not training else
            f"trained by `crosslayer train` from `{training['init']}`" if training and training.get("init") else
            "trained from scratch by `crosslayer train`")
    parts = [
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---",
        f"# {name}",
        f"A Cross-Layer Attention (CLA) model, {made}: layers that share a producer's keys and values "
        "cache them once (Brandon et al., *Reducing Transformer Key-Value Cache Size with Cross-Layer "
        "Attention*, NeurIPS 2024). Made with [crosslayer](https://pypi.org/project/crosslayer/).",
        _plan_section(config, plan),
        _kv_section(config),
    ]
    if plan and plan.get("calibration"):
        parts.append(_calibration_section(plan["calibration"]))
    if training:
        parts.append(_training_section(training))
    parts.append(_use_section(name))
    return "\n\n".join(parts) + "\n"


def write_model_card(folder: str | Path, config: CLAConfig, name: str | None = None,
                     plan: dict[str, Any] | None = None, training: dict[str, Any] | None = None) -> Path:
    """Write `model_card(...)` as `folder`/README.md (named after the folder unless `name`); returns its path."""
    path = Path(folder) / CARD
    path.write_text(model_card(config, name or Path(folder).resolve().name, plan, training))
    return path


# ----------------------------------------------------------------------------------------------
# Sections


def _plan_section(config: CLAConfig, plan: dict[str, Any] | None) -> str:
    n, producers = config.num_hidden_layers, config.producer_layers
    chosen = (plan or {}).get("chosen_by") or (
        "kv_sources" if config.cla_pattern == "custom" else f"cla_factor {config.cla_factor}, {config.cla_pattern}")
    lines = [
        "## Sharing plan", "",
        f"- layers: {n}; K/V producers: {len(producers)} (layers {', '.join(map(str, producers))})",
        f"- sharing groups: `{describe(config.kv_sources)}` (each group attends with its first layer's K/V)",
        f"- `kv_sources`: `{config.kv_sources}` (in config.json; layer i uses the K/V of layer kv_sources[i])",
        f"- chosen by: {chosen}",
    ]
    if plan and plan.get("kv_init"):
        lines.append(f"- K/V initialisation: `{plan['kv_init']}`, {KV_INIT_TEXT.get(plan['kv_init'], plan['kv_init'])}")
    search = (plan or {}).get("search")
    if search:
        lines += ["", f"The plan search measured {search.get('evaluations')} plans on {search.get('search_tokens'):,} "
                      f"calibration tokens (metric `{search.get('metric')}`), merging one group per step:", "",
                  "| producers | cost | step |", "| ---: | ---: | --- |"]
        lines += [f"| {s['producers']} | {s['cost']:.4f} | {s['step']} |" for s in search.get("steps", [])]
    if len(kv_groups(config.kv_sources)) == n:
        lines.append("- every layer is its own producer: no K/V is shared")
    return "\n".join(lines)


def _kv_section(config: CLAConfig) -> str:
    n, p = config.num_hidden_layers, config.num_producer_layers
    after = kv_bytes_per_token(config, "bf16")
    before = after // p * n  # every producer caches the same bytes: the dense original has n of them
    return "\n".join([
        "## KV cache", "",
        f"K and V of {config.num_key_value_heads} head(s) x {config.head_dim} dims, cached by producer layers only, "
        "16-bit:", "",
        "| | producer layers | KV bytes per token |", "| --- | ---: | ---: |",
        f"| every layer its own K/V (the dense original) | {n} | {before:,} |",
        f"| this model | {p} | {after:,} ({after / before:.1%}) |",
    ])


def _calibration_section(calibration: dict[str, Any]) -> str:
    c = calibration
    return "\n".join([
        "## Calibration data", "",
        f"`{c['data']}`: {c['tokens']:,} tokens in sequences of {c['seq_len']}, activations computed in "
        f"{c['compute_dtype']}.",
    ])


def _training_section(t: dict[str, Any]) -> str:
    objective = {"lm": "next-token cross-entropy on the data",
                 "logits": "logit distillation (KL divergence from the teacher's next-token distribution)",
                 "attention": "attention-output distillation (each sharing layer imitates the teacher's)"}
    lines = [
        "## Training", "",
        f"- init: {'`' + t['init'] + '`' if t.get('init') else 'random (trained from scratch)'}",
        f"- objective: `{t['objective']}`, {objective.get(t['objective'], t['objective'])}",
    ]
    if t.get("teacher"):
        offline = f", offline top-{t['teacher_topk']}" if t.get("teacher_topk") else ""
        lines.append(f"- teacher: `{t['teacher']}` (temperature {t['distill_temperature']}{offline})")
    lines += [
        f"- trainable: `{t['trainable']}`",
        f"- data: `{t['data']}`",
        f"- steps: {t['steps']:,} of {t['batch_tokens']:,} tokens ({t['tokens']:,} tokens), sequences of "
        f"{t['seq_len']}, peak lr {t['lr']}, seed {t['seed']}",
    ]
    v = t.get("validation") or {}
    if v.get("val_loss") is not None:
        lines.append(f"- final validation loss: {v['val_loss']:.4f} (perplexity {v['val_ppl']:.2f}) at step "
                     f"{v.get('step')}, on {v.get('val_tokens', 0):,} tokens")
    else:
        lines.append("- final validation loss: not measured")
    return "\n".join(lines)


def _use_section(name: str) -> str:
    return "\n".join([
        "## Use", "",
        "The folder carries its own model code (`auto_map` in config.json), so transformers loads it without "
        "crosslayer installed:", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'path = "{name}"  # this folder, or its Hub repository',
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)",
        "```", "",
        "With crosslayer installed (`pip install crosslayer`) no remote code is needed, and its vLLM plugin "
        "serves the model with the shared K/V cached once:", "",
        "```bash",
        f"vllm serve {name}",
        f"crosslayer generate {name} --prompt \"Hello\"",
        "```",
    ])
