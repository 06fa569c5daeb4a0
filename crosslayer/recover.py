"""Recovering a converted model: which parameters train, and what they learn to match.

A conversion changes only the producers' K/V projections (and their KV-input norms); every other
weight is the original model's. Recovery can therefore train only what changed (`trainable: kv`),
optionally with the query and output projections of every layer that shares K/V (`kv+qo`), and
learn from the original model itself (`teacher`) instead of from the data alone:
  lm         next-token cross-entropy on the data (the trainer's own loss; no teacher);
  logits     the KL divergence from the teacher's next-token distribution to ours (through the whole
             model and its output layer), a chunk of rows at a time (`crosslayer.losses`): online
             (the teacher runs beside the student) or offline (`teacher_topk: k`: the teacher's top-k
             per training window, computed once and kept beside the data, `crosslayer.teacher_cache`);
  attention  layer-local: every layer that shares K/V gets the teacher's hidden state at its input
             and learns to reproduce the teacher's attention output there (relative squared error,
             averaged over those layers). Only the attention of those layers runs with gradients:
             no MLP, no output layer, nothing backpropagated from one layer into another, so a step
             costs a teacher forward pass and a fraction of a student's.
The trainer (`crosslayer train`) runs these like any training: progress, checkpoints, resume.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from .errors import CrossLayerError
from .losses import HeadLoss, TeacherLogits, final_hidden
from .modeling import SharedKV
from .teacher_cache import TopKStore

TRAINABLE = ("all", "kv", "kv+qo")
OBJECTIVES = ("lm", "logits", "attention")
# a training objective: loss(model, batch of (B, T+1) token ids) -> a scalar to minimise; the model is a
# `crosslayer.losses.HeadLoss` (its forward takes inputs and a loss target), perhaps wrapped by DDP / FSDP
Objective = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def shared_groups(config) -> dict[int, list[int]]:
    """producer -> every layer that attends with its K/V (itself first)."""
    groups: dict[int, list[int]] = {}
    for layer, src in enumerate(config.kv_sources):
        groups.setdefault(src, []).append(layer)
    return groups


def trainable_names(model: nn.Module, which: str) -> set[str]:
    """Names of the parameters `which` trains: all; kv = what conversion changed, the k/v projections and
    KV-input norms of producers whose K/V other layers share; kv+qo = those and the q/o projections of
    every layer in those groups."""
    names = {n for n, _ in model.named_parameters()}
    if which == "all":
        return names
    config = model.config
    chosen = set()
    for producer, members in shared_groups(config).items():
        if len(members) == 1:  # a producer alone keeps the original map
            continue
        prefix = f"model.layers.{producer}."
        kv_parts = ("self_attn.k_proj.", "self_attn.v_proj.", "kv_layernorm.")
        chosen |= {n for n in names if any(n.startswith(prefix + part) for part in kv_parts)}
        if which == "kv+qo":
            for layer in members:
                p = f"model.layers.{layer}.self_attn."
                chosen |= {n for n in names if n.startswith(p + "q_proj.") or n.startswith(p + "o_proj.")}
    return chosen


def select_trainable(model: nn.Module, which: str) -> None:
    """Freeze every parameter `which` does not train; a selection of nothing is refused."""
    chosen = trainable_names(model, which)
    if not chosen:
        raise CrossLayerError(f"trainable: {which} selects no parameter of this model: no layer shares another's K/V "
                              "(every layer is its own producer), so conversion changed nothing; use trainable: all")
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)


def logit_distillation(teacher: nn.Module, temperature: float = 1.0) -> Objective:
    """loss(student, batch) = KL(teacher || student) of the next-token distributions, x temperature^2; the
    teacher's final hidden states are computed here, its logits a chunk at a time beside the student's."""

    def loss(student: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        inputs = batch[:, :-1]
        with torch.no_grad():
            hidden = final_hidden(teacher, inputs).flatten(0, 1)  # (B*T, d)
        return student(inputs, TeacherLogits(hidden, teacher.lm_head.weight, temperature))

    return loss


class OfflineLogitDistillation:
    """loss(student, batch) = the top-k KL (`crosslayer.losses.TeacherTopK`) to the teacher's stored top-k of
    the batch's windows. The trainer names the windows of each batch first (`windows`), and the store
    computes those it does not hold yet with the teacher, once."""

    def __init__(self, store: TopKStore, teacher: nn.Module, autocast) -> None:
        self.store, self.teacher, self.autocast = store, teacher, autocast
        self.windows: list[int] = []

    def __call__(self, student: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        device = batch.device
        self.store.fill(self.windows, self.teacher, device, self.autocast)
        return student(batch[:, :-1], self.store.target(self.windows, device))


@torch.no_grad()
def teacher_attention(teacher: nn.Module, inputs: torch.Tensor, layers: list[int]) -> dict[int, tuple]:
    """layer -> (its input hidden state, its attention output), each (B, T, d), of the teacher on `inputs`.

    Read with hooks on `model.layers[i]` and `model.layers[i].self_attn`, which Llama-family and
    crosslayer models share; the base model runs, not the output layer.
    """
    inputs_at: dict[int, torch.Tensor] = {}
    outputs_at: dict[int, torch.Tensor] = {}
    handles = []

    def grab_input(i):
        def hook(module, args, kwargs):
            inputs_at[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def grab_output(i):
        def hook(module, args, output):
            outputs_at[i] = output[0] if isinstance(output, tuple) else output
        return hook

    for i in layers:
        layer = teacher.model.layers[i]
        handles.append(layer.register_forward_pre_hook(grab_input(i), with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(grab_output(i)))
    try:
        teacher.model(input_ids=inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {i: (inputs_at[i], outputs_at[i]) for i in layers}


def attention_distillation(teacher: nn.Module) -> Objective:
    """loss(student, batch): layer-local distillation of the attention of every layer that shares K/V
    (module docstring). The student runs group by group, each producer first, on the teacher's hidden
    states; the loss is the mean over those layers of |a_student - a_teacher|^2 / |a_teacher|^2."""

    def loss(student: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        model = getattr(student, "module", student)  # unwrapped (DDP); the layers are called one by one
        model = model.lm if isinstance(model, HeadLoss) else model
        config = model.config
        shared = [i for members in shared_groups(config).values() if len(members) > 1 for i in members]
        if not shared:
            raise CrossLayerError("objective 'attention' needs a model that shares K/V (every layer is its own "
                                  "producer here); use lm or logits")
        inputs = batch[:, :-1]
        targets = teacher_attention(teacher, inputs, shared)
        position_ids = torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0)  # (1, T)
        first = targets[shared[0]][0]
        mask = create_causal_mask(config=config, inputs_embeds=first, attention_mask=None, cache=None,
                                  position_ids=position_ids)
        position_embeddings = model.model.rotary_emb(first, position_ids)
        kv = SharedKV()
        total = first.new_zeros(())
        for i in sorted(shared):  # producers come before their consumers
            hidden, target = targets[i]
            layer = model.model.layers[i]
            # the attention half of CLADecoderLayer.forward: one normalisation, two scales
            normed = layer.input_layernorm.normalize(hidden)
            kv_input = layer.kv_layernorm.weight * normed if layer.self_attn.is_producer else None
            out, _ = layer.self_attn(layer.input_layernorm.weight * normed, kv_input, position_embeddings, mask, kv)
            total = total + (out.float() - target.float()).pow(2).sum() / target.float().pow(2).sum()
        return total / len(shared)

    return loss


def build_objective(name: str, teacher: nn.Module | None, cfg) -> Objective:
    """The training loss of a recipe's `objective` (not `lm`, which the trainer computes itself)."""
    if name == "logits":
        return logit_distillation(teacher, cfg.distill_temperature)
    if name == "attention":
        if cfg.trainable == "all":
            raise CrossLayerError("objective attention distils the attention of the sharing layers only: nothing else "
                                  "would learn; train trainable: kv or kv+qo with it")
        return attention_distillation(teacher)
    raise ValueError(f"no objective {name!r}")
