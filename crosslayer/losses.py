"""Vocabulary-wide losses, a chunk of rows at a time: next-token cross-entropy, and distillation from
a teacher's logits (online) or from its stored top-k (offline, `crosslayer.teacher_cache`).

The (tokens x vocabulary) logits of a batch are never made whole. For each chunk of rows the output
layer runs in the compute dtype (bf16 under autocast: the CPU's or GPU's matrix units), its logits go
to fp32 for the softmax, and since every loss here is a sum of per-row terms, the gradient with
respect to that chunk's logits is formed on the spot and multiplied back into the gradients of the
hidden states and of the output weight (accumulated in fp32). Backward then only scales what forward
stored, so nothing is recomputed. The three losses, per row, with z the student's logits:

- next token t:           CE = logsumexp(z) - z_t;                        dCE/dz = softmax(z) - onehot(t)
- teacher logits y, T:    T^2 KL(softmax(y/T) || softmax(z/T));           d/dz = T (softmax(z/T) - softmax(y/T))
- teacher top-k K (ids), their log-probabilities log p_K and the log of the rest's mass log r (all at
  T = 1): the KL between the two distributions coarsened to k + 1 outcomes (each top-k token, and
  "any other token"),  sum_K p_k (log p_k - log q_k) + r (log r - log q_rest),  with
  q = softmax(z) and q_rest = 1 - sum_K q_k (from the logits outside K, not by subtraction);
  d/dz_j = q_j - p_j for j in K, and q_j (1 - r / q_rest) elsewhere.
Each loss is the mean over rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# rows per chunk: enough that the output layer's GEMM runs at the matrix units' pace, few enough that one
# chunk's logits stay a small fraction of memory (512 rows x 49,152 tokens = 96 MiB in fp32)
CHUNK_ROWS = 512
# vocabularies from this size up get the per-chunk softmax, loss and gradient as one compiled (fused) kernel:
# eager, each of its ~10 vocabulary-wide steps is a pass over memory; below it compiling costs more than it saves
FUSE_MIN_VOCAB = 8192


# The per-chunk math: logits z (n, V) in the compute dtype -> (summed loss in fp32, d loss / d z in z's dtype),
# computed in fp32 in between.
# Written as plain tensor code so that torch.compile fuses each into a kernel or two.


def next_token_math(z: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtype, z = z.dtype, z.float()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (n, 1)
    loss = (lse.squeeze(1) - z.gather(1, ids[:, None]).squeeze(1)).sum()
    grad = torch.exp(z - lse).scatter_add(1, ids[:, None], torch.full_like(lse, -1.0))  # softmax - onehot
    return loss, grad.to(dtype)


def teacher_logits_math(z: torch.Tensor, y: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    zs, ys = z.float() / temperature, y.float() / temperature
    lse_z, lse_y = torch.logsumexp(zs, dim=-1, keepdim=True), torch.logsumexp(ys, dim=-1, keepdim=True)
    p, q = torch.exp(ys - lse_y), torch.exp(zs - lse_z)
    # KL(p || q) = sum p (ys - lse_y - zs + lse_z) = sum p (ys - zs) + lse_z - lse_y, since sum p = 1
    loss = ((p * (ys - zs)).sum() + (lse_z - lse_y).sum()) * temperature**2
    return loss, ((q - p) * temperature).to(z.dtype)


def teacher_top_k_math(z: torch.Tensor, ids: torch.Tensor, log_p: torch.Tensor,
                       log_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As the others, but the gradient's top-k entries come apart, (n, k) in fp32: the caller writes them
    into the gradient in place (a scatter into a full (n, V) copy costs more than the rest of the math)."""
    dtype, z = z.dtype, z.float()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (n, 1)
    log_q_top = z.gather(1, ids) - lse  # (n, k)
    in_top = torch.zeros_like(z, dtype=torch.bool).scatter(1, ids, True)  # (n, V)
    lse_rest = torch.logsumexp(torch.where(in_top, float("-inf"), z), dim=-1, keepdim=True)  # (n, 1), exact
    log_q_rest = (lse_rest - lse).squeeze(1)  # (n,)
    p, r = log_p.exp(), log_r.exp()
    some_rest = r > 0  # (n,) where the top-k does not hold all of the teacher's mass
    rest_term = torch.where(some_rest, r * (log_r - log_q_rest), 0.0)  # r log(r / q_rest), 0 for r = 0
    loss = (p * (log_p - log_q_top)).sum() + rest_term.sum()
    # outside K: q_j (1 - r / q_rest) = q_j - r exp(z_j - lse_rest), bounded even where q_rest underflows
    pull = torch.where(some_rest[:, None], r[:, None] * torch.exp(z - lse_rest), 0.0)
    grad = torch.exp(z - lse) - pull
    return loss, grad.to(dtype), log_q_top.exp() - p


