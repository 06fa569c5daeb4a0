"""Pretrained Llama-layout checkpoints -> CLA models, as a declarative weight map.

Every tensor of the source is used exactly once (asserted). Per-layer weights (Q, O, MLP, norms)
are copied. Each producer's K/V projections and KV-input norm are initialised from its group
(the producer and the consumers that will read its K/V):
  mean:  the uniform mean over the group's layers (the paper's better uptraining start);
  first: the producer's own (the group's first layer) weights; the others are dropped.
With cla_factor=1 every layer is its own group and the copy is exact.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .config import load_config
from .errors import CrossLayerError
from .modeling import CLAForCausalLM

KV_INITS = ("mean", "first")

# source name -> our name, per layer ({i}) and global
LAYER_MAP = {
    "model.layers.{i}.self_attn.q_proj.{p}": "model.layers.{i}.self_attn.q_proj.{p}",
    "model.layers.{i}.self_attn.o_proj.{p}": "model.layers.{i}.self_attn.o_proj.{p}",
    "model.layers.{i}.mlp.gate_proj.{p}": "model.layers.{i}.mlp.gate_proj.{p}",
    "model.layers.{i}.mlp.up_proj.{p}": "model.layers.{i}.mlp.up_proj.{p}",
    "model.layers.{i}.mlp.down_proj.{p}": "model.layers.{i}.mlp.down_proj.{p}",
    "model.layers.{i}.input_layernorm.weight": "model.layers.{i}.input_layernorm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}
# source name -> our producer name; merged over each sharing group
GROUP_MAP = {
    "model.layers.{i}.self_attn.k_proj.{p}": "model.layers.{i}.self_attn.k_proj.{p}",
    "model.layers.{i}.self_attn.v_proj.{p}": "model.layers.{i}.self_attn.v_proj.{p}",
    "model.layers.{i}.input_layernorm.weight": "model.layers.{i}.kv_layernorm.weight",
}
GLOBAL_MAP = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def _load_source(model_or_path: nn.Module | str | Path) -> nn.Module:
    if isinstance(model_or_path, nn.Module):
        return model_or_path
    from transformers import AutoModelForCausalLM

    path = Path(model_or_path)
    if path.exists() and not (path / "config.json").exists():
        raise CrossLayerError(f"{path} has no config.json: not a transformers checkpoint folder")
    try:
        return AutoModelForCausalLM.from_pretrained(str(model_or_path), dtype="auto")
    except OSError as e:
        raise CrossLayerError(f"cannot load checkpoint {model_or_path}: {e}") from None


def from_hf(
    model_or_path: nn.Module | str | Path,
    cla_factor: int = 1,
    cla_pattern: str = "uniform",
    kv_init: str = "mean",
    kv_sources: list[int] | None = None,
) -> CLAForCausalLM:
    """A CLAForCausalLM built from a transformers Llama-layout causal LM (object or folder/hub id)."""
    if kv_init not in KV_INITS:
        raise CrossLayerError(f"kv_init must be one of {', '.join(KV_INITS)}; got {kv_init!r}")
    source = _load_source(model_or_path)
    src_config = source.config.to_dict()
    overrides = dict(cla_factor=cla_factor, cla_pattern=cla_pattern)
    if kv_sources is not None:
        overrides = dict(kv_sources=list(kv_sources), cla_pattern="custom")
    config = load_config(src_config, **overrides)
    config._attn_implementation = source.config._attn_implementation or "sdpa"
    state = source.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: one tensor, carried by the embedding

    target: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return state[name]

    def per_param(template: str, i: int) -> list[tuple[str, str]]:
        params = ("weight", "bias") if "{p}" in template else (None,)
        out = []
        for p in params:
            name = template.format(i=i, p=p)
            if name in state:
                out.append((p, name))
        return out

    for src, dst in GLOBAL_MAP.items():
        if src in state:
            target[dst] = take(src).clone()
    for i in range(config.num_hidden_layers):
        for src, dst in LAYER_MAP.items():
            for p, name in per_param(src, i):
                target[dst.format(i=i, p=p)] = take(name).clone()
    for producer in config.producer_layers:
        group = [j for j, s in enumerate(config.kv_sources) if s == producer]
        members = group if kv_init == "mean" else [producer]
        for src, dst in GROUP_MAP.items():
            for p, _ in per_param(src, producer):
                names = [src.format(i=j, p=p) for j in group]
                for n in names:  # the dropped ones count as used too: nothing is silently unmapped
                    used.add(n)
                picked = [state[src.format(i=j, p=p)] for j in members]
                merged = picked[0].clone() if len(picked) == 1 else torch.stack([t.float() for t in picked]).mean(0)
                target[dst.format(i=producer, p=p)] = merged.to(picked[0].dtype)

    unused = set(state) - used
    if unused:
        raise CrossLayerError(
            f"{type(source).__name__} has weights this converter does not map: {', '.join(sorted(unused)[:5])}"
            f"{' ...' if len(unused) > 5 else ''}; supported layouts: Llama"
        )
    dtype = next(iter(state.values())).dtype
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
    return model.to(dtype).eval()
