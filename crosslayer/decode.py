"""Fast decoding: a preallocated cache that holds producer layers only, and a lean generation loop.

`ProducerCache(config, batch, max_len)` allocates K and V once, one (B, Hkv, L, hd) tensor each per
producer layer: consumer layers get no storage at all, so a CLA2 cache is half its CLA1 twin's. The
model's own forward writes into it through `update(k, v, layer_idx)` (the same call it makes on a
transformers cache), so there is one forward pass, not a second copy of the model.

The cache may store K/V in another dtype than the model computes in (`kv_dtype`): a 16-bit cache
beside fp32 weights, or an 8-bit one (`int8`, `fp8`; values and scales, `crosslayer.quant`). The
prompt (and any chunk fed at once) attends to itself in full precision and to earlier tokens as
stored; a one-token decode step reads the 8-bit K/V as they are and dequantises them inside the
attention. Consumers read their producer's K/V, so they read the same 8-bit values.

`fast_generate` prefills the prompt in one forward, then decodes token by token with
  - a boolean key mask the loop keeps itself (left padding, then one slot per new token), so no
    mask is rebuilt per step;
  - an attention kernel for one-token steps that folds each K/V head's query group into the query
    axis (B, Hkv, G, hd): every K/V head is read once for its whole group, nothing is repeated;
  - either slices of the cache up to the current length (eager; the least work on a CPU), or, with
    `static=True`, the full fixed-size cache with the mask doing the rest, so every step has the
    same shapes and `torch.compile` (CUDA graphs on a GPU) can capture it.
Greedy decoding equals transformers' `generate` over a dynamic cache token for token.

On a CPU the model's linear layers run through oneDNN for the duration where that is faster, and a
compiled step freezes the weights in and lets inductor autotune the GEMMs (`crosslayer.cpu_decode`: the
state of that layer is a `CPUDecoding` object the caller owns; `fast_generate` makes one per call unless
given one to reuse).

`chunked_nll` scores a token stream through the same cache, a chunk at a time, so the quality of a
quantised cache is measured where the cache is read.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .config import CLAConfig
from .cpu_decode import CPUDecoding
from .device import kv_storage_dtype, sync
from .errors import CrossLayerError
from .modeling import CLAForCausalLM
from .quant import GRANULARITIES, KV_FORMATS, SCALE_DTYPE, QuantizedKV, channel_scale, quantize

ATTENTION = "crosslayer_decode"
# an 8-bit K (or V) is cast to the compute dtype in blocks of rows: a 1/16 of them, at least 256 KiB of cast values
DEQUANT_BLOCKS, DEQUANT_MIN_BYTES = 16, 256 << 10


def decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | QuantizedKV,
    value: torch.Tensor | QuantizedKV,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA that never repeats K/V. Mask: boolean, True = attend, broadcastable to (B, 1, T, S).
    K/V may be 8-bit (`QuantizedKV`, from a quantised ProducerCache)."""
    B, H, T, hd = query.shape
    quantized = isinstance(key, QuantizedKV)
    Hkv = key.values.shape[1] if quantized else key.shape[1]
    if T == 1 and quantized:
        q = query.view(B, Hkv, H // Hkv, hd)  # (B, Hkv, G, hd)
        return _attend_8bit(q, key, value, attention_mask, scaling).reshape(B, 1, H, hd), None  # (B, T=1, H, hd)
    if quantized:
        key, value = key.dequantize(query.dtype), value.dequantize(query.dtype)
    if T == 1 and H != Hkv:  # one new token: the G query heads of a K/V head become G query rows
        q = query.view(B, Hkv, H // Hkv, hd)  # (B, Hkv, G, hd)
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scaling)  # (B, Hkv, G, hd)
        return out.reshape(B, 1, H, hd), None  # (B, T=1, H, hd)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                         is_causal=attention_mask is None and T > 1, enable_gqa=H != Hkv)
    return out.transpose(1, 2), None  # (B, T, H, hd)


def _attend_8bit(q: torch.Tensor, key: QuantizedKV, value: QuantizedKV, mask: torch.Tensor | None,
                 scaling: float) -> torch.Tensor:
    """One-token attention over 8-bit K/V, dequantised on the way: the key scales multiply the scores
    (per token) or the query (per channel), the value scales multiply the probabilities; only the 8-bit
    values are cast, a block of rows at a time (1/DEQUANT_BLOCKS of them, or DEQUANT_MIN_BYTES' worth), so
    the transient copy stays a small part of the cache. q (B, Hkv, G, hd) -> (B, Hkv, G, hd)."""
    B, Hkv, S, hd = key.values.shape
    rows = max(-(-B // DEQUANT_BLOCKS), DEQUANT_MIN_BYTES // (Hkv * S * hd * q.element_size()), 1)
    if rows < B:
        return torch.cat([
            _attend_8bit(q[i:i + rows], QuantizedKV(*(t[i:i + rows] for t in key)),
                         QuantizedKV(*(t[i:i + rows] for t in value)), None if mask is None else mask[i:i + rows],
                         scaling) for i in range(0, B, rows)])
    dtype = q.dtype
    k_scale = key.scale.to(dtype)
    if k_scale.shape[-1] == 1:  # per token: (B, Hkv, S, 1) -> (B, Hkv, 1, S), scales each score column
        scores = torch.matmul(q, key.values.to(dtype).transpose(-1, -2)) * (k_scale.transpose(-1, -2) * scaling)
    else:  # per channel: (B, Hkv, 1, hd) scales the query's channels
        scores = torch.matmul(q * (k_scale * scaling), key.values.to(dtype).transpose(-1, -2))  # (B, Hkv, G, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # mask (B, 1, 1, S)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)  # (B, Hkv, G, S)
    v_scale = value.scale.to(dtype).transpose(-1, -2)  # (B, Hkv, 1, S)
    return torch.matmul(probs * v_scale, value.values.to(dtype))  # (B, Hkv, G, hd)


class ProducerCache:
    """K/V of the producer layers only, preallocated for `batch` sequences of up to `max_len` tokens.

    `length` is the number of positions written (the same for every row: prompts are left-padded).
    `dtype` is what the model computes in; `kv_dtype` what K/V are stored as (`auto`: the same;
    `fp32`, `bf16`, `fp16`; or 8-bit `int8` / `fp8` with float16 scales, one per token and K/V head,
    or for keys with `k_granularity="channel"` one per channel, set by the first write).
    Writing a chunk of T tokens returns what its attention reads: itself in full precision and the
    earlier tokens as stored. Once `decoding` is set, a one-token step returns the stored K/V as
    they are (`QuantizedKV` for 8-bit): in static mode it writes at `pos` (a one-element tensor the
    loop updates in place) and returns the whole buffer; otherwise slices up to the current length.
    """

    is_compileable = True

    def __init__(self, config: CLAConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str, static: bool = False, kv_dtype: str | None = None,
                 k_granularity: str = "token") -> None:
        if k_granularity not in GRANULARITIES:
            raise CrossLayerError(f"k_granularity must be one of {', '.join(GRANULARITIES)}; got {k_granularity!r}")
        producers = config.producer_layers
        self.slot = {layer: i for i, layer in enumerate(producers)}
        P, Hkv, hd = len(producers), config.num_key_value_heads, config.head_dim
        self.dtype = dtype
        self.format = KV_FORMATS.get(kv_dtype) if kv_dtype else None
        self.k_granularity = k_granularity if self.format else "token"
        shape = (batch, Hkv, max_len, hd)
        stored = kv_storage_dtype(kv_dtype, dtype)
        if stored == torch.float8_e4m3fn:
            stored = torch.uint8  # fp8 values are stored as their bytes (see _stored)
        self.stored_dtype = stored

        def buffers(shape: tuple, dtype: torch.dtype) -> list[torch.Tensor]:
            # one tensor per producer, not one (P, ...) tensor: a compiled step's write into a slice of a
            # shared buffer was functionalised into a copy of all of it per layer (O(P^2) bytes a step)
            return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(P)]

        self.keys, self.values = buffers(shape, stored), buffers(shape, stored)  # P x (B, Hkv, L, hd)
        self.key_scales = self.value_scales = None
        tensors = [*self.keys, *self.values]
        if self.format is not None:
            k_scale_shape = (batch, Hkv, 1, hd) if self.k_granularity == "channel" else (batch, Hkv, max_len, 1)
            self.key_scales = buffers(k_scale_shape, SCALE_DTYPE)
            self.value_scales = buffers((batch, Hkv, max_len, 1), SCALE_DTYPE)
            tensors += [*self.key_scales, *self.value_scales]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # key slots holding real tokens
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # static mode: the slot being written
        if torch.device(device).type == "cuda":
            for t in (*tensors, self.valid, self.pos):
                # fixed addresses: CUDA graphs may then capture the in-place writes instead of skipping the graph
                # (not on a CPU: there the compiled step freezes static inputs in as constants, see `compiled`)
                torch._dynamo.mark_static_address(t)
        self.batch, self.max_len, self.static = batch, max_len, static
        self.length = 0
        self.decoding = False  # True once the prompt is in: one-token steps read K/V as stored

    @property
    def layers(self) -> list:
        """For `crosslayer.kv.cache_nbytes`: one entry holding every producer's K/V (and scales)."""
        return [self]

    def reset(self) -> None:
        """Empty the cache for a new batch of prompts (the storage is kept)."""
        self.length, self.decoding = 0, False
        self.valid.zero_()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def next_slot(self, masked: bool) -> torch.Tensor | None:
        """Open slot `length` for a one-token step and return that step's boolean key mask: the whole
        buffer's (B, 1, 1, L) in static mode, else up to the slot, or None where nothing is masked.
        The caller advances `length` after the step."""
        s = self.length
        self.valid[:, s] = True
        if self.static:
            self.pos.fill_(s)
            return self.valid[:, None, None, :]  # (B, 1, 1, L): unwritten slots are False
        return self.valid[:, None, None, :s + 1] if masked else None

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store the new K/V (B, Hkv, T, hd) of a producer; return what its attention reads (B, Hkv, S, hd)."""
        s = self.slot[layer_idx]
        if self.static and self.decoding:
            self._write(s, k, v, self.pos)
            return self._stored(s, self.max_len)
        start, T = self.length, k.shape[2]
        self._write(s, k, v, slice(start, start + T))
        if self.decoding or self.stored_dtype == self.dtype:  # stored exactly as computed: read it back
            return self._stored(s, start + T)
        if start == 0:
            return k, v
        past_k, past_v = self._stored(s, start)
        if self.format is not None:
            past_k, past_v = past_k.dequantize(self.dtype), past_v.dequantize(self.dtype)
        return torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B, Hkv, start + T, hd)

    def _write(self, s: int, k: torch.Tensor, v: torch.Tensor, where: slice | torch.Tensor) -> None:
        """Write K/V (B, Hkv, T, hd) of producer slot s at `where` (a slice, or the index tensor `pos`)."""
        if self.format is None:
            self._put(self.keys[s], k.to(self.stored_dtype), where)
            self._put(self.values[s], v.to(self.stored_dtype), where)
            return
        if self.k_granularity == "channel":
            if not self.decoding and self.length == 0:  # the prompt sets the channel scales
                self.key_scales[s].copy_(channel_scale(k, self.format))
            kq, _ = quantize(k, self.format, self.key_scales[s])
        else:
            kq, k_scale = quantize(k, self.format)  # (B, Hkv, T, hd), (B, Hkv, T, 1)
            self._put(self.key_scales[s], k_scale, where)
        vq, v_scale = quantize(v, self.format)
        self._put(self.keys[s], kq, where)
        self._put(self.values[s], vq, where)
        self._put(self.value_scales[s], v_scale, where)

    @staticmethod
    def _put(buffer: torch.Tensor, x: torch.Tensor, where: slice | torch.Tensor) -> None:
        if x.dtype == torch.float8_e4m3fn:  # stored as its bytes (see _stored)
            x = x.view(torch.uint8)
        if isinstance(where, slice):
            buffer[:, :, where] = x
        else:
            buffer.index_copy_(2, where, x)

    def _stored(self, s: int, end: int):
        """K and V of producer slot s at positions [0, end) as stored: tensors in the model's dtype
        (views when stored in it), or `QuantizedKV`."""
        keys, values = self.keys[s][:, :, :end], self.values[s][:, :, :end]  # (B, Hkv, end, hd)
        if self.format is None:
            return keys.to(self.dtype), values.to(self.dtype)
        if self.format.dtype == torch.float8_e4m3fn:
            # fp8 is kept as bytes: torch has no CPU index_copy for it, and inductor compiles uint8 writes
            keys, values = keys.view(self.format.dtype), values.view(self.format.dtype)
        k_scale = self.key_scales[s] if self.k_granularity == "channel" else self.key_scales[s][:, :, :end]
        return QuantizedKV(keys, k_scale), QuantizedKV(values, self.value_scales[s][:, :, :end])


@functools.cache
def _register_decode_attention() -> None:
    """Make `decode_attention` a kernel transformers' models look up by the name ATTENTION (once a process)."""
    AttentionInterface.register(ATTENTION, decode_attention)


@contextmanager
def attention_implementation(model: torch.nn.Module, name: str):
    """Run `model` with another registered attention kernel (ATTENTION is registered here at its first use),
    restoring the old one afterwards."""
    if name == ATTENTION:
        _register_decode_attention()
    config = model.config
    old = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = old


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V): greedy at temperature 0, else
    temperature-scaled sampling restricted to the top-k tokens and the top-p probability mass."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # tokens after the mass is reached; the first always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@dataclass
class Generation:
    sequences: torch.Tensor  # (B, prompt + new): the prompts (left-padded) and what was generated
    cache: ProducerCache
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    step_times: list[float] = field(default_factory=list)  # wall clock after each new token (s since start)
    logits: torch.Tensor | None = None  # (B, new, V) with output_logits: what each new token was chosen from


def _check_model(model: torch.nn.Module) -> None:
    if not isinstance(model, CLAForCausalLM):
        raise CrossLayerError(f"the fast decoding path needs a crosslayer model, got {type(model).__name__}; "
                              "convert a Llama-family checkpoint first (crosslayer.convert.from_hf)")


def last_logits(model: torch.nn.Module, cache: ProducerCache, ids: torch.Tensor, position_ids: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
    """Logits (B, V) of the last position after feeding `ids` (B, T) through the model into `cache`;
    run it under `attention_implementation(model, ATTENTION)`."""
    out = model(input_ids=ids, position_ids=position_ids, attention_mask=mask, cache=cache, use_cache=True,
                logits_to_keep=1)
    return out.logits[:, -1]


def compiled(step: Callable, device: torch.device, model: torch.nn.Module, cpu: CPUDecoding | None = None) -> Callable:
    """`torch.compile` of a decode step of `model`, whole graph: CUDA graphs on a GPU; on a CPU
    `cpu.compile` (inductor's CPU options, the weights frozen in; `cpu` default: a new `CPUDecoding`, which
    reuses no step compiled before it). Call it inside `compile_room()`, under `torch.no_grad()`."""
    if device.type == "cuda":
        return torch.compile(step, mode="reduce-overhead", fullgraph=True)
    return (cpu or CPUDecoding()).compile(step, model)


@contextmanager
def compile_room(graphs: int = 64):
    """Let one decode step keep `graphs` compiled graphs (dynamo's default is 8): it compiles one per model,
    cache dtype and batch shape, and a benchmark or a server meets many."""
    with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, graphs)):
        yield


