"""Calibration: what a conversion measures on text before it shares K/V.

`read_calibration` turns calibration text (text files, or a folder made by `crosslayer prepare`) into
token ids. `Calibration` holds the dense model's activations on them, computed once, layer by layer:
each layer's input hidden state, its original K and V (before rotary), and the weights of a K/V
error (what the layer's queries see of a key error, what its o_proj passes on of a value error).
From those, `Calibration.fit` solves the weighted least-squares K/V map of a sharing group
(`least_squares_kv`), the `fit` initialisation of convert.share_kv, and `Calibration.run_layers` runs
a sharing plan's model on the calibration tokens from any layer on (crosslayer.plan measures plans
that way). `progress_bar` is the progress bar of calibration and plan search.

The activations (and the plans crosslayer.plan runs on them) may be computed in bf16
(`compute_dtype`): a bf16 copy of the dense model runs them, which on a CPU with AMX was 2.6x faster
per plan than fp32 and 1.4x faster than fp32 weights under bf16 autocast (SmolLM2-135M, 1,024
tokens). What a bf16 activation feeds is accumulated in fp64: the fit's Gram and cross products,
the K/V error metrics. `resolve_compute_dtype` picks bf16 where matrix units make it pay.
"""

from __future__ import annotations

import contextlib
import copy
import glob
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.masking_utils import create_causal_mask

from .config import describe
from .data import load_tokens, read_meta
from .device import compute_dtype as auto_compute_dtype  # (parameters here are named compute_dtype)
from .errors import CrossLayerError
from .loading import tokenizer_fingerprint
from .modeling import CLAForCausalLM, CLARotaryEmbedding, SharedKV, rotate_half

CALIBRATION_TOKENS = 2048  # default calibration size (4 sequences)
CALIBRATION_SEQ_LEN = 512  # tokens per calibration sequence
FIT_RIDGE = 1e-4  # least-squares fit: ridge as a fraction of the mean diagonal of X^T X
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # what calibration and plan search run in


