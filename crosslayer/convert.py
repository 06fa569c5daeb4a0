"""Pretrained checkpoints -> CLA models: an exact weight map, K/V initialisation per sharing group, and
folder-to-folder conversion.

Sources: transformers' LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM (one layout; Qwen2
adds biases to q/k/v) as folders, hub ids or GGUF files (dequantised), and dense crosslayer models
(every layer its own producer, e.g. an MQA model from `crosslayer train`).

Conversion is two steps. `dense_copy` maps every source tensor, each exactly once (asserted), into a
dense CLA model with equal logits. `share_kv` then applies a sharing plan (`kv_sources`): every
layer keeps its Q, O, MLP and norms; each producer's K/V projections and KV-input norm are
initialised from its group (the producer and the consumers that will read its K/V) by one of
KV_INITS (fit, mean, mean-folded, first; see `share_kv`). With cla_factor=1 the copy is exact.

`convert(src, out)` writes OUT atomically (a temporary folder beside it, renamed at the end) with the
source's tokenizer files, chat template and generation config, and the plan as `plan.json`; on any
error nothing is left behind. Plans are given (`cla_factor` / `cla_pattern`, `kv_sources`, a plan
file) or searched on calibration data (crosslayer.plan).
"""

from __future__ import annotations

import copy
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

KV_INITS = ("fit", "mean", "mean-folded", "first")
FIT_RIDGE = 1e-4  # least-squares fit: ridge as a fraction of the mean diagonal of X^T X
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
        if not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
            raise CrossLayerError("the source's config says tie_word_embeddings=true, but its lm_head.weight differs "
                                  "from the embedding: the checkpoint and its config.json disagree")
        state.pop("lm_head.weight")  # tied: one tensor, carried by the embedding

    target: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for src, dst in GLOBAL_MAP.items():
        if src in state:
            target[dst] = state[src].clone()
            used.add(src)
    for i in range(config.num_hidden_layers):
        for template_map in (LAYER_MAP, kv_map):
            for src, dst in template_map.items():
                for p in (("weight", "bias") if "{p}" in src else (None,)):
                    name = src.format(i=i, p=p)
                    if name in state:
                        target[dst.format(i=i, p=p)] = state[name].clone()
                        used.add(name)
    unused = set(state) - used
    if unused:
        raise CrossLayerError(
            f"{type(source).__name__} has weights this converter does not map: {', '.join(sorted(unused)[:5])}"
            f"{' ...' if len(unused) > 5 else ''}; supported: {', '.join(SOURCE_ARCHITECTURES)}"
        )
    model = _assemble(config, target)
    model.generation_config = copy.deepcopy(source.generation_config)
    return model


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


def kv_groups(kv_sources: list[int]) -> dict[int, list[int]]:
    """producer -> every layer that attends with its K/V, in order (the producer first)."""
    groups: dict[int, list[int]] = {}
    for layer, src in enumerate(kv_sources):
        groups.setdefault(src, []).append(layer)
    return groups


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


def pooled_kv(dense: CLAForCausalLM, members: list[int], kv_init: str) -> dict[str, torch.Tensor]:
    """The K/V map of a producer whose group is `members` (of the dense model), by a calibration-free init.

    Layer j maps its input h to K_j = W_k^j diag(g_j) rms(h)^-1 h (+ b_k^j), likewise V, where g_j
    is its KV-input norm scale. first: the producer's own map. mean: W, b and g each averaged over
    the group (the paper's mean pooling of parameters; not the mean of the maps when the g_j differ).
    mean-folded: the mean of the maps, W = mean_j W^j diag(g_j), b = mean_j b^j, g = 1.
    """
    layers = [_kv_tensors(dense.model.layers[j]) for j in members]
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