@torch.no_grad()
def fast_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int = 0,
    generator: torch.Generator | None = None,
    static: bool = False,
    compile: bool = False,
    streamer=None,
    cache: ProducerCache | None = None,
    kv_dtype: str | None = None,
    k_granularity: str = "token",
    output_logits: bool = False,
    cpu: CPUDecoding | None = None,
) -> Generation:
    """Decode up to `max_new_tokens` after left-padded prompts `input_ids` (B, T) with `attention_mask`
    (1 = token, 0 = padding; right padding, an empty row, or prompt + max_new_tokens beyond the model's
    max_position_embeddings are refused before any work). `compile=True` compiles the decode step (implies
    static shapes; CUDA graphs on a GPU; on a CPU frozen weights and autotuned GEMMs, see `compiled`: a
    step compiled before the weights changed is dropped, not reused). `kv_dtype`: how the cache stores K/V
    (`ProducerCache`; default the model's dtype). `cpu`: the oneDNN and compile state on a CPU
    (`CPUDecoding`): pass the same one to successive calls to reuse their compiled step; default a new
    one, which reuses no step compiled before it.
    Rows that reach an EOS id are padded from then on; all finished -> stop. `output_logits`: keep the
    logits each new token was chosen from (`Generation.logits`)."""
    real = _check_prompts(model, input_ids, attention_mask, max_new_tokens)
    B, T = input_ids.shape
    device = input_ids.device
    static = static or compile
    cache = _decode_cache(model, cache, B, T + max_new_tokens, device, static, kv_dtype, k_granularity)
    cpu = cpu or CPUDecoding()
    padded = not bool(real.all())
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []), device=device)

    def forward(ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return last_logits(model, cache, ids, position_ids, mask)

    step = compiled(forward, device, model, cpu) if compile else forward

    with attention_implementation(model, ATTENTION), cpu.linears(model, rows=B), compile_room():
        sync(device)
        start = time.perf_counter()
        logits, next_pos = _prefill(forward, cache, input_ids, real, padded)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        tokens, times, kept = _decode_loop(
            step, cache, logits, next_pos, max_new_tokens, start=start, masked=padded,
            sample=functools.partial(sample_next, temperature=temperature, top_k=top_k, top_p=top_p,
                                     generator=generator),
            eos=eos, pad_token_id=pad_token_id, streamer=streamer, output_logits=output_logits)
        if streamer is not None:
            streamer.end()
    sequences = torch.cat([input_ids, *tokens], dim=1)  # (B, T + new)
    decode = times[-1] - times[0] if len(times) > 1 else 0.0
    return Generation(sequences, cache, prefill_seconds=times[0], decode_seconds=decode, step_times=times,
                      logits=torch.stack(kept, dim=1) if output_logits else None)


def _check_prompts(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   max_new_tokens: int) -> torch.Tensor:
    """`fast_generate`'s checks, before any work; returns the prompts' token mask (B, T), True = token."""
    _check_model(model)
    if max_new_tokens < 1:
        raise CrossLayerError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if bool((~real[:, 1:] & real[:, :-1]).any()) or not bool(real[:, -1].all()):
        raise CrossLayerError("fast_generate needs left-padded prompts (attention_mask 0s before a row's tokens, "
                              "never after them, and no empty row); pad on the left (tokenizer.padding_side = 'left')")
    longest = int(real.sum(-1).max())
    limit = model.config.max_position_embeddings
    if longest + max_new_tokens > limit:
        raise CrossLayerError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                              f"max_position_embeddings ({limit}); shorten the prompt or max_new_tokens")
    return real


