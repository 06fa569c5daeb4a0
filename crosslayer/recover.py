"""Recovering a converted model: which parameters train, and what they learn to match.

A conversion changes only the producers' K/V projections (and their KV-input norms); every other
weight is the original model's. Recovery can therefore train only what changed (`trainable: kv`),
optionally with the consumers' query and output projections (`kv+qo`), and learn from the original
model itself instead of from the data alone:
  logits  the KL divergence from the original model's next-token distribution (`teacher`) to ours.
The trainer (`crosslayer train`) runs these like any training: progress, checkpoints, resume.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

TRAINABLE = ("all", "kv", "kv+qo")
OBJECTIVES = ("lm", "logits")


def shared_groups(config) -> dict[int, list[int]]:
    """producer -> every layer that attends with its K/V (itself first)."""
    groups: dict[int, list[int]] = {}
    for layer, src in enumerate(config.kv_sources):
        groups.setdefault(src, []).append(layer)
    return groups


def trainable_names(model: nn.Module, which: str) -> set[str]:
    """Names of the parameters `which` trains: all; kv = producers' k/v projections and KV-input norms;
    kv+qo = those and the q/o projections of every layer that shares a producer's K/V."""
    names = {n for n, _ in model.named_parameters()}
    if which == "all":
        return names
    config = model.config
    chosen = set()
    for producer, members in shared_groups(config).items():
        prefix = f"model.layers.{producer}."
        kv_parts = ("self_attn.k_proj.", "self_attn.v_proj.", "kv_layernorm.")
        chosen |= {n for n in names if any(n.startswith(prefix + part) for part in kv_parts)}
        if which == "kv+qo" and len(members) > 1:
            for layer in members:
                p = f"model.layers.{layer}.self_attn."
                chosen |= {n for n in names if n.startswith(p + "q_proj.") or n.startswith(p + "o_proj.")}
    return chosen


def select_trainable(model: nn.Module, which: str) -> None:
    """Freeze every parameter `which` does not train."""
    chosen = trainable_names(model, which)
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)


def logit_distillation(teacher: nn.Module, temperature: float = 1.0) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """loss(student, batch) = KL(teacher || student) of the next-token distributions, x temperature^2."""

    def loss(student: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        inputs = batch[:, :-1]
        with torch.no_grad():
            target = teacher(input_ids=inputs, use_cache=False).logits.float()  # (B, T, V)
        logits = student(input_ids=inputs, use_cache=False).logits.float()  # (B, T, V)
        log_p = F.log_softmax(target / temperature, dim=-1)
        log_q = F.log_softmax(logits / temperature, dim=-1)
        kl = F.kl_div(log_q.flatten(0, 1), log_p.flatten(0, 1), log_target=True, reduction="batchmean")
        return kl * temperature**2

    return loss


def build_objective(name: str, teacher: nn.Module | None, cfg) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """The training loss of a recipe's `objective` (not `lm`, which the trainer computes itself)."""
    if name == "logits":
        return logit_distillation(teacher, cfg.distill_temperature)
    raise ValueError(f"no objective {name!r}")
