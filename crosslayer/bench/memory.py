"""KV-cache memory: analytic bytes next to measured bytes, the largest batch a budget holds, and the
tokens/s decoded at that batch.

Rows: for each preset (random weights), KV dtype (`auto`: the weights' dtype; a float dtype; or the
8-bit `int8` / `fp8` with their scales), batch size and context length, a real prefill fills our
producer-only cache (`ProducerCache`, what `fast_generate` decodes with) and we count the bytes its
tensors hold (`crosslayer.kv.cache_nbytes`), beside the analytic batch x context x
`crosslayer.kv.kv_bytes_per_token`.

Capacity: for each context length, the largest batch that fits `--budget`, searched by allocating
for real (doubling, then bisection): the weights, a cache of that batch x context, and one decode
step at the last position (activations and workspace count). Measured as the allocator's own
figures: on CUDA the peak allocated memory; on a CPU, torch's allocation events (torch.profiler's
memory profiling), i.e. the bytes the allocator handed out building the model plus its peak while
the cache is allocated and the step runs. The analytic answer, floor((budget - weights) / (context x
KV bytes per token)), stands beside it. With `decode_tokens`, each found batch then decodes that
many tokens greedily after a context of random K/V written straight into the cache (a real prefill
of batch x context tokens would take minutes on a CPU and does not change what a decode step does):
the throughput a memory budget buys. The JSON names the machine (`crosslayer.bench.machine`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import CLAConfig
from ..cpu_decode import CPUDecoding
from ..decode import ATTENTION, ProducerCache, attention_implementation, compile_room, compiled, last_logits
from ..device import device_name, dtype_name, kv_storage_dtype, pick_dtype, sync
from ..errors import CrossLayerError
from ..kv import cache_nbytes, kv_bytes_per_token
from ..modeling import CLAForCausalLM
from .machine import machine_fields


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def allocator_bytes(fn: Callable[[], Any]) -> tuple[Any, int, int]:
    """(fn's result, peak bytes, bytes still held) that torch's CPU allocator handed out while fn ran,
    from the allocation events torch.profiler records with `profile_memory=True`."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    allocations = []
    todo = list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        event = todo.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
        todo.extend(event.children)
    held = peak = 0
    for _, size in sorted(allocations):  # sizes are negative for frees
        held += size
        peak = max(peak, held)
    return result, peak, held


def kv_dtype_name(kv_dtype: str, dtype: torch.dtype) -> str:
    """`auto` resolved to the weights' dtype name (bf16, fp32, fp16); other names unchanged."""
    if kv_dtype != "auto":
        return kv_dtype
    return dtype_name(dtype)


def build_model(preset: str, dtype: torch.dtype, device: torch.device, max_len: int) -> tuple[CLAForCausalLM, int]:
    """(model with random weights, bytes its weights and buffers took): measured by the allocator on a
    CPU, counted from the tensors on CUDA (where the peak during the search includes them anyway)."""
    config = CLAConfig.from_preset(preset, max_position_embeddings=max_len, attn_implementation="sdpa")
    torch.manual_seed(0)

    def build() -> CLAForCausalLM:
        with torch.device(device):
            return CLAForCausalLM(config).to(dtype).eval()

    if device.type != "cpu":
        model = build()
        return model, weight_bytes(model) + sum(b.numel() * b.element_size() for b in model.buffers())
    model, _, held = allocator_bytes(build)
    return model, held


@torch.no_grad()
def measured_cache_bytes(model: CLAForCausalLM, batch: int, context: int, kv_dtype: str = "auto") -> int:
    """Bytes the producer cache holds after a real prefill of `batch` x `context` random tokens."""
    param = next(model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=param.device)
    cache = ProducerCache(model.config, batch, context, param.dtype, param.device, kv_dtype=kv_dtype)
    with attention_implementation(model, ATTENTION):
        model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    return cache_nbytes(cache)


def _one_decode_step(model: CLAForCausalLM, batch: int, context: int, kv_dtype: str) -> None:
    """Allocate a full cache of batch x context and run one decode step at its last position."""
    param = next(model.parameters())
    cache = ProducerCache(model.config, batch, context, param.dtype, param.device, static=True, kv_dtype=kv_dtype)
    cache.valid.fill_(True)
    cache.length, cache.decoding = context - 1, True
    ids = torch.zeros(batch, 1, dtype=torch.long, device=param.device)
    positions = torch.full((batch, 1), context - 1, device=param.device)
    with attention_implementation(model, ATTENTION), CPUDecoding().linears(model):
        last_logits(model, cache, ids, positions, cache.next_slot(masked=True))


@torch.no_grad()
def allocation_bytes(model: CLAForCausalLM, batch: int, context: int, kv_dtype: str = "auto",
                     weights: int | None = None) -> int:
    """Memory that serving `batch` sequences of `context` tokens takes, allocated for real: peak
    allocated on CUDA; on a CPU `weights` (bytes `build_model` measured) plus the allocator's peak
    while the cache is allocated and one decode step runs."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        _one_decode_step(model, batch, context, kv_dtype)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    if weights is None:
        raise CrossLayerError("allocation_bytes on a CPU needs the weights' measured bytes (from build_model)")
    _, peak, _ = allocator_bytes(lambda: _one_decode_step(model, batch, context, kv_dtype))
    return weights + peak


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


def _fits(model: CLAForCausalLM, context: int, budget: int, kv_dtype: str = "auto",
          weights: int | None = None) -> Callable[[int], bool]:
    def fits(batch: int) -> bool:
        try:
            return allocation_bytes(model, batch, context, kv_dtype, weights) <= budget
        except torch.OutOfMemoryError:
            return False
    return fits


@torch.no_grad()
def decode_throughput(model: CLAForCausalLM, batch: int, context: int, new_tokens: int, kv_dtype: str = "auto",
                      compile: bool = False, cpu: CPUDecoding | None = None) -> float:
    """Greedy decode tokens/s (summed over the batch) of `new_tokens` steps after `context - new_tokens`
    tokens of random K/V written into a `batch`-row cache (the work of a decode step does not depend
    on the values it reads). `cpu`: the oneDNN and compile state on a CPU (default a new one)."""
    param = next(model.parameters())
    config, device = model.config, param.device
    prompt = context - new_tokens
    if prompt < 1:
        raise CrossLayerError(f"decode_tokens ({new_tokens}) must be smaller than the context ({context})")
    cache = ProducerCache(config, batch, context, param.dtype, device, static=compile, kv_dtype=kv_dtype)
    generator = torch.Generator(device).manual_seed(0)
    for layer in config.producer_layers:  # K/V of the prompt: N(0, 1) values, quantised as any write
        shape = (batch, config.num_key_value_heads, prompt, config.head_dim)
        k, v = (torch.randn(shape, generator=generator, device=device, dtype=param.dtype) for _ in range(2))
        cache.update(k, v, layer)
    cache.valid[:, :prompt] = True
    cache.length, cache.decoding = prompt, True
    tok = torch.randint(0, config.vocab_size, (batch, 1), generator=generator, device=device)
    positions = torch.full((batch, 1), prompt, device=device)

    def step(ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return last_logits(model, cache, ids, position_ids, mask)

    cpu = cpu or CPUDecoding()
    run = compiled(step, device, model, cpu) if compile else step
    with attention_implementation(model, ATTENTION), cpu.linears(model, rows=batch), compile_room():
        for i in range(new_tokens):
            if i == 1:  # the first step (compilation, first touches) is not timed
                sync(device)
                start = time.perf_counter()
            tok = run(tok, positions, cache.next_slot(masked=False)).argmax(-1, keepdim=True)  # (B, 1)
            cache.length += 1
            positions = positions + 1
        sync(device)
    return batch * (new_tokens - 1) / (time.perf_counter() - start)


def run_memory(presets: list[str], batch_sizes: list[int], contexts: list[int], budget: int | None, dtype: str,
               device: torch.device, kv_dtypes: list[str] = ("auto",), decode_tokens: int = 0,
               compile: bool = False) -> dict:
    """Measured vs analytic KV bytes; with `budget`, the largest batch per preset x KV dtype x context,
    and with `decode_tokens` (>= 2) the decode tokens/s at that batch (`compile`: compiled decode step)."""
    torch_dtype = pick_dtype(dtype, device)
    for kv_dtype in kv_dtypes:
        kv_storage_dtype(kv_dtype, torch_dtype)  # a bad name fails before any model is built
    if decode_tokens == 1 or (decode_tokens and decode_tokens >= min(contexts)):
        raise CrossLayerError(f"decode_tokens must be >= 2 and smaller than every context length, got {decode_tokens}")
    rows, capacity = [], []
    cpu = CPUDecoding()  # one for the run: each model's compiled steps stay compiled
    for preset in presets:
        model, weights = build_model(preset, torch_dtype, device, max(contexts))
        for kv_dtype in kv_dtypes:
            name = kv_dtype_name(kv_dtype, torch_dtype)
            per_token = kv_bytes_per_token(model.config, name)
            for t in contexts:
                for b in batch_sizes:
                    rows.append({"preset": preset, "kv_dtype": name, "batch": b, "context": t,
                                 "analytic_bytes": b * t * per_token,
                                 "measured_bytes": measured_cache_bytes(model, b, t, kv_dtype)})
                if budget is None:
                    continue
                analytic = max(0, (budget - weight_bytes(model)) // (t * per_token))
                found = largest_batch(_fits(model, t, budget, kv_dtype, weights), limit=max(1, 4 * analytic + 4))
                entry = {"preset": preset, "kv_dtype": name, "context": t, "budget_bytes": budget,
                         "largest_batch": found, "analytic_largest_batch": int(analytic), "weight_bytes": weights,
                         "kv_bytes_per_token": per_token}
                if found:
                    entry["allocated_bytes"] = allocation_bytes(model, found, t, kv_dtype, weights)
                if decode_tokens and found:
                    entry["decode_tokens_per_s"] = decode_throughput(model, found, t, decode_tokens, kv_dtype, compile, cpu)
                capacity.append(entry)
        del model
    return {"benchmark": "memory", "device": device_name(device), "dtype": dtype, "torch": torch.__version__,
            "rows": rows, "capacity": capacity, "decode_tokens": decode_tokens, "decode_compiled": compile,
            **machine_fields(device)}


def plot(result: dict, presets: list[str], path: str | Path) -> None:
    """KV bytes against context length, one line per preset and KV dtype (batch 1, analytic), measured
    points on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for preset in presets:
        for kv_dtype in dict.fromkeys(r["kv_dtype"] for r in result["rows"]):
            rows = [r for r in result["rows"] if r["preset"] == preset and r["kv_dtype"] == kv_dtype]
            contexts = sorted({r["context"] for r in rows})
            per_token = rows[0]["analytic_bytes"] / (rows[0]["batch"] * rows[0]["context"])
            line, = ax.plot(contexts, [per_token * t / 2**20 for t in contexts], label=f"{preset} {kv_dtype}")
            ax.scatter([r["context"] for r in rows], [r["measured_bytes"] / r["batch"] / 2**20 for r in rows],
                       color=line.get_color(), marker="o", s=18)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("KV cache per sequence (MiB)")
    ax.set_title("KV memory: lines analytic, points measured", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