def least_squares_kv(gram: torch.Tensor, cross_k: list[torch.Tensor], cross_v: list[torch.Tensor],
                     metric_k: list[torch.Tensor] | None = None, metric_v: list[torch.Tensor] | None = None,
                     bias: bool = False, ridge: float = FIT_RIDGE) -> dict[str, torch.Tensor]:
    """The K/V map of a producer that best reproduces each group member's original K and V, weighted.

    With X (N, d') the producer's normalised inputs (a column of ones appended when `bias`) and K_j
    (N, kv) member j's original keys, minimises sum_j tr((X W^T - K_j) M_j (X W^T - K_j)^T) over W,
    likewise for values, from sufficient statistics: gram = X^T X (d', d'), cross_k[j] = X^T K_j
    (d', kv), metric_k[j] = M_j (kv, kv; None: the identity, which fits the members' mean K). The
    solution is W^T = (X^T X + ridge * mean(diag) * I)^-1 (sum_j X^T K_j M_j) (sum_j M_j)^-1, in float64.
    Returns k/v weights (kv, d) (and biases), and a KV-input norm of ones.
    """
    d = gram.shape[0]
    reg = ridge * gram.diagonal().mean() * torch.eye(d, dtype=torch.float64, device=gram.device)
    if bias:
        reg[-1, -1] = 0  # the intercept is not shrunk
    system = gram.double() + reg
    hidden = d - 1 if bias else d
    out = {"kv_layernorm.weight": torch.ones(hidden, device=gram.device)}
    for name, cross, metric in (("k_proj", cross_k, metric_k), ("v_proj", cross_v, metric_v)):
        if metric is None:
            rhs, weight = torch.stack(cross).double().mean(0), None  # (d', kv)
        else:
            rhs = sum(c.double() @ m.double() for c, m in zip(cross, metric, strict=True))  # (d', kv)
            weight = sum(m.double() for m in metric)  # (kv, kv)
        w_t = torch.linalg.solve(system, rhs)  # (d', kv)
        if weight is not None:
            w_t = torch.linalg.solve(weight, w_t.T).T  # right-multiply by weight^-1 (weight is symmetric)
        w = w_t.T.float()  # (kv, d')
        out[f"{name}.weight"] = w[:, :hidden].contiguous()
        if bias:
            out[f"{name}.bias"] = w[:, -1].contiguous()
    return out


def with_kv(dense: CLAForCausalLM, config: CLAConfig, kv: dict[int, dict[str, torch.Tensor]]) -> CLAForCausalLM:
    """The model of the sharing plan `config` whose producers' K/V maps are `kv` (producer -> tensors).

    Every other tensor is `dense`'s own (shared, not copied): the result is cheap to build, and
    changing it changes `dense`.
    """
    state = {name: t for name, t in dense.state_dict().items()
             if not any(part in name for part in (".k_proj.", ".v_proj.", ".kv_layernorm."))}
    dtype = dense.model.embed_tokens.weight.dtype
    for producer, tensors in kv.items():
        for name, tensor in tensors.items():
            prefix = "" if name.startswith("kv_layernorm") else "self_attn."
            state[f"model.layers.{producer}.{prefix}{name}"] = tensor.to(dtype)
    model = _assemble(config, state)
    model.generation_config = copy.deepcopy(dense.generation_config)
    return model


def share_kv(dense: CLAForCausalLM, config: CLAConfig, kv_init: str = "mean",
             calibration: torch.Tensor | None = None, batch_size: int = 4) -> CLAForCausalLM:
    """The dense CLA model `dense` turned into the sharing plan `config`, each producer's K/V map
    initialised from its group by `kv_init`:

      fit:          least squares on calibration tokens (the original model's activations): the
                    producer's map, applied to its own input, reproduces each group member's K and V,
                    key errors weighted by what that member's queries see of them (rotary offsets
                    averaged), value errors by what its o_proj passes on (plan.Reference.fit);
      mean:         the group's projections, biases and norm scales each averaged (the paper's mean pooling);
      mean-folded:  the mean of the group's maps W diag(g) (the KV-input norm becomes 1);
      first:        the producer's own map (the paper's "drop": the other layers' K/V are discarded).

    `calibration`: (B, T) token ids, needed by `fit`. Every tensor but the producers' K/V maps is
    shared with `dense`.
    """
    if kv_init not in KV_INITS:
        raise CrossLayerError(f"kv_init must be one of {', '.join(KV_INITS)}; got {kv_init!r}")
    if dense.config.num_producer_layers != dense.config.num_hidden_layers:
        raise CrossLayerError(f"share_kv needs a dense model (every layer its own producer); this one has kv_sources "
                              f"{dense.config.kv_sources}")
    groups = kv_groups(config.kv_sources)
    if kv_init != "fit":
        return with_kv(dense, config, {p: pooled_kv(dense, members, kv_init) for p, members in groups.items()})
    if calibration is None:
        raise CrossLayerError("kv_init 'fit' needs calibration tokens (a (B, T) tensor of token ids)")
    from .plan import Reference

    return Reference(dense, calibration, batch_size=batch_size, keep_logprobs=False).model(config)
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