def _decode_cache(model: torch.nn.Module, cache: ProducerCache | None, batch: int, max_len: int,
                  device: torch.device, static: bool, kv_dtype: str | None, k_granularity: str) -> ProducerCache:
    """A new cache for `batch` x `max_len` tokens in the model's dtype, or the given one (if it fits), emptied."""
    if cache is None:
        dtype = next(model.parameters()).dtype
        cache = ProducerCache(model.config, batch, max_len, dtype, device, static=static, kv_dtype=kv_dtype,
                              k_granularity=k_granularity)
    elif cache.batch != batch or cache.max_len < max_len or cache.static != static:
        raise CrossLayerError(f"cache is for batch {cache.batch} x {cache.max_len} tokens (static={cache.static}); "
                              f"need {batch} x {max_len} (static={static})")
    cache.reset()
    return cache


def _prefill(forward: Callable, cache: ProducerCache, input_ids: torch.Tensor, real: torch.Tensor,
             padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed the prompts (B, T) with token mask `real` into the cache in one forward; (logits of their last
    position (B, V), the position of each row's first new token (B, 1))."""
    T = input_ids.shape[1]
    device = input_ids.device
    # causal, padding keys masked, and every position sees itself (so padding rows stay finite)
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)  # (B, T), as transformers numbers left-padded rows
    mask = None
    if padded:
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        mask = (causal & real[:, None, None, :]) | torch.eye(T, dtype=torch.bool, device=device)  # (B, 1, T, T)
    logits = forward(input_ids, positions, mask)
    cache.valid[:, :T] = real
    cache.length, cache.decoding = T, True
    return logits, positions[:, -1:] + 1  # (B, V), (B, 1)


def _decode_loop(step: Callable, cache: ProducerCache, logits: torch.Tensor, next_pos: torch.Tensor, new_tokens: int, *,
                 start: float, masked: bool, sample: Callable, eos: torch.Tensor, pad_token_id: int, streamer,
                 output_logits: bool) -> tuple[list[torch.Tensor], list[float], list[torch.Tensor]]:
    """Sample a token per row from `logits`, feed it through `step`, repeat: up to `new_tokens` tokens, fewer
    once every row has emitted an EOS id (a row is padded after its own). Returns the new tokens (B, 1)
    each, the wall clock after each (s since `start`) and, with `output_logits`, what each was chosen from."""
    device = logits.device
    finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)
    tokens, times, kept = [], [], []
    for i in range(new_tokens):
        if output_logits:
            kept.append(logits.clone())
        tok = sample(logits)  # (B,)
        if eos.numel():
            tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
            finished |= torch.isin(tok, eos)
        tokens.append(tok[:, None])
        sync(device)
        times.append(time.perf_counter() - start)
        if streamer is not None:
            streamer.put(tok.cpu())
        if i == new_tokens - 1 or (eos.numel() and bool(finished.all())):
            break
        mask = cache.next_slot(masked=masked)
        logits = step(tok[:, None], next_pos, mask)
        cache.length += 1
        next_pos = next_pos + 1
    return tokens, times, kept


