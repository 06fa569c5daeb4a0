"""Fast decoding: a preallocated cache that holds producer layers only, and a lean generation loop.

`ProducerCache(config, batch, max_len)` allocates K and V once, as one (producers, B, Hkv, L, hd)
tensor each: consumer layers get no storage at all, so a CLA2 cache is half its CLA1 twin's. The
model's own forward writes into it through `update(k, v, layer_idx)` (the same call it makes on a
transformers cache), so there is one forward pass, not a second copy of the model.

`fast_generate` prefills the prompt in one forward, then decodes token by token with
  - a boolean key mask the loop keeps itself (left padding, then one slot per new token), so no
    mask is rebuilt per step;
  - an attention kernel for one-token steps that folds each K/V head's query group into the query
    axis (B, Hkv, G, hd): every K/V head is read once for its whole group, nothing is repeated;
  - either slices of the cache up to the current length (eager; the least work on a CPU), or, with
    `static=True`, the full fixed-size cache with the mask doing the rest, so every step has the
    same shapes and `torch.compile` (CUDA graphs on a GPU) can capture it.
Greedy decoding equals transformers' `generate` over a dynamic cache token for token.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .config import CLAConfig
from .errors import CrossLayerError

ATTENTION = "crosslayer_decode"


def decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA that never repeats K/V. Mask: boolean, True = attend, broadcastable to (B, 1, T, S)."""
    B, H, T, hd = query.shape
    Hkv = key.shape[1]
    if T == 1 and H != Hkv:  # one new token: the G query heads of a K/V head become G query rows
        q = query.view(B, Hkv, H // Hkv, hd)  # (B, Hkv, G, hd)
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scaling)  # (B, Hkv, G, hd)
        return out.reshape(B, 1, H, hd), None  # (B, T=1, H, hd)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                         is_causal=attention_mask is None and T > 1, enable_gqa=H != Hkv)
    return out.transpose(1, 2), None  # (B, T, H, hd)


AttentionInterface.register(ATTENTION, decode_attention)


class ProducerCache:
    """K/V of the producer layers only, preallocated for `batch` sequences of up to `max_len` tokens.

    `length` is the number of positions written (the same for every row: prompts are left-padded).
    In static mode a decode step writes at `pos` (a one-element tensor the loop updates in place) and
    returns the whole buffer; otherwise it writes and returns slices up to the current length.
    """

    is_compileable = True

    def __init__(self, config: CLAConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str, static: bool = False) -> None:
        producers = config.producer_layers
        self.slot = {layer: i for i, layer in enumerate(producers)}
        shape = (len(producers), batch, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # (P, B, Hkv, L, hd)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # key slots holding real tokens
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # static mode: the slot being written
        for t in (self.keys, self.values, self.valid, self.pos):
            # fixed addresses: CUDA graphs may then capture the in-place writes instead of skipping the graph
            torch._dynamo.mark_static_address(t)
        self.batch, self.max_len, self.static = batch, max_len, static
        self.length = 0
        self.decoding = False  # static mode: True once the prompt is in, so one-token steps write at `pos`

    @property
    def layers(self) -> list:
        """For `crosslayer.kv.cache_nbytes`: one entry holding every producer's K/V."""
        return [self]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new K/V (B, Hkv, T, hd) of a producer; return everything it has (B, Hkv, S, hd)."""
        s = self.slot[layer_idx]
        keys, values = self.keys[s], self.values[s]  # (B, Hkv, L, hd)
        if self.static and self.decoding:
            keys.index_copy_(2, self.pos, k)
            values.index_copy_(2, self.pos, v)
            return keys, values
        start, T = self.length, k.shape[2]
        keys[:, :, start:start + T] = k
        values[:, :, start:start + T] = v
        return keys[:, :, :start + T], values[:, :, :start + T]


@contextmanager
def attention_implementation(model: torch.nn.Module, name: str):
    """Run `model` with another registered attention kernel, restoring the old one afterwards."""
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
) -> Generation:
    """Decode up to `max_new_tokens` after left-padded prompts `input_ids` (B, T) with `attention_mask`
    (1 = token, 0 = padding). `compile=True` compiles the decode step (implies static shapes; CUDA
    graphs on a GPU). Rows that reach an EOS id are padded from then on; all finished -> stop."""
    from .modeling import CLAForCausalLM

    if not isinstance(model, CLAForCausalLM):
        raise CrossLayerError(f"the fast decoding path needs a crosslayer model, got {type(model).__name__}; "
                              "convert a Llama-family checkpoint first (crosslayer.convert.from_hf)")
    if max_new_tokens < 1:
        raise CrossLayerError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    B, T = input_ids.shape
    device = input_ids.device
    dtype = next(model.parameters()).dtype
    static = static or compile
    if cache is None:
        cache = ProducerCache(model.config, B, T + max_new_tokens, dtype, device, static=static)
    elif cache.batch != B or cache.max_len < T + max_new_tokens or cache.static != static:
        raise CrossLayerError(f"cache is for batch {cache.batch} x {cache.max_len} tokens (static={cache.static}); "
                              f"need {B} x {T + max_new_tokens} (static={static})")
    cache.length, cache.decoding = 0, False
    cache.valid.zero_()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    real = attention_mask.bool()
    padded = not bool(real.all())
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []), device=device)

    def forward(ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        out = model(input_ids=ids, position_ids=position_ids, attention_mask=mask, cache=cache, use_cache=True,
                    logits_to_keep=1)
        return out.logits[:, -1]  # (B, V)

    step = torch.compile(forward, mode="reduce-overhead" if device.type == "cuda" else "default", fullgraph=True) \
        if compile else forward

    with attention_implementation(model, ATTENTION):
        _sync(device)
        start = time.perf_counter()
        # prefill: causal, padding keys masked, and every position sees itself (so padding rows stay finite)
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)  # (B, T), as transformers numbers left-padded rows
        mask = None
        if padded:
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            mask = (causal & real[:, None, None, :]) | torch.eye(T, dtype=torch.bool, device=device)  # (B, 1, T, T)
        logits = forward(input_ids, positions, mask)
        cache.valid[:, :T] = real
        cache.length, cache.decoding = T, True
        next_pos = positions[:, -1:] + 1  # (B, 1)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        tokens = [input_ids]
        times = []
        if streamer is not None:
            streamer.put(input_ids.cpu())
        for i in range(max_new_tokens):
            tok = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            if eos.numel():
                tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
                finished |= torch.isin(tok, eos)
            tokens.append(tok[:, None])
            _sync(device)
            times.append(time.perf_counter() - start)
            if streamer is not None:
                streamer.put(tok.cpu())
            if i == max_new_tokens - 1 or (eos.numel() and bool(finished.all())):
                break
            s = cache.length
            cache.valid[:, s] = True
            if cache.static:
                cache.pos.fill_(s)
                mask = cache.valid[:, None, None, :]  # (B, 1, 1, L): unwritten slots are False
            else:
                mask = cache.valid[:, None, None, :s + 1] if padded else None
            logits = step(tok[:, None], next_pos, mask)
            cache.length = s + 1
            next_pos = next_pos + 1
        if streamer is not None:
            streamer.end()
    sequences = torch.cat(tokens, dim=1)  # (B, T + new)
    decode = times[-1] - times[0] if len(times) > 1 else 0.0
    return Generation(sequences, cache, prefill_seconds=times[0], decode_seconds=decode, step_times=times)
