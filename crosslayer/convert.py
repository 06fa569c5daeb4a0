"""Pretrained checkpoints -> CLA models: an exact weight map, K/V initialisation per sharing group, and
folder-to-folder conversion.

Sources: transformers' LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM (one layout; Qwen2
adds biases to q/k/v) as folders, hub ids or GGUF files (dequantised), and dense crosslayer models
(every layer its own producer, e.g. an MQA model from `crosslayer train`).

Conversion is two steps. `dense_copy` maps every source tensor, each exactly once (asserted), into a
dense CLA model with equal logits. `share_kv` then applies a sharing plan (`kv_sources`): every
layer keeps its Q, O, MLP and norms; each producer's K/V projections and KV-input norm are
initialised from its group (the producer and the consumers that will read its K/V) by one of
KV_INITS (fit, mean, mean-folded, first; see `share_kv`; `fit` reads crosslayer.calibration's
activations). With cla_factor=1 the copy is exact.

`convert(src, out)` resolves the plan, builds the model, and writes OUT atomically (a temporary folder
beside it, renamed at the end) with the source's tokenizer files, chat template and generation config,
the plan as `plan.json` (`read_plan` reads it back) and a model card `README.md` with the front matter the
Hub reads (`crosslayer.model_card`). Killed at any moment, OUT is absent or complete; on any error
(a full disk too: one line) nothing is left behind. Plans are
given (`cla_factor` / `cla_pattern`, `kv_sources`, a plan file) or searched on calibration data (a
`PlanSearch` such as crosslayer.plan.Searcher).
"""

from __future__ import annotations

import contextlib
import copy
import glob
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForCausalLM

from .calibration import CALIBRATION_SEQ_LEN, CALIBRATION_TOKENS, Calibration, read_calibration, resolve_compute_dtype
from .config import MODEL_FIELDS, CLAConfig, describe, kv_groups, load_config, validate_kv_sources
from .device import dtype_by_name, dtype_name, pick_device
from .errors import CrossLayerError
from .loading import copy_tokenizer_files, load_tokenizer, quiet_transformers, read_source_config, split_model_spec
from .model_card import write_model_card
from .modeling import CLAForCausalLM
from .weights import (
    DEFAULT_SHARD_BYTES,
    GGUFWeights,
    SafetensorsWriter,
    SourceWeights,
    TensorInfo,
    config_object,
    open_weights,
)

log = logging.getLogger(__name__)

KV_INITS = ("fit", "mean", "mean-folded", "first")
SOURCE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "CLAForCausalLM")

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
# the K/V map of each layer. A Llama-family layer normalises Q and K/V inputs with its one
# input_layernorm; a crosslayer producer has its own kv_layernorm.
KV_MAP = {
    "model.layers.{i}.self_attn.k_proj.{p}": "model.layers.{i}.self_attn.k_proj.{p}",
    "model.layers.{i}.self_attn.v_proj.{p}": "model.layers.{i}.self_attn.v_proj.{p}",
    "model.layers.{i}.input_layernorm.weight": "model.layers.{i}.kv_layernorm.weight",
}
CLA_KV_MAP = {**{k: v for k, v in KV_MAP.items() if "layernorm" not in k},
              "model.layers.{i}.kv_layernorm.weight": "model.layers.{i}.kv_layernorm.weight"}
GLOBAL_MAP = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


# ----------------------------------------------------------------------------------------------
# The source: its config first (cheap checks), then its weights




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
    location, gguf_file = split_model_spec(spec, gguf_file)
    kwargs: dict[str, Any] = dict(dtype=dtype or "auto", output_loading_info=True,
                                  # report a wrong shape in `info` (refused below) instead of raising
                                  ignore_mismatched_sizes=True)
    if gguf_file:
        kwargs.update(gguf_file=gguf_file, dtype=dtype or torch.float32)
    try:
        with quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # no weight files, unreadable or corrupt files
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
# The weight map: the source as a dense CLA model, exactly