@functools.cache
def fused(math):
    """`math` compiled (static shapes: one kernel set per chunk shape, the last chunk's included)."""
    return torch.compile(math, dynamic=False)


@dataclass
class NextToken:
    """Targets of next-token cross-entropy: ids (N,)."""

    ids: torch.Tensor

    def loss_and_grad(self, z: torch.Tensor, rows: slice, math: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, its gradient w.r.t. z) for the logits z (n, V) of `rows`; `math` is `next_token_math`
        itself or its fused version."""
        return math(next_token_math)(z, self.ids[rows])


@dataclass
class TeacherLogits:
    """A teacher's final hidden states (N, d) and output weight (V, d): its logits are made a chunk at a
    time beside the student's; `temperature` softens both."""

    hidden: torch.Tensor
    weight: torch.Tensor
    temperature: float = 1.0

    def loss_and_grad(self, z: torch.Tensor, rows: slice, math: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.hidden[rows].to(z.dtype) @ self.weight.to(z.dtype).T  # (n, V)
        return math(teacher_logits_math)(z, y, self.temperature)


@dataclass
class TeacherTopK:
    """A teacher's stored top-k per row: ids (N, k), log-probabilities (N, k), log of the rest's mass (N,)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    log_rest: torch.Tensor

    def loss_and_grad(self, z: torch.Tensor, rows: slice, math: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.ids[rows]
        loss, grad, top = math(teacher_top_k_math)(z, ids, self.logprobs[rows].float(), self.log_rest[rows].float())
        return loss, grad.scatter_(1, ids, top.to(grad.dtype))


class _ChunkedHeadLoss(torch.autograd.Function):
    """Mean over rows of target's loss on logits hidden @ weight.T, a chunk of rows at a time (module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk_rows, compute_dtype, fuse, grad_enabled):  # hidden (N, d), weight (V, d)
        # needs_input_grad follows requires_grad, not the grad mode: under no_grad (evaluation) form no gradient
        need_hidden, need_weight = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        N = hidden.shape[0]
        w = weight.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, N, chunk_rows):
                rows = slice(start, min(start + chunk_rows, N))
                h = hidden[rows].to(compute_dtype)  # (n, d)
                z = h @ w.T  # (n, V), in the compute dtype; the math takes it to fp32
                loss, grad = target.loss_and_grad(z, rows, fused if fuse else _eager)
                total += loss.double()
                del z
                if need_hidden or need_weight:
                    grad = grad.to(compute_dtype)
                    if need_hidden:
                        grad_hidden[rows] = grad @ w  # (n, d)
                    if need_weight:
                        grad_weight += (grad.T @ h).float()  # (V, d)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.rows, ctx.weight_dtype = N, weight.dtype
        return (total / N).to(torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_out / ctx.rows
        return (None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype), None, None, None, None, None)


def _eager(math):
    return math


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, target, chunk_rows: int = CHUNK_ROWS,
              fuse: bool | None = None) -> torch.Tensor:
    """Mean loss of `target` (NextToken, TeacherLogits or TeacherTopK) on the logits hidden @ weight.T,
    hidden (N, d) and weight (V, d), computed `chunk_rows` rows at a time in the autocast dtype (else the
    weight's), softmax and loss in fp32. Differentiable in hidden and weight. `fuse`: run the per-chunk
    math compiled (default: for vocabularies of FUSE_MIN_VOCAB tokens and more)."""
    device = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    if fuse is None:  # inside an outer torch.compile (the trainer's compile: true) that compile fuses it
        fuse = weight.shape[0] >= FUSE_MIN_VOCAB and not torch.compiler.is_compiling()
    return _ChunkedHeadLoss.apply(hidden, weight, target, chunk_rows, compute_dtype, fuse, torch.is_grad_enabled())


def final_hidden(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The final (normalised) hidden states (B, T, d) of a Llama-family causal LM (ours included): what
    its output layer `model.lm_head` reads."""
    return model.model(input_ids=input_ids, use_cache=False).last_hidden_state


class HeadLoss(nn.Module):
    """A causal LM whose forward returns a chunked loss instead of logits, so parallel wrappers (DDP, FSDP)
    and torch.compile see the output layer's weight used inside one forward. `lm` needs `.model` (the
    base model) and `.lm_head`, as Llama-family models and ours have."""

    def __init__(self, lm: nn.Module, chunk_rows: int = CHUNK_ROWS) -> None:
        super().__init__()
        self.lm, self.chunk_rows = lm, chunk_rows

    def forward(self, input_ids: torch.Tensor, target) -> torch.Tensor:
        hidden = final_hidden(self.lm, input_ids)  # (B, T, d)
        return head_loss(hidden.flatten(0, 1), self.lm.lm_head.weight, target, self.chunk_rows)