def resolve_compute_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype calibration activations and plan search run in: `fp32`, `bf16`, or `auto` (bf16 on CUDA
    or on a CPU that multiplies bf16 matrices in hardware, crosslayer.device.has_bf16_matrix_units; else fp32)."""
    if name == "auto":
        return auto_compute_dtype(name, torch.device(device))
    if name not in COMPUTE_DTYPES:
        raise CrossLayerError(f"compute_dtype must be one of auto, {', '.join(COMPUTE_DTYPES)}; got {name!r}")
    return COMPUTE_DTYPES[name]


def progress_bar(items, progress: bool, desc: str, total: int | None = None):
    """A tqdm bar over items (or a bare one of `total` steps when items is None); without progress: the items
    (or None)."""
    if not progress:
        return items
    return tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------
# Calibration tokens


def read_calibration(data: str, tokenizer, tokens: int = CALIBRATION_TOKENS,
                     seq_len: int = CALIBRATION_SEQ_LEN) -> torch.Tensor:
    """(tokens // seq_len, seq_len) token ids from `data`: a text file or glob, or a folder made by
    `crosslayer prepare` with this tokenizer (its train split).

    The sequences are disjoint and taken from evenly spaced places across the whole text (in long
    text each from the start of a line), so a few thousand tokens still cover many books; deterministic.
    """
    if tokens < seq_len:
        raise CrossLayerError(f"calibration: {tokens} tokens is less than one sequence of {seq_len}")
    n = tokens // seq_len
    folder = Path(data)
    if folder.is_dir() and (folder / "meta.json").exists():
        meta = read_meta(folder)
        if tokenizer_fingerprint(tokenizer) != meta.get("tokenizer_fingerprint"):
            raise CrossLayerError(f"calibration: {data} was tokenised with another tokenizer ({meta['tokenizer']}); "
                                  "give text files, or a folder prepared with the model's tokenizer")
        stream = load_tokens(folder, "train")
        if len(stream) < n * seq_len:
            raise CrossLayerError(f"calibration: {data} holds {len(stream):,} train tokens; {n * seq_len:,} needed")
        starts = np.linspace(0, len(stream) - seq_len, n).astype(np.int64)
        return torch.from_numpy(np.stack([np.asarray(stream[s : s + seq_len], dtype=np.int64) for s in starts]))
    files = sorted(glob.glob(data, recursive=True))
    if not files:
        raise CrossLayerError(f"calibration: no file matches {data!r} (give a text file or glob, or a prepared folder)")
    try:
        text = "\n\n".join(Path(f).read_text(encoding="utf-8") for f in files)
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise CrossLayerError(f"calibration: {data}: not UTF-8 text files ({e})") from None
    span = seq_len * 16  # characters tokenised per sequence: enough for seq_len tokens of any text
    if len(text) <= n * span:  # short text: tokenise it all, take n disjoint windows
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < n * seq_len:
            raise CrossLayerError(f"calibration: {data} gives {len(ids):,} tokens; {n} sequences of {seq_len} need "
                                  f"{n * seq_len:,} (give more text or fewer tokens)")
        starts = np.linspace(0, len(ids) - seq_len, n).astype(np.int64)
        return torch.tensor([ids[s : s + seq_len] for s in starts], dtype=torch.long)
    rows = []  # long text: tokenise n disjoint slices, each from the start of a line
    for offset in np.linspace(0, len(text) - span, n).astype(np.int64):
        begin = text.find("\n", int(offset)) + 1 if offset else 0
        ids = tokenizer(text[begin : begin + span], add_special_tokens=False)["input_ids"]
        if len(ids) < seq_len:
            raise CrossLayerError(f"calibration: {data} has a stretch of {span:,} characters that gives fewer than "
                                  f"{seq_len} tokens; is it text?")
        rows.append(ids[:seq_len])
    return torch.tensor(rows, dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# The weighted least-squares fit of a group's K/V map


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


# ----------------------------------------------------------------------------------------------
# The dense model's activations, and plans run on them


@dataclass
class Run:
    """A plan run on the calibration tokens from some layer on."""

    final: list[torch.Tensor]  # per chunk, the last layer's output (b, T, d)
    hidden: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> its input, when kept


class Calibration:
    """The dense model's activations on calibration tokens (B, T), computed once, layer by layer: each
    layer's input hidden state (to run plans from any layer) and its original K and V (before rotary;
    the targets of the `fit` initialisation), with the weights of the fit's errors.

    `compute_dtype` (default: `dense`'s) is the dtype they are computed in: `model` is `dense` in that
    dtype (`dense` itself, or a copy; `compute_model` hands over one made already), and plans run on it.
    With `load`, `dense` is a skeleton on the meta device (in the compute dtype) whose weights are
    loaded one module at a time: `load(name, module)` gives the submodule `name` the weights it lacks, on
    `device`, just before it runs, and they are dropped after it, so only one layer is ever resident (a
    model larger than memory calibrates, and plans run, a layer at a time). With `offload` (a folder; CPU
    only), the activations kept (hidden states, K, V) are written there as they are made and read back
    memory-mapped, so what does not fit in memory pages from disk.
    """

    def __init__(self, dense: CLAForCausalLM, tokens: torch.Tensor, batch_size: int = 4, progress: bool = False,
                 compute_dtype: torch.dtype | None = None, compute_model: CLAForCausalLM | None = None,
                 load: Callable[[str, nn.Module], None] | None = None, device: torch.device | str | None = None,
                 offload: Path | None = None) -> None:
        if dense.config.num_producer_layers != dense.config.num_hidden_layers:
            raise CrossLayerError("calibration needs the dense model (every layer its own producer)")
        if tokens.dim() != 2 or tokens.shape[1] < 2:
            raise CrossLayerError(f"calibration tokens must be a (B, T) tensor with T >= 2, got shape {tuple(tokens.shape)}")
        self.dense = dense.eval()
        self.config = dense.config
        self.compute_dtype = compute_dtype or dense.model.embed_tokens.weight.dtype
        self.model = compute_model or dense  # dense in the compute dtype: what every pass below runs
        if self.model.model.embed_tokens.weight.dtype != self.compute_dtype:
            self.model = copy.deepcopy(dense).to(self.compute_dtype).eval()
        self.load = load
        device = torch.device(device) if device is not None else self.model.model.embed_tokens.weight.device
        self.device = device
        if offload is not None and device.type != "cpu":
            raise CrossLayerError(f"calibration activations on {device} stay there: offload is for a CPU's")
        self.offload = offload
        self.rotary = CLARotaryEmbedding(self.config).to(device)  # fp32 tables, whatever the weights' dtype
        self.chunks = list(tokens.to(device).split(batch_size))  # each (b, T)
        self.tokens = tokens
        self.num_tokens = tokens.numel()
        self.contexts = [self._context(c) for c in self.chunks]
        # per layer, in the compute dtype (exact: that is what the layer computed); N = B * T
        self.keys: list[torch.Tensor] = []  # (N, kv_heads * head_dim)
        self.values: list[torch.Tensor] = []
        # per layer (kv_heads, hd, hd), the blocks of a block-diagonal (kv, kv) metric (`metric`)
        self.key_metrics: list[torch.Tensor] = []  # what its queries see of a key error
        self.value_metrics: list[torch.Tensor] = []  # what its o_proj passes on of a value error
        self.hidden: list[list[torch.Tensor]] = []  # per layer, per chunk (b, T, d); [L]: the last output
        self._fits: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}  # group -> its fitted K/V map
        rotations = self._rotations(tokens.shape[1])
        with torch.no_grad():
            with self._resident("model.embed_tokens", self.model.model.embed_tokens) as embed:
                h = [embed(c) for c in self.chunks]  # per chunk (b, T, d)
            for i in progress_bar(range(self.config.num_hidden_layers), progress, "calibration"):
                h = self._kept(h, f"hidden-{i}")
                self.hidden.append(h)
                with self._resident(f"model.layers.{i}", self.model.model.layers[i]) as layer:
                    k, v = zip(*(self._kv(layer, x) for x in h), strict=True)
                    self.keys.append(self._kept(torch.cat(k), f"keys-{i}"))
                    self.values.append(self._kept(torch.cat(v), f"values-{i}"))
                    self.key_metrics.append(self._key_metric(layer, h, rotations))
                    self.value_metrics.append(self._value_metric(layer))
                    h = [self._layer(layer, x, ctx, SharedKV()) for x, ctx in zip(h, self.contexts, strict=True)]
            self.hidden.append(self._kept(h, "hidden-last"))

    def _kept(self, tensors, name: str):
        """`tensors` (a tensor or a list of them) as kept: themselves, or with `offload` written to a file there
        and read back memory-mapped."""
        if self.offload is None:
            return tensors
        path = Path(self.offload) / f"{name}.pt"
        torch.save(tensors, path)
        return torch.load(path, mmap=True, weights_only=True)

    @contextlib.contextmanager
    def _resident(self, name: str, module: nn.Module):
        """`module` with its weights: loaded for the block and dropped after when they stream (`load`)."""
        if self.load is None:
            yield module
            return
        self.load(name, module)
        try:
            yield module
        finally:
            module.to("meta")

    @staticmethod
    def metric(blocks: torch.Tensor) -> torch.Tensor:
        """The (kv, kv) block-diagonal matrix of per-head blocks (kv_heads, hd, hd)."""
        return torch.block_diag(*blocks)

    # -- pieces of the forward pass ----------------------------------------------------------

    def _context(self, chunk: torch.Tensor) -> tuple[Any, tuple[torch.Tensor, torch.Tensor]]:
        """(attention mask, rotary cos/sin) of a chunk of sequences, as CLAModel.forward builds them."""
        embeds = torch.zeros((), dtype=self.compute_dtype, device=chunk.device).expand(
            *chunk.shape, self.config.hidden_size)  # (b, T, d), shape only
        position_ids = torch.arange(chunk.shape[1], device=chunk.device).unsqueeze(0)  # (1, T)
        mask = create_causal_mask(config=self.config, inputs_embeds=embeds, attention_mask=None, cache=None,
                                  position_ids=position_ids)
        return mask, self.rotary(embeds, position_ids)

    def _rotations(self, seq_len: int, samples: int = 64) -> torch.Tensor:
        """Rotary matrices R_d (samples, hd, hd) for offsets d spread over 0..seq_len-1: a row vector x at
        offset d rotates to x @ R_d."""
        device = self.rotary.inv_freq.device
        offsets = torch.linspace(0, seq_len - 1, samples, device=device).round().long().unsqueeze(0)  # (1, samples)
        eye = torch.eye(self.config.head_dim, device=offsets.device)
        with torch.no_grad():
            cos, sin = self.rotary(eye, offsets)  # (1, samples, hd) each
        cos, sin = cos[0].float(), sin[0].float()
        return eye * cos[:, None, :] + rotate_half(eye) * sin[:, None, :]  # (samples, hd, hd)

    def _key_metric(self, layer: torch.nn.Module, h: list[torch.Tensor], rotations: torch.Tensor) -> torch.Tensor:
        """(kv_heads, hd, hd), the blocks of a block-diagonal (kv, kv) metric: per K/V head, E[R_d^T q q^T R_d]
        over the layer's queries q of its query heads on that K/V head (before rotary) and offsets d, so
        e M e^T is the mean squared attention-score error a key error e causes (the rotation at each offset
        taken into account)."""
        n_kv, hd = self.config.num_key_value_heads, self.config.head_dim
        group = self.config.num_attention_heads // n_kv
        m = torch.zeros(n_kv, hd, hd, dtype=torch.float64, device=h[0].device)
        for x in h:
            q = layer.self_attn.q_proj(layer.input_layernorm(x)).view(-1, n_kv, group, hd).double()  # (bT, kv, g, hd)
            m += torch.einsum("nkgi,nkgj->kij", q, q)
        m /= self.num_tokens
        r = rotations.double()  # (S, hd, hd)
        rotated = torch.einsum("sji,kjl,slm->kim", r, m, r) / r.shape[0]  # mean over s of R_s^T m R_s
        return rotated.float()

    def _value_metric(self, layer: torch.nn.Module) -> torch.Tensor:
        """(kv_heads, hd, hd), the blocks of a block-diagonal (kv, kv) metric: per K/V head, sum over its query
        heads h of O_h^T O_h, O_h (d, hd) the columns of o_proj that read head h, so e M e^T is the squared
        output error a value error e causes."""
        n_kv, hd = self.config.num_key_value_heads, self.config.head_dim
        o = layer.self_attn.o_proj.weight.detach().double().view(-1, n_kv, self.config.num_attention_heads // n_kv, hd)
        return torch.einsum("dkgi,dkgj->kij", o, o).float()  # (d, kv, g, hd) -> (kv, hd, hd)

    @staticmethod
    def _kv(layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A dense layer's own K and V (before rotary) of its input x (b, T, d), as (b*T, kv) each."""
        kv_input = layer.kv_layernorm.weight * layer.input_layernorm.normalize(x)
        return layer.self_attn.k_proj(kv_input).flatten(0, 1), layer.self_attn.v_proj(kv_input).flatten(0, 1)

    @staticmethod
    def _layer(layer: torch.nn.Module, x: torch.Tensor, context, shared: SharedKV) -> torch.Tensor:
        mask, position_embeddings = context
        return layer(x, attention_mask=mask, position_embeddings=position_embeddings, shared_kv=shared)

    # -- a group's fitted K/V map, and a plan's run ---------------------------------------------

    def fit(self, members: list[int], keep: bool = True) -> dict[str, torch.Tensor]:
        """The K/V map of a producer whose group is `members`: least squares from the producer's original
        input to each member's original K and V, key errors weighted by what the member's queries see
        of them, value errors by what its o_proj passes on (`least_squares_kv`). Depends on the group
        only, so it is computed once per group (and kept, unless `keep` is False)."""
        key = tuple(members)
        if key in self._fits:
            return self._fits[key]
        norm = self.dense.model.layers[members[0]].input_layernorm
        # products in fp64 whatever the activations' dtype (bf16 ones are normalised in fp32 first)
        inputs = torch.cat([norm.normalize(c.float()).flatten(0, 1) for c in self.hidden[members[0]]]).double()  # (N, d)
        bias = self.dense.model.layers[members[0]].self_attn.k_proj.bias is not None
        if bias:
            inputs = torch.cat([inputs, torch.ones_like(inputs[:, :1])], 1)  # (N, d+1): the intercept
        fitted = least_squares_kv(
            inputs.T @ inputs, [inputs.T @ self.keys[j].double() for j in members],
            [inputs.T @ self.values[j].double() for j in members], [self.metric(self.key_metrics[j]) for j in members],
            [self.metric(self.value_metrics[j]) for j in members], bias)
        if keep:
            self._fits[key] = fitted
        return fitted

    def run_layers(self, model: CLAForCausalLM, start: int = 0, hidden: list[torch.Tensor] | None = None,
                   keep_hidden: bool = False) -> Run:
        """Run `model` (a sharing plan of the dense model, e.g. convert.share_kv's) on the calibration tokens
        from layer `start` on, given `hidden` there (default: the original input of layer `start`). No
        layer from `start` on may read the K/V of a layer before it. When the weights stream (`load`), each
        layer's missing ones are loaded for its turn and dropped after."""
        kv_sources = model.config.kv_sources
        if any(src < start <= layer for layer, src in enumerate(kv_sources)):
            raise CrossLayerError(f"cannot run plan {describe(kv_sources)} from layer {start}: a group crosses it")
        if hidden is None:
            hidden = self.hidden[start]
        out = Run(final=[])
        shared = [SharedKV() for _ in self.chunks]
        h = hidden
        with torch.no_grad():
            for i in range(start, len(kv_sources)):
                if keep_hidden:
                    out.hidden[i] = h
                with self._resident(f"model.layers.{i}", model.model.layers[i]) as layer:
                    h = [self._layer(layer, x, ctx, s) for x, ctx, s in zip(h, self.contexts, shared, strict=True)]
        out.final = h
        return out
