"""KV-cache memory: analytic bytes next to measured bytes, and the largest batch a budget holds.

For each preset (random weights) and each batch size x context length, a real prefill fills a cache
and we count the bytes its tensors hold (`crosslayer.kv.cache_nbytes`); on CUDA also the peak
allocated memory. For each context length, the largest batch that fits `--budget` is searched by
allocating for real: the weights, a preallocated cache of producers only (transformers' StaticCache,
which gives consumer layers no storage), and on CUDA one decode step, compared with the budget
(bytes held on CPU, peak allocated on CUDA). The analytic answer, floor((budget - weights) / (context
x KV bytes per token)), stands beside it. Prints a table, writes a PNG of KV bytes against context
length, ends with one JSON line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..config import CLAConfig
from ..kv import cache_nbytes
from ..modeling import CLAForCausalLM
from ..runtime import pick_dtype


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@torch.no_grad()
def measured_cache_bytes(model: CLAForCausalLM, batch: int, context: int) -> int:
    """Bytes the cache holds after a real prefill of `batch` x `context` random tokens."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    return cache_nbytes(model(input_ids=ids, use_cache=True, logits_to_keep=1).cache)


@torch.no_grad()
def allocation_bytes(model: CLAForCausalLM, batch: int, context: int) -> int:
    """Memory that serving `batch` sequences of `context` tokens takes, allocated for real."""
    from transformers import StaticCache

    config, param = model.config, next(model.parameters())
    if param.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(param.device)
    cache = StaticCache(config=config, max_cache_len=context)
    cache.early_initialization(batch, config.num_key_value_heads, config.head_dim, param.dtype, param.device)
    held = weight_bytes(model) + cache_nbytes(cache)
    if param.device.type == "cuda":  # one decode step at the last position: activations and workspace too
        ids = torch.zeros(batch, 1, dtype=torch.long, device=param.device)
        pos = torch.full((batch, 1), context - 1, device=param.device)
        model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize(param.device)
        held = torch.cuda.max_memory_allocated(param.device)
    del cache
    return held


def largest_batch(fits: Callable[[int], bool], limit: int = 1 << 20) -> int:
    """The largest b >= 0 with fits(b), for a monotone `fits` (doubling, then bisection)."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _fits(model: CLAForCausalLM, context: int, budget: int) -> Callable[[int], bool]:
    def fits(batch: int) -> bool:
        try:
            return allocation_bytes(model, batch, context) <= budget
        except torch.OutOfMemoryError:
            return False
    return fits


def run_memory(presets: list[str], batch_sizes: list[int], contexts: list[int], budget: int | None, dtype: str,
               device: torch.device) -> dict:
    torch_dtype = pick_dtype(dtype, device)
    element_bytes = torch.empty((), dtype=torch_dtype).element_size()
    rows, capacity = [], []
    for preset in presets:
        config = CLAConfig.from_preset(preset, max_position_embeddings=max(contexts), attn_implementation="sdpa")
        torch.manual_seed(0)
        model = CLAForCausalLM(config).to(device=device, dtype=torch_dtype).eval()
        per_token = config.kv_bytes_per_token(element_bytes)
        for t in contexts:
            for b in batch_sizes:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                measured = measured_cache_bytes(model, b, t)
                row = {"preset": preset, "batch": b, "context": t, "analytic_bytes": b * t * per_token,
                       "measured_bytes": measured}
                if device.type == "cuda":
                    row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
                rows.append(row)
            if budget is not None:
                analytic = max(0, (budget - weight_bytes(model)) // (t * per_token))
                found = largest_batch(_fits(model, t, budget), limit=max(1, 4 * analytic + 4))
                capacity.append({"preset": preset, "context": t, "budget_bytes": budget, "largest_batch": found,
                                 "analytic_largest_batch": int(analytic), "weight_bytes": weight_bytes(model)})
        del model
    return {"benchmark": "memory", "device": str(device), "dtype": dtype, "rows": rows, "capacity": capacity}


def plot(result: dict, presets: list[str], path: str | Path) -> None:
    """KV bytes against context length, one line per preset (batch 1, analytic), measured points on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for preset in presets:
        rows = [r for r in result["rows"] if r["preset"] == preset]
        contexts = sorted({r["context"] for r in rows})
        per_token = rows[0]["analytic_bytes"] / (rows[0]["batch"] * rows[0]["context"])
        line, = ax.plot(contexts, [per_token * t / 2**20 for t in contexts], label=preset)
        ax.scatter([r["context"] for r in rows], [r["measured_bytes"] / r["batch"] / 2**20 for r in rows],
                   color=line.get_color(), marker="o", s=18)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"KV cache per sequence (MiB, {result['dtype']})")
    ax.set_title("KV memory: lines analytic, points measured", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
