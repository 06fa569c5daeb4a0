"""What a run minimises, and the validation loss it reports: one place for every loss the trainer computes."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import CrossLayerError
from ..losses import NextToken
from ..recover import Objective, build_objective
from .config import TrainConfig


def causal_lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a (B, T+1) batch; `model` is a `HeadLoss` (perhaps wrapped), so the
    vocabulary-wide work runs a chunk of rows at a time."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    return model(inputs, NextToken(targets.flatten()))


def training_objective(cfg: TrainConfig, teacher: nn.Module | None) -> Objective:
    """loss(model, batch) of the recipe's `objective`: the next-token loss, or a distillation from `teacher`."""
    if cfg.objective == "lm":
        return causal_lm_loss
    return build_objective(cfg.objective, teacher, cfg)


@torch.no_grad()
def evaluate(model: nn.Module, tokens: np.ndarray, cfg: TrainConfig, device: torch.device,
             autocast: AbstractContextManager, rank: int, world: int) -> dict:
    """Loss over the first eval_tokens of the validation split, in non-overlapping windows."""
    windows = min((len(tokens) - 1) // cfg.seq_len, max(1, cfg.eval_tokens // cfg.seq_len))
    windows -= windows % world  # every rank runs the same number of forwards (FSDP needs it)
    if windows < 1:
        raise CrossLayerError(f"validation split has {len(tokens)} tokens: too few for one window per process")
    mine = list(range(rank * windows // world, (rank + 1) * windows // world))
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(0, len(mine), cfg.micro_batch):
        rows = [np.asarray(tokens[w * cfg.seq_len : w * cfg.seq_len + cfg.seq_len + 1], dtype=np.int64)
                for w in mine[i : i + cfg.micro_batch]]
        batch = torch.from_numpy(np.stack(rows)).to(device)  # (B, T+1)
        with autocast:
            loss = causal_lm_loss(model, batch)
        total += torch.tensor([loss.item() * batch[:, 1:].numel(), batch[:, 1:].numel()], device=device,
                              dtype=torch.float64)
    if world > 1:
        dist.all_reduce(total)
    model.train()
    val_loss = (total[0] / total[1]).item()
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700)), "val_tokens": int(total[1].item())}
