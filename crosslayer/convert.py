"""Pretrained checkpoints -> CLA models: a declarative weight map, and folder-to-folder conversion.

Sources: transformers' LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM (one layout; Qwen2
adds biases to q/k/v) as folders, hub ids or GGUF files, and dense crosslayer models (every layer
its own producer, e.g. an MQA model from `crosslayer train`). Every tensor of the source is used
exactly once (asserted). Per-layer weights (Q, O, MLP, norms) are copied. Each producer's K/V projections (and biases) and KV-input
norm are initialised from its group (the producer and the consumers that will read its K/V):
  mean:  the uniform mean over the group's layers (the paper's better uptraining start);
  first: the producer's own (the group's first layer) weights; the others are dropped.
With cla_factor=1 every layer is its own group and the copy is exact.

`convert(src, out)` writes OUT atomically (a temporary folder beside it, renamed at the
end) with the source's tokenizer files and generation config; on any error nothing is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import MODEL_FIELDS, CLAConfig, load_config
from .errors import CrossLayerError
from .modeling import CLAForCausalLM
from .runtime import copy_tokenizer_files, dtype_by_name, looks_like_path, quiet_transformers, split_model_spec

KV_INITS = ("mean", "first")
SOURCE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "CLAForCausalLM")
# model_type -> class, for configs that do not name their class (those read from GGUF metadata)
ARCHITECTURE_OF = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                   "crosslayer": "CLAForCausalLM"}

# source name -> our name, per layer ({i}; {p} is weight or bias) and global
LAYER_MAP = {
    "model.layers.{i}.self_attn.q_proj.{p}": "model.layers.{i}.self_attn.q_proj.{p}",
    "model.layers.{i}.self_attn.o_proj.{p}": "model.layers.{i}.self_attn.o_proj.{p}",
    "model.layers.{i}.mlp.gate_proj.{p}": "model.layers.{i}.mlp.gate_proj.{p}",
    "model.layers.{i}.mlp.up_proj.{p}": "model.layers.{i}.mlp.up_proj.{p}",
    "model.layers.{i}.mlp.down_proj.{p}": "model.layers.{i}.mlp.down_proj.{p}",
    "model.layers.{i}.input_layernorm.weight": "model.layers.{i}.input_layernorm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}
# source name -> our producer name; merged over each sharing group. A Llama-family layer normalises
# Q and K/V inputs with its one input_layernorm; a crosslayer producer has its own kv_layernorm.
GROUP_MAP = {
    "model.layers.{i}.self_attn.k_proj.{p}": "model.layers.{i}.self_attn.k_proj.{p}",
    "model.layers.{i}.self_attn.v_proj.{p}": "model.layers.{i}.self_attn.v_proj.{p}",
    "model.layers.{i}.input_layernorm.weight": "model.layers.{i}.kv_layernorm.weight",
}
CLA_GROUP_MAP = {**{k: v for k, v in GROUP_MAP.items() if "layernorm" not in k},
                 "model.layers.{i}.kv_layernorm.weight": "model.layers.{i}.kv_layernorm.weight"}
GLOBAL_MAP = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


# ----------------------------------------------------------------------------------------------
# The source: its config first (cheap checks), then its weights


def read_source_config(spec: str | Path, gguf_file: str | None = None) -> dict[str, Any]:
    """The config (as a dict, with `architectures`) of a checkpoint folder, hub id or GGUF file,
    before any weight is read."""
    location, gguf_file = split_model_spec(spec, gguf_file)
    path = Path(location)
    if gguf_file is None and (path.exists() or looks_like_path(location)):
        if not path.is_dir():
            raise CrossLayerError(f"source {path} is not a folder (give a checkpoint folder, a hub id or a .gguf file)")
        if not (path / "config.json").exists():
            raise CrossLayerError(f"{path} has no config.json: not a transformers checkpoint folder")
        try:
            raw = json.loads((path / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CrossLayerError(f"cannot read {path / 'config.json'}: {e}") from None
        if not isinstance(raw, dict):
            raise CrossLayerError(f"{path / 'config.json'} does not hold a JSON object")
        return raw
    from transformers import AutoConfig

    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(location, gguf_file=gguf_file) if gguf_file else \
                AutoConfig.from_pretrained(location)
    except (OSError, ValueError, KeyError) as e:
        raise CrossLayerError(f"cannot read the config of {spec}: {type(e).__name__}: {e}") from None
    raw = config.to_dict()
    if not raw.get("architectures"):  # GGUF metadata names the model type, not the class
        raw["architectures"] = [ARCHITECTURE_OF.get(raw.get("model_type"), raw.get("model_type"))]
    return raw


def _check_architecture(raw: dict[str, Any]) -> None:
    archs = raw.get("architectures") or []
    if any(a not in SOURCE_ARCHITECTURES for a in archs):
        raise CrossLayerError(
            f"cannot convert a {', '.join(map(str, archs))}: supported architectures are {', '.join(SOURCE_ARCHITECTURES)}"
        )


def target_config(raw: dict[str, Any], cla_factor: int = 1, cla_pattern: str = "uniform",
                  kv_sources: list[int] | None = None) -> CLAConfig:
    """The CLA config of a source config (a transformers or crosslayer config dict) with the sharing asked for."""
    _check_architecture(raw)
    raw = dict(raw)
    if raw.get("model_type") == "crosslayer":
        raw = {k: v for k, v in raw.items() if k in MODEL_FIELDS}  # to_dict() adds generic PreTrainedConfig keys
        dense = load_config(raw)
        if dense.num_producer_layers != dense.num_hidden_layers:
            raise CrossLayerError(
                f"the source already shares K/V (kv_sources {dense.kv_sources}); convert from a dense model "
                "(every layer its own producer)"
            )
        for key in ("cla_factor", "cla_pattern", "kv_sources"):
            raw.pop(key, None)
    overrides: dict[str, Any] = dict(cla_factor=cla_factor, cla_pattern=cla_pattern)
    if kv_sources is not None:
        overrides = dict(kv_sources=list(kv_sources), cla_pattern="custom")
    return load_config(raw, **overrides)


def load_source(spec: str | Path, gguf_file: str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """The source model from a folder, hub id or GGUF file (dequantised to `dtype`, default fp32);
    refuses weights transformers would silently make up or drop."""
    from transformers import AutoModelForCausalLM

    location, gguf_file = split_model_spec(spec, gguf_file)
    kwargs: dict[str, Any] = dict(dtype=dtype or "auto", output_loading_info=True,
                                  # report a wrong shape in `info` (refused below) instead of raising
                                  ignore_mismatched_sizes=True)
    if gguf_file:
        kwargs.update(gguf_file=gguf_file, dtype=dtype or torch.float32)
    try:
        with quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:  # no weight files, unreadable or truncated files
        raise CrossLayerError(f"cannot load the weights of {spec}: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        # mismatched entries are (name, shape in the checkpoint, shape config.json implies)
        keys = sorted(k if isinstance(k, str) else f"{k[0]} ({list(k[1])} in the file, {list(k[2])} by config.json)"
                      for k in info.get(kind) or [])
        if keys:
            problems.append(f"{kind.replace('_keys', '')}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
    if problems:
        hint = ""
        if "lm_head.weight" in (info.get("missing_keys") or ()):
            hint = " (config.json says tie_word_embeddings=false but the checkpoint has no lm_head.weight)"
        raise CrossLayerError(f"{spec}: the weight files do not match config.json{hint}; {'; '.join(problems)}")
    return model.eval()


# ----------------------------------------------------------------------------------------------
# The weight map


def from_hf(
    model_or_path: nn.Module | str | Path,
    cla_factor: int = 1,
    cla_pattern: str = "uniform",
    kv_init: str = "mean",
    kv_sources: list[int] | None = None,
    dtype: torch.dtype | None = None,
) -> CLAForCausalLM:
    """A CLAForCausalLM from a Llama / Mistral / Qwen2 / dense crosslayer causal LM (object or folder).

    `dtype`: of the result; None keeps the source's. K/V means are taken in fp32 and rounded once.
    """
    if kv_init not in KV_INITS:
        raise CrossLayerError(f"kv_init must be one of {', '.join(KV_INITS)}; got {kv_init!r}")
    if isinstance(model_or_path, nn.Module):
        source = model_or_path
        raw = {**source.config.to_dict(), "architectures": [type(source).__name__]}
        config = target_config(raw, cla_factor, cla_pattern, kv_sources)
    else:
        raw = read_source_config(model_or_path)
        config = target_config(raw, cla_factor, cla_pattern, kv_sources)  # before the (slow) weights
        source = load_source(model_or_path)
    config._attn_implementation = source.config._attn_implementation or "sdpa"
    group_map = CLA_GROUP_MAP if raw.get("model_type") == "crosslayer" else GROUP_MAP
    state = source.state_dict()
    out_dtype = dtype or next(iter(state.values())).dtype
    if config.tie_word_embeddings and "lm_head.weight" in state:
        if not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
            raise CrossLayerError("the source's config says tie_word_embeddings=true, but its lm_head.weight differs "
                                  "from the embedding: the checkpoint and its config.json disagree")
        state.pop("lm_head.weight")  # tied: one tensor, carried by the embedding

    target: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return state[name]

    def per_param(template: str, i: int) -> list[tuple[str, str]]:
        params = ("weight", "bias") if "{p}" in template else (None,)
        return [(p, template.format(i=i, p=p)) for p in params if template.format(i=i, p=p) in state]

    for src, dst in GLOBAL_MAP.items():
        if src in state:
            target[dst] = take(src).clone()
    for i in range(config.num_hidden_layers):
        for src, dst in LAYER_MAP.items():
            for p, name in per_param(src, i):
                target[dst.format(i=i, p=p)] = take(name).clone()
    for producer in config.producer_layers:
        group = [j for j, s in enumerate(config.kv_sources) if s == producer]  # producer first
        members = group if kv_init == "mean" else [producer]
        for src, dst in group_map.items():
            for p, _ in per_param(src, producer):
                for j in group:  # the dropped ones count as used too: nothing is silently unmapped
                    used.add(src.format(i=j, p=p))
                picked = [state[src.format(i=j, p=p)] for j in members]
                merged = torch.stack([t.float() for t in picked]).mean(0)  # (len(members), *shape) -> shape
                target[dst.format(i=producer, p=p)] = merged.to(out_dtype)

    unused = set(state) - used
    if unused:
        raise CrossLayerError(
            f"{type(source).__name__} has weights this converter does not map: {', '.join(sorted(unused)[:5])}"
            f"{' ...' if len(unused) > 5 else ''}; supported: {', '.join(SOURCE_ARCHITECTURES)}"
        )
    with torch.device("meta"):
        model = CLAForCausalLM(config)
    missing, unexpected = model.load_state_dict(target, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CrossLayerError(f"weight map incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    # rotary tables are buffers, not weights: rebuild them on a real device
    model.model.rotary_emb = type(model.model.rotary_emb)(config)
    model.generation_config = source.generation_config
    return model.to(out_dtype).eval()


# ----------------------------------------------------------------------------------------------
# Folder to folder, atomically


def convert(src: str | Path, out: str | Path, cla_factor: int = 1, cla_pattern: str = "uniform",
            kv_init: str = "mean", dtype: str = "auto", gguf_file: str | None = None,
            kv_sources: list[int] | None = None) -> dict[str, Any]:
    """Convert the checkpoint `src` (folder, hub id or GGUF file) into a new CLA model folder `out`;
    returns a summary.

    `out` must not exist (or be an empty folder): nothing is ever overwritten. The model is built in
    memory first (every check runs before anything is written), then saved to a temporary folder
    beside `out` that is renamed to `out` at the end, or removed on any error. The tokenizer (and its
    chat template) and the generation config come along: a folder's files byte for byte, a GGUF
    file's or hub repository's as transformers reads them.
    """
    out = Path(out)
    out_dtype = None if dtype == "auto" else dtype_by_name(dtype)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CrossLayerError(f"{out} already exists and is not an empty folder; choose a new one (nothing is overwritten)")
    location, gguf_file = split_model_spec(src, gguf_file)
    raw = read_source_config(location, gguf_file)
    before = target_config(raw)  # the source as a dense CLA config: its KV bytes
    target_config(raw, cla_factor, cla_pattern, kv_sources)  # a bad plan fails before the (slow) weights load
    local = Path(location) if gguf_file is None and Path(location).is_dir() else None
    tokenizer = None
    if local is None:  # a GGUF file or a hub repository: transformers builds the tokenizer
        from .runtime import load_tokenizer

        tokenizer = load_tokenizer(location, gguf_file)
    source = load_source(location, gguf_file)
    model = from_hf(source, cla_factor=cla_factor, cla_pattern=cla_pattern, kv_init=kv_init, kv_sources=kv_sources,
                    dtype=out_dtype)
    config = model.config

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; OUT should look like any folder the user makes
        with quiet_transformers():
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        if local is not None:
            copied = copy_tokenizer_files(local, tmp)
            if (local / "generation_config.json").is_file():  # the source's own, byte for byte
                shutil.copyfile(local / "generation_config.json", tmp / "generation_config.json")
        else:
            copied = sorted(p.name for p in tmp.iterdir() if p.name.startswith(("tokenizer", "chat_template",
                                                                                 "special_tokens")))
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace a folder portably
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "source": str(src), "out": str(out), "architecture": (raw.get("architectures") or ["?"])[0],
        "layers": config.num_hidden_layers, "producers": config.producer_layers, "kv_sources": config.kv_sources,
        "kv_init": kv_init, "kv_bytes_before": before.kv_bytes_per_token(), "kv_bytes_after": config.kv_bytes_per_token(),
        "params_before": sum(p.numel() for p in source.parameters()),
        "params_after": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "tokenizer_files": copied,
    }