# ----------------------------------------------------------------------------------------------
# Scoring text through the cache


@torch.no_grad()
def chunked_nll(model: torch.nn.Module, stream: torch.Tensor, segment: int, chunk: int, kv_dtype: str | None = None,
                k_granularity: str = "token", batch_size: int = 8, prefill: int = 0,
                progress=None) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods (nats) over `stream` and the number of tokens scored.

    The stream is cut into segments of `segment` tokens (independent sequences, batched); each is fed
    through a `ProducerCache` storing `kv_dtype`, `chunk` tokens at a time, so chunk j attends to the
    cache's K/V of chunks 0..j-1 as stored (quantised) and to itself in full precision. With chunk 1
    every token after the first is a decode step exactly as in `fast_generate` (its own K/V stored,
    then read back with the rest). `prefill`: the first tokens of each segment fed at once, as a
    prompt (they attend to each other in full precision and calibrate per-channel key scales). Every
    token of a segment but its first is scored. `progress`: called with the number of segments done."""
    _check_model(model)
    if segment < 2 or chunk < 1 or not 0 <= prefill < segment:
        raise CrossLayerError(f"need segment >= 2, chunk >= 1 and 0 <= prefill < segment; got segment {segment}, "
                              f"chunk {chunk}, prefill {prefill}")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    n = len(stream) // segment * segment
    if n == 0:
        raise CrossLayerError(f"the stream has {len(stream)} tokens, fewer than one segment of {segment}")
    rows = stream[:n].view(-1, segment)  # (segments, segment)
    total, count = 0.0, 0
    with attention_implementation(model, ATTENTION), CPUDecoding().linears(model):
        for first in range(0, len(rows), batch_size):
            batch = rows[first:first + batch_size].to(device)  # (B, segment)
            cache = ProducerCache(model.config, len(batch), segment, dtype, device, kv_dtype=kv_dtype,
                                  k_granularity=k_granularity)
            starts = [0] + list(range(prefill, segment, chunk)) if prefill else list(range(0, segment, chunk))
            for start, end in zip(starts, starts[1:] + [segment], strict=True):
                ids = batch[:, start:end]  # (B, c)
                c = ids.shape[1]
                positions = torch.arange(start, start + c, device=device)[None]  # (1, c)
                mask = None if cache.decoding else \
                    torch.ones(c, start + c, dtype=torch.bool, device=device).tril(start)[None, None]  # (1, 1, c, S)
                logits = model(input_ids=ids, position_ids=positions, attention_mask=mask, cache=cache,
                               use_cache=True).logits.float()  # (B, c, V)
                cache.length, cache.decoding = start + c, chunk == 1
                targets = batch[:, start + 1:start + c + 1]  # the segment's last token predicts nothing
                logprobs = torch.log_softmax(logits[:, :targets.shape[1]], dim=-1)
                total -= logprobs.gather(-1, targets.unsqueeze(-1)).double().sum().item()
                count += targets.numel()
            if progress is not None:
                progress(len(batch))
    if not math.isfinite(total):
        raise CrossLayerError("the negative log-likelihood is not finite")
    return total, count