def from_hf(
    model_or_path: nn.Module | str | Path,
    cla_factor: int = 1,
    cla_pattern: str = "uniform",
    kv_init: str = "mean",
    kv_sources: list[int] | None = None,
    dtype: torch.dtype | None = None,
    calibration: torch.Tensor | None = None,
) -> CLAForCausalLM:
    """A CLAForCausalLM from a Llama / Mistral / Qwen2 / dense crosslayer causal LM (object, folder, hub id
    or GGUF file).

    The source is first copied exactly into a dense CLA model (every layer its own producer), then each
    sharing group's K/V is initialised by `kv_init` (see `share_kv`); `fit` needs `calibration`, a
    (B, T) tensor of token ids. `dtype`: of the result; None keeps the source's. K/V initialisations
    are computed in fp32 and rounded once.
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
    if kv_init == "fit" and config.num_producer_layers < config.num_hidden_layers and calibration is None:
        raise CrossLayerError("kv_init 'fit' needs calibration tokens (a (B, T) tensor of token ids)")
    out_dtype = dtype or next(source.parameters()).dtype
    dense = dense_copy(source, raw)
    if config.num_producer_layers == config.num_hidden_layers:
        return dense.to(out_dtype).eval()
    return share_kv(dense, config, kv_init, calibration).to(out_dtype).eval()


def dense_copy(source: nn.Module, raw: dict[str, Any] | None = None) -> CLAForCausalLM:
    """The source model as a dense CLA model (every layer its own producer) with equal logits; every
    source tensor is used, each exactly once (a Llama-family layer's one input norm becomes both
    the query-input and the KV-input norm)."""
    raw = raw or {**source.config.to_dict(), "architectures": [type(source).__name__]}
    config = target_config(raw)
    config._attn_implementation = source.config._attn_implementation or "sdpa"
    kv_map = CLA_KV_MAP if raw.get("model_type") == "crosslayer" else KV_MAP
    state = source.state_dict()
    if config.tie_word_embeddings and "lm_head.weight" in state:
        _check_tied(state.pop("lm_head.weight"), state["model.embed_tokens.weight"])  # tied: the embedding carries it

    names = dense_names(config, set(state), kv_map, type(source).__name__)
    target = {dst: state[src].clone() for dst, src in names.items()}
    model = _assemble(config, target)
    model.generation_config = copy.deepcopy(source.generation_config)
    return model


def _check_tied(lm_head: torch.Tensor, embedding: torch.Tensor) -> None:
    if not torch.equal(lm_head, embedding):
        raise CrossLayerError("the source's config says tie_word_embeddings=true, but its lm_head.weight differs "
                              "from the embedding: the checkpoint and its config.json disagree")


class LazySource:
    """A checkpoint as the tensors of its dense CLA model (`dense_copy`'s), each read from the files when asked
    for (crosslayer.weights), in the dtype `from_pretrained(dtype="auto")` would give it (`dtype`: the
    config's, else the files'; fp32 for GGUF). Nothing is held."""

    def __init__(self, weights: SourceWeights, raw: dict[str, Any], gguf: bool = False) -> None:
        self.weights = weights
        self.config = target_config(raw)
        self.config._attn_implementation = "sdpa"
        names = set(weights.info)
        if self.config.tie_word_embeddings and "lm_head.weight" in names:
            _check_tied(weights.read("lm_head.weight"), weights.read("model.embed_tokens.weight"))
            names.discard("lm_head.weight")
        kv_map = CLA_KV_MAP if raw.get("model_type") == "crosslayer" else KV_MAP
        self.names = dense_names(self.config, names, kv_map, (raw.get("architectures") or ["the source"])[0])
        if self.config.tie_word_embeddings:  # one tensor, two names
            self.names["lm_head.weight"] = self.names["model.embed_tokens.weight"]
        self.dtype = torch.float32 if gguf else _checkpoint_dtype(raw, weights)
        self._buffer: torch.Tensor | None = None  # one decoder layer's tensors (`load`)

    def read(self, name: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """The dense model's tensor `name`, in `dtype` (default: the source's) on `device`."""
        tensor = self.weights.read(self.names[name]).to(self.dtype)
        return tensor.to(device=device, dtype=dtype or self.dtype)

    def kv_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """Layer `layer`'s K/V map in fp32 (as `_kv_tensors` of the dense model)."""
        names = ["k_proj.weight", "v_proj.weight", "kv_layernorm.weight"]
        if f"model.layers.{layer}.self_attn.k_proj.bias" in self.names:
            names += ["k_proj.bias", "v_proj.bias"]
        return {n: self.read(kv_name(layer, n)).float() for n in names}

    def load(self, prefix: str, module: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        """Give `module` (the dense model's submodule `prefix`, or a plan's built from it) the tensors it lacks
        (those on the meta device), in `dtype` on `device`.

        A decoder layer's tensors on a CPU are read into one buffer that every layer loaded after reuses
        (`model.layers.*` are loaded one at a time, each dropped before the next: Calibration's `load`): not
        allocated and faulted in afresh for every layer of every plan a search runs, and not freed into a
        heap that keeps the pages between the activations held."""
        start = f"{prefix}." if prefix else ""
        missing = {name: t for name, t in module.state_dict().items() if t.is_meta and start + name in self.names}
        if prefix.startswith("model.layers.") and torch.device(device).type == "cpu":
            state = self._into_buffer(start, missing, dtype)
        else:
            state = {name: self.read(start + name, dtype, device) for name in missing}
        module.load_state_dict(state, strict=False, assign=True)

    def _into_buffer(self, start: str, missing: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        sizes = {name: -(-math.prod(t.shape) * dtype.itemsize // 64) * 64 for name, t in missing.items()}  # 64-aligned
        if self._buffer is None or self._buffer.numel() < sum(sizes.values()):
            self._buffer = None  # the old one freed before the new one is made
            self._buffer = torch.empty(sum(sizes.values()), dtype=torch.uint8)
        state, offset = {}, 0
        for name, t in missing.items():
            view = self._buffer[offset : offset + math.prod(t.shape) * dtype.itemsize].view(dtype).view(t.shape)
            source = self.names[start + name]
            if self.weights.info[source].dtype == self.dtype == dtype:
                self.weights.read(source, out=view)  # straight from the file into place
            else:
                view.copy_(self.read(start + name, dtype))
            state[name] = view
            offset += sizes[name]
        return state

    def model(self, dtype: torch.dtype, device: torch.device, resident: bool = True) -> CLAForCausalLM:
        """The dense model in `dtype` on `device`; with `resident` False, a skeleton on the meta device (for
        Calibration's `load`, one layer at a time)."""
        with torch.device("meta"):
            model = CLAForCausalLM(self.config).to(dtype)
        if resident:
            self.load("", model, dtype, device)
            if self.config.tie_word_embeddings:
                model.tie_weights()
            model.model.rotary_emb = type(model.model.rotary_emb)(self.config).to(device)
        return model.eval()

    @property
    def num_params(self) -> int:
        return sum(math.prod(self.weights.info[src].shape) for src in set(self.names.values()))


def _checkpoint_dtype(raw: dict[str, Any], weights: SourceWeights) -> torch.dtype:
    """The dtype transformers loads a checkpoint in with dtype="auto": its config's, else its first floating
    tensor's."""
    named = raw.get("dtype") or raw.get("torch_dtype")
    if isinstance(named, str) and isinstance(getattr(torch, named.removeprefix("torch."), None), torch.dtype):
        return getattr(torch, named.removeprefix("torch."))
    return next((i.dtype for i in weights.info.values() if i.dtype.is_floating_point), torch.float32)


def kv_name(layer: int, name: str) -> str:
    """The full tensor name of a K/V map entry (`k_proj.weight`, `kv_layernorm.weight`, ...) of `layer`."""
    return f"model.layers.{layer}.{'' if name.startswith('kv_layernorm') else 'self_attn.'}{name}"


def dense_names(config: CLAConfig, names: set[str], kv_map: dict[str, str], what: str) -> dict[str, str]:
    """Dense CLA tensor name -> source tensor name, for a source holding tensors `names` (a tied lm_head left
    out); refuses a source with tensors this map does not use."""
    target: dict[str, str] = {}
    for src, dst in GLOBAL_MAP.items():
        if src in names:
            target[dst] = src
    for i in range(config.num_hidden_layers):
        for template_map in (LAYER_MAP, kv_map):
            for src, dst in template_map.items():
                for p in (("weight", "bias") if "{p}" in src else (None,)):
                    if src.format(i=i, p=p) in names:
                        target[dst.format(i=i, p=p)] = src.format(i=i, p=p)
    unused = names - set(target.values())
    if unused:
        raise CrossLayerError(
            f"{what} has weights this converter does not map: {', '.join(sorted(unused)[:5])}"
            f"{' ...' if len(unused) > 5 else ''}; supported: {', '.join(SOURCE_ARCHITECTURES)}"
        )
    return target


def _assemble(config: CLAConfig, state: dict[str, torch.Tensor]) -> CLAForCausalLM:
    """A CLAForCausalLM holding exactly `state` (tensors assigned, not copied)."""
    with torch.device("meta"):
        model = CLAForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CrossLayerError(f"weight map incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    # rotary tables are buffers, not weights: rebuild them on a real device
    model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Sharing: each group's K/V initialised from its layers


def read_plan(path: str | Path, num_layers: int | None = None) -> list[int]:
    """The kv_sources of a plan file: a plan.json written by `crosslayer convert` (its `kv_sources`) or
    a JSON list."""
    path = Path(path)
    if not path.is_file():
        raise CrossLayerError(f"plan file not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CrossLayerError(f"plan file {path} is not JSON: {e}") from None
    sources = raw.get("kv_sources") if isinstance(raw, dict) else raw
    if sources is None:
        raise CrossLayerError(f"plan file {path} has no kv_sources (give a plan.json or a JSON list of layer indices)")
    if num_layers is not None:
        try:
            validate_kv_sources(sources, num_layers)
        except CrossLayerError as e:
            raise CrossLayerError(f"plan file {path}: {e}") from None
    return list(sources)


def sharing_config(dense_config: CLAConfig, kv_sources: list[int]) -> CLAConfig:
    """The config of `dense_config`'s model with the sharing plan `kv_sources`."""
    fields = {k: v for k, v in dense_config.to_dict().items() if k in MODEL_FIELDS}
    fields.update(kv_sources=list(kv_sources), cla_factor=1, cla_pattern="custom")
    config = load_config(fields)
    config._attn_implementation = dense_config._attn_implementation
    return config


def _kv_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """A dense layer's K/V map: its projections (and biases) and KV-input norm scale, in fp32."""
    attn = layer.self_attn
    out = {"k_proj.weight": attn.k_proj.weight, "v_proj.weight": attn.v_proj.weight,
           "kv_layernorm.weight": layer.kv_layernorm.weight}
    if attn.k_proj.bias is not None:
        out.update({"k_proj.bias": attn.k_proj.bias, "v_proj.bias": attn.v_proj.bias})
    return {k: v.detach().float() for k, v in out.items()}


def pooled_kv(layers: list[dict[str, torch.Tensor]], kv_init: str) -> dict[str, torch.Tensor]:
    """The K/V map of a producer whose group's members have the K/V maps `layers` (the producer's first; fp32,
    as `_kv_tensors` gives them), by a calibration-free init.

    Layer j maps its input h to K_j = W_k^j diag(g_j) rms(h)^-1 h (+ b_k^j), likewise V, where g_j
    is its KV-input norm scale. first: the producer's own map. mean: W, b and g each averaged over
    the group (the paper's mean pooling of parameters; not the mean of the maps when the g_j differ).
    mean-folded: the mean of the maps, W = mean_j W^j diag(g_j), b = mean_j b^j, g = 1.
    """
    if kv_init == "first":
        return layers[0]
    if kv_init == "mean":
        return {name: torch.stack([t[name] for t in layers]).mean(0) for name in layers[0]}  # (n, *shape) -> shape
    if kv_init == "mean-folded":
        out = {name: torch.stack([t[name] for t in layers]).mean(0) for name in layers[0] if "bias" in name}
        for proj in ("k_proj", "v_proj"):
            folded = [t[f"{proj}.weight"] * t["kv_layernorm.weight"] for t in layers]  # W diag(g): scale columns
            out[f"{proj}.weight"] = torch.stack(folded).mean(0)
        out["kv_layernorm.weight"] = torch.ones_like(layers[0]["kv_layernorm.weight"])
        return out
    raise CrossLayerError(f"kv_init {kv_init!r} needs calibration data; calibration-free inits: mean, mean-folded, first")


def with_kv(dense: CLAForCausalLM, config: CLAConfig, kv: dict[int, dict[str, torch.Tensor]]) -> CLAForCausalLM:
    """The model of the sharing plan `config` whose producers' K/V maps are `kv` (producer -> tensors).

    Every other tensor is `dense`'s own (shared, not copied): the result is cheap to build, and
    changing it changes `dense`.
    """
    state = {name: t for name, t in dense.state_dict().items()
             if not any(part in name for part in (".k_proj.", ".v_proj.", ".kv_layernorm."))}
    dtype = dense.model.embed_tokens.weight.dtype
    config._attn_implementation = dense.config._attn_implementation  # the source's attention kernel
    for producer, tensors in kv.items():
        for name, tensor in tensors.items():
            state[kv_name(producer, name)] = tensor.to(dtype)
    model = _assemble(config, state)
    model.generation_config = copy.deepcopy(dense.generation_config)
    return model


def share_kv(dense: CLAForCausalLM, config: CLAConfig, kv_init: str = "mean",
             calibration: torch.Tensor | Calibration | None = None, batch_size: int = 4) -> CLAForCausalLM:
    """The dense CLA model `dense` turned into the sharing plan `config`, each producer's K/V map
    initialised from its group by `kv_init`:

      fit:          least squares on calibration tokens (the original model's activations): the
                    producer's map, applied to its own input, reproduces each group member's K and V,
                    key errors weighted by what that member's queries see of them (rotary offsets
                    averaged), value errors by what its o_proj passes on (Calibration.fit); a group
                    of one keeps its own map;
      mean:         the group's projections, biases and norm scales each averaged (the paper's mean pooling);
      mean-folded:  the mean of the group's maps W diag(g) (the KV-input norm becomes 1);
      first:        the producer's own map (the paper's "drop": the other layers' K/V are discarded).

    `calibration`, needed by `fit`: (B, T) token ids (read in chunks of `batch_size`), or `dense`'s
    Calibration on them, computed once for many plans. Every tensor but the producers' K/V maps is
    shared with `dense`.
    """
    if kv_init not in KV_INITS:
        raise CrossLayerError(f"kv_init must be one of {', '.join(KV_INITS)}; got {kv_init!r}")
    if dense.config.num_producer_layers != dense.config.num_hidden_layers:
        raise CrossLayerError(f"share_kv needs a dense model (every layer its own producer); this one has kv_sources "
                              f"{dense.config.kv_sources}")
    groups = kv_groups(config.kv_sources)
    if kv_init != "fit":
        return with_kv(dense, config, {p: pooled_kv([_kv_tensors(dense.model.layers[j]) for j in members], kv_init)
                                       for p, members in groups.items()})
    if calibration is None:
        raise CrossLayerError("kv_init 'fit' needs calibration tokens (a (B, T) tensor of token ids)")
    if not isinstance(calibration, Calibration):
        calibration = Calibration(dense, calibration, batch_size=batch_size)
    elif calibration.dense is not dense and calibration.model is not dense:
        raise CrossLayerError("share_kv: the Calibration given was computed on another model; give its dense model")
    kv = {p: calibration.fit(members) if len(members) > 1 else _kv_tensors(dense.model.layers[p])
          for p, members in groups.items()}
    return with_kv(dense, config, kv)


# ----------------------------------------------------------------------------------------------
# Folder to folder, atomically


class PlanSearch(Protocol):
    """What `convert` needs of a plan search (crosslayer.plan.Searcher): a check of its settings against
    the model's layer count before any weight is read, and the search itself on the calibration
    activations, returning at least `kv_sources`."""

    def check(self, num_layers: int) -> int: ...

    def __call__(self, calibration: Calibration) -> dict[str, Any]: ...


def convert(src: str | Path, out: str | Path, cla_factor: int | None = None, cla_pattern: str = "uniform",
            kv_init: str = "mean", dtype: str = "auto", gguf_file: str | None = None,
            kv_sources: list[int] | None = None, plan: str | Path | None = None, search: PlanSearch | None = None,
            calibration: str | None = None, calibration_tokens: int | None = None,
            calibration_seq_len: int | None = None, compute_dtype: str = "auto", device: str = "auto",
            max_shard_bytes: int = DEFAULT_SHARD_BYTES, activations: str | Path | None = "auto",
            progress: bool = False) -> dict[str, Any]:
    """Convert the checkpoint `src` (folder, hub id or GGUF file) into a new CLA model folder `out`; returns a summary.

    The plan: `cla_factor` (with `cla_pattern`; 1, the default, is an exact copy), `kv_sources`, `plan` (a
    plan.json or a JSON list), or `search` (e.g. `crosslayer.plan.Searcher(producers=15)`). `calibration` (text
    files or a glob, or a folder `crosslayer prepare` made with this tokenizer) is read for kv_init fit and a
    search: `calibration_tokens` in sequences of `calibration_seq_len`, run on `device` in `compute_dtype`
    (calibration.resolve_compute_dtype); `activations`: where a CPU keeps them (None: memory; a folder: there,
    memory-mapped; auto: a temporary folder beside `out` if they would fill a quarter of the memory available).

    It streams: the source's tensors are read one at a time (crosslayer.weights), OUT's written one at a time
    (safetensors shards of at most `max_shard_bytes`, in `dtype`). Held at once: a tensor or two; with fit or a
    search, one layer in the compute dtype and the activations (a search on a GPU or of a GGUF file: the model). The
    result equals `from_hf`'s model saved with save_pretrained, byte for byte. `out` must not exist (or be
    empty); every check runs before anything is written, into a temporary folder beside `out` renamed to it
    at the end (removed on any error). The tokenizer, chat template and generation config come along (a
    folder's files byte for byte); `plan.json` records the plan, how it was chosen, and the search's steps.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CrossLayerError(f"{out} already exists and is not an empty folder; choose a new one (nothing is overwritten)")
    out_dtype = None if dtype == "auto" else dtype_by_name(dtype)
    if kv_init not in KV_INITS:
        raise CrossLayerError(f"kv_init must be one of {', '.join(KV_INITS)}; got {kv_init!r}")
    location, gguf_file = split_model_spec(src, gguf_file)
    raw = read_source_config(location, gguf_file)
    before = target_config(raw)  # the source as a dense CLA config: its KV bytes
    n = before.num_hidden_layers

    # 1. the plan: every check that needs no weights runs now
    config = _resolve_plan(raw, n, cla_factor, cla_pattern, kv_sources, plan, search)
    needs_data = _needs_calibration(config, search, kv_init, calibration, calibration_tokens, calibration_seq_len)
    compute_device = pick_device(device)
    work_dtype = resolve_compute_dtype(compute_dtype, compute_device)  # checked before any weight is read
    local = Path(location) if gguf_file is None and Path(location).is_dir() else None
    tokenizer = None
    if local is None or needs_data:  # a GGUF file or a hub repository: transformers builds the tokenizer
        tokenizer = load_tokenizer(location, gguf_file)
    seq_len = min(calibration_seq_len or CALIBRATION_SEQ_LEN, before.max_position_embeddings)
    tokens = read_calibration(calibration, tokenizer, calibration_tokens or CALIBRATION_TOKENS, seq_len) \
        if needs_data else None

    # 2. the source, opened (its tensors read when used), and each producer's K/V map (a search chooses the plan)
    source = _open_source(location, gguf_file, raw)
    with _activations_folder(out, activations, tokens, before, work_dtype, compute_device) as offload:
        config, kv_of, search_result = _kv_maps(source, raw, config, search, kv_init, tokens, work_dtype,
                                                compute_device, offload, progress)
        out_dtype = out_dtype or source.dtype
        record = {
            "kv_sources": config.kv_sources, "plan": describe(config.kv_sources), "layers": n,
            "producers": config.num_producer_layers, "kv_bytes_per_token": config.kv_bytes_per_token(),
            "kv_fraction": config.kv_bytes_per_token() / before.kv_bytes_per_token(),
            "chosen_by": _chosen_by(config, search, plan), "source": str(src),
            "kv_init": kv_init if search is not None or config.num_producer_layers < n else "copy",
            "calibration": None if tokens is None else {
                "data": calibration, "tokens": tokens.numel(), "seq_len": tokens.shape[1],
                "compute_dtype": dtype_name(work_dtype), "device": str(compute_device),
                "activations": "memory" if offload is None else "disk"},
            "search": None if search_result is None else {k: v for k, v in search_result.items() if k != "kv_sources"},
        }

        # 3. the folder, atomically, one tensor at a time
        writer = _OutputModel(source, config, kv_of, out_dtype, _generation_config(location, gguf_file, raw),
                              max_shard_bytes)
        copied = _write_atomically(out, writer, local, tokenizer, record)
    return {
        "source": str(src), "out": str(out), "architecture": (raw.get("architectures") or ["?"])[0],
        "layers": n, "producers": config.producer_layers, "kv_sources": config.kv_sources,
        "plan": record["plan"], "chosen_by": record["chosen_by"], "kv_init": record["kv_init"],
        "kv_bytes_before": before.kv_bytes_per_token(), "kv_bytes_after": config.kv_bytes_per_token(),
        "params_before": source.num_params, "params_after": writer.num_params,
        "dtype": str(out_dtype).removeprefix("torch."), "weight_files": writer.files,
        "tokenizer_files": copied, "calibration": record["calibration"], "search": search_result,
    }


@contextlib.contextmanager
def _activations_folder(out: Path, setting: str | Path | None, tokens: torch.Tensor | None, config: CLAConfig,
                        dtype: torch.dtype, device: torch.device):
    """The folder calibration activations are kept in (None: memory): `setting` itself, or with auto a
    temporary one beside `out` (`.OUT.PID@HOST.*.activations.partial`, removed at the end, or by the next
    conversion to `out` if this one is killed) when they would fill more than a quarter of the memory
    available; on a GPU, none."""
    if tokens is None or setting is None or device.type != "cpu":
        yield None
        return
    if setting != "auto":
        folder = Path(setting)
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    per_token = ((config.num_hidden_layers + 1) * config.hidden_size
                 + 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim)
    if tokens.numel() * per_token * dtype.itemsize <= _available_memory() / 4:
        yield None
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}@{socket.gethostname()}.",
                                   suffix=".activations.partial", dir=out.parent))
    log.info("calibration activations (%.1f GB) kept on disk in %s", tokens.numel() * per_token * dtype.itemsize / 1e9,
             folder)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _available_memory() -> int:
    """MemAvailable of /proc/meminfo in bytes (elsewhere: as if unlimited)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _open_source(location: str, gguf_file: str | None, raw: dict[str, Any]) -> LazySource:
    try:
        weights = open_weights(location, gguf_file, raw)
    except CrossLayerError as e:  # no weight files, or not what they claim to be
        raise CrossLayerError(f"cannot load the weights of {location}: {e}") from None
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # unreadable files
        raise CrossLayerError(f"cannot load the weights of {location}: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    source = LazySource(weights, raw, gguf=gguf_file is not None)
    shapes = _dense_shapes(source.config)
    found = {dst: weights.info[src].shape for dst, src in source.names.items()}
    wrong = [f"{dst} ({list(found[dst])} in the file, {list(shape)} by config.json)"
             for dst, shape in shapes.items() if dst in found and found[dst] != shape]
    missing = [dst for dst in shapes if dst not in found]
    if wrong or missing:
        problems = [f"{what}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                    for what, names in (("missing", missing), ("mismatched", wrong)) if names]
        hint = (" (config.json says tie_word_embeddings=false but the checkpoint has no lm_head.weight)"
                if "lm_head.weight" in missing else "")
        raise CrossLayerError(f"{location}: the weight files do not match config.json{hint}; {'; '.join(problems)}")
    return source


def _dense_shapes(config: CLAConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the dense model of `config` (a tied lm_head left out)."""
    with torch.device("meta"):
        state = CLAForCausalLM(config).state_dict()
    return {k: tuple(v.shape) for k, v in state.items() if not (config.tie_word_embeddings and k == "lm_head.weight")}


def _kv_maps(source: LazySource, raw: dict[str, Any], config: CLAConfig | None, search: PlanSearch | None,
             kv_init: str, tokens: torch.Tensor | None, compute_dtype: torch.dtype, device: torch.device,
             offload: Path | None, progress: bool
             ) -> tuple[CLAConfig, Callable[[int], dict[str, torch.Tensor]], dict[str, Any] | None]:
    """(the plan's config, producer -> its K/V map in fp32 (computed when asked for, so one at a time is held),
    the search's result or None). Calibration activations (on the `tokens`) are computed in `compute_dtype` on
    `device`, one layer at a time (a search on a GPU or of a GGUF file: the whole model resident)."""
    activations, result = None, None
    if tokens is not None:
        # a fit reads each layer once; a search runs the model once per plan: held on a GPU (the whole search
        # runs there) or for a GGUF file (re-reading means dequantising again), else read from the files each run
        resident = search is not None and (device.type != "cpu" or isinstance(source.weights, GGUFWeights))
        model = source.model(compute_dtype, device, resident=resident)
        load = None if resident else lambda name, module: source.load(name, module, compute_dtype, device)
        activations = Calibration(model, tokens, progress=progress, compute_dtype=compute_dtype, load=load,
                                  device=device, offload=offload)
    if search is not None:
        result = search(activations)
        config = target_config(raw, kv_sources=result["kv_sources"])
    groups = kv_groups(config.kv_sources)

    def kv_of(producer: int) -> dict[str, torch.Tensor]:
        members = groups[producer]
        if kv_init == "fit" and len(members) > 1:
            return {k: v.cpu() for k, v in activations.fit(members, keep=False).items()}
        return pooled_kv([source.kv_tensors(j) for j in members], "first" if kv_init == "fit" else kv_init)
    return config, kv_of, result


def _generation_config(location: str, gguf_file: str | None, raw: dict[str, Any]):
    """The generation config transformers gives the source model: its generation_config.json, else one made
    from its config `raw` (a GGUF file's)."""
    from transformers import GenerationConfig

    if gguf_file is None:
        try:
            with quiet_transformers():
                return GenerationConfig.from_pretrained(location)
        except OSError:
            pass
    with quiet_transformers():
        return GenerationConfig.from_model_config(config_object(raw))


class _OutputModel:
    """The converted model as OUT will hold it, written one tensor at a time: the source's tensors (read when
    written) with each producer's K/V map `kv_of(producer)` (made when its layer is written), in `dtype` (a
    K/V map rounded to the source's dtype first, as `with_kv` does)."""

    def __init__(self, source: LazySource, config: CLAConfig, kv_of: Callable[[int], dict[str, torch.Tensor]],
                 dtype: torch.dtype, generation_config, max_shard_bytes: int) -> None:
        self.source, self.config, self.dtype, self.max_shard_bytes = source, config, dtype, max_shard_bytes
        self.kv_of = kv_of
        with torch.device("meta"):
            self.skeleton = CLAForCausalLM(config).to(dtype)  # what save_pretrained writes besides the weights
        self.skeleton.generation_config = generation_config
        self.layout = {name: TensorInfo(shape, dtype) for name, shape in _dense_shapes(config).items()}
        self.num_params = sum(math.prod(info.shape) for info in self.layout.values())
        self.files: list[str] = []

    def save(self, folder: Path) -> None:
        with quiet_transformers():
            self.skeleton.save_pretrained(folder, state_dict={})  # config, generation config, remote code
        writer = SafetensorsWriter(folder, self.layout, self.max_shard_bytes)
        producers = set(self.config.producer_layers) if self.config.num_producer_layers < self.config.num_hidden_layers \
            else set()  # an exact copy keeps every layer's own K/V
        kv, held = {}, None
        try:
            for name in self.layout:  # layer by layer: a producer's K/V map is made when its layer comes
                layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
                if layer in producers and layer != held:
                    kv = {kv_name(layer, n): t for n, t in self.kv_of(layer).items()}
                    held = layer
                tensor = kv[name].to(self.source.dtype) if name in kv else self.source.read(name)
                writer.write(name, tensor.to(self.dtype))
            self.files = writer.close()
        finally:
            writer.abort()


def _resolve_plan(raw: dict[str, Any], num_layers: int, cla_factor: int | None, cla_pattern: str,
                  kv_sources: list[int] | None, plan: str | Path | None, search: PlanSearch | None) -> CLAConfig | None:
    """The target config of the plan asked for (given one way only), before any weight is read; None when
    `search` is to choose the plan (its settings checked against the source's `num_layers` now)."""
    given = [name for name, value in (("cla_factor", cla_factor), ("kv_sources", kv_sources), ("plan", plan),
                                      ("search", search)) if value is not None]
    if len(given) > 1:
        raise CrossLayerError(f"give the sharing plan one way (cla_factor, kv_sources, a plan file, or a search); "
                              f"got {' and '.join(given)}")
    if search is not None:
        search.check(num_layers)
        return None
    if plan is not None:
        kv_sources = read_plan(plan, num_layers)
    return target_config(raw, cla_factor or 1, cla_pattern, kv_sources)


def _needs_calibration(config: CLAConfig | None, search: PlanSearch | None, kv_init: str, calibration: str | None,
                       calibration_tokens: int | None, calibration_seq_len: int | None) -> bool:
    """Whether the conversion reads calibration text (a search, or kv_init fit of a plan that shares K/V);
    refuses calibration settings it would not use, and a missing calibration it needs."""
    searching = search is not None
    needs_data = searching or (kv_init == "fit" and config.num_producer_layers < config.num_hidden_layers)
    if needs_data and calibration is None:
        raise CrossLayerError(
            f"{'plan search' if searching else 'kv_init fit'} measures on calibration text: give calibration (a text "
            "file or glob like the text the model will see, or a folder made by `crosslayer prepare` with its "
            "tokenizer), or kv_init mean for a calibration-free initialisation")
    if not needs_data and (calibration is not None or calibration_tokens is not None or calibration_seq_len is not None):
        raise CrossLayerError("calibration is read only by kv_init fit and plan search; this conversion would not "
                              "use it")
    return needs_data


def _chosen_by(config: CLAConfig, search: PlanSearch | None, plan: str | Path | None) -> str:
    """How the plan of `config` was chosen, for plan.json."""
    if config.cla_pattern != "custom":
        return f"cla_factor {config.cla_factor}, {config.cla_pattern}"
    return "search" if search is not None else f"plan file {plan}" if plan is not None else "kv_sources"


def _write_atomically(out: Path, model: _OutputModel, local: Path | None, tokenizer: Any,
                      record: dict[str, Any]) -> list[str]:
    """`model` (its weights, config, generation config, remote code), the tokenizer files (a `local` source
    folder's byte for byte, else `tokenizer` saved), `record` as plan.json and a model card (README.md), written to a
    temporary folder beside `out` that is renamed to `out` at the end, or removed on any error. Returns
    the tokenizer files written.

    A kill at any moment leaves `out` absent or complete: the staging folder `.OUT.PID@HOST.*.partial` is
    in `out`'s parent (one filesystem, so the rename is atomic), and the next conversion to `out` removes
    those of processes that no longer run. A full disk or an unwritable folder is one CrossLayerError."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}@{socket.gethostname()}.", suffix=".partial",
                                    dir=out.parent))
    except OSError as e:
        raise CrossLayerError(f"cannot write {out}: {_write_error(e)}") from None
    try:
        model.save(tmp)
        if local is None:
            with quiet_transformers():
                tokenizer.save_pretrained(tmp)
        if local is not None:
            copied = copy_tokenizer_files(local, tmp)
            if (local / "generation_config.json").is_file():  # the source's own, byte for byte
                shutil.copyfile(local / "generation_config.json", tmp / "generation_config.json")
        else:
            copied = sorted(p.name for p in tmp.iterdir() if p.name.startswith(("tokenizer", "chat_template",
                                                                                 "special_tokens")))
        (tmp / "plan.json").write_text(json.dumps(record, indent=2) + "\n")
        write_model_card(tmp, model.config, out.resolve().name, plan=record)
        umask = os.umask(0)
        os.umask(umask)
        for path in [tmp, *tmp.iterdir()]:  # mkdtemp and some writers make private files; OUT looks like any folder
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        _sync(tmp)  # on disk before the rename makes it OUT: a power cut leaves OUT absent or complete too
        if out.exists():
            out.rmdir()  # empty (checked by convert); rename cannot replace a folder portably
        os.rename(tmp, out)
        _sync(out.parent, files=False)
    except (OSError, SafetensorError) as e:  # a full disk, a read-only or vanished folder: nothing is left
        shutil.rmtree(tmp, ignore_errors=True)
        raise CrossLayerError(f"cannot write {out}: {_write_error(e)}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return copied


def _sync(folder: Path, files: bool = True) -> None:
    """fsync `folder`'s files (the weight files are synced as they close) and the folder itself."""
    for path in folder.iterdir() if files else ():
        if path.is_file() and not path.name.endswith(".safetensors"):
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _write_error(e: Exception) -> str:
    """One line on why a write failed (safetensors reports I/O errors as SafetensorError text)."""
    reason = getattr(e, "strerror", None) or str(e).strip() or type(e).__name__
    return f"{reason.splitlines()[0]}; nothing was written there"


def _remove_stale_staging(out: Path) -> None:
    """Remove the staging folders of conversions to `out` that were killed: made on this host by a process
    that no longer runs (another host's, or a running conversion's, are left alone)."""
    mine = re.compile(rf"\.{re.escape(out.name)}\.(\d+)@{re.escape(socket.gethostname())}\.[a-z0-9_]+\.partial")
    for path in out.parent.glob(f".{glob.escape(out.name)}.*.partial"):
        match = mine.fullmatch(path.name)
        if match and not _running(int(match[1])):
            shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True
