"""8-bit KV caches: int8 and fp8 values with scales, and transformers' QuantizedCache for CLA models.

CLA and KV quantisation are orthogonal: CLA2 halves the number of cached layers, an 8-bit cache
halves the bytes of each (against 16 bits), so together a quarter, plus the scales.

Format. Each K or V vector of one token and one K/V head (`head_dim` values; K after RoPE) is stored
as 8-bit values and one float16 scale, symmetric (no zero point): scale = amax / qmax,
  int8: round(x / scale) clamped to [-127, 127]; error per value at most scale / 2 = amax / 254;
  fp8:  x / scale cast (round to nearest) to float8_e4m3fn (qmax 448): 3 mantissa bits, so a
        relative error of at most 2^-4 per value at or above 2^-6 x scale, an absolute one of at most
        2^-10 x scale below it.
Keys may instead take one scale per channel (`granularity="channel"`), calibrated on the prompt:
the amax over the prompt's tokens of each rotary pair's norm (a rotation never moves a value past
its pair's norm), so later tokens are quantised with the prompt's scales and clamped to them.
Values always take one scale per token. Dequantised: values x scale.

`quantized_cache(config, backend, ...)` builds transformers' own `QuantizedCache` (quanto, HQQ or
fp8 backends) for a CLA model: the backend's layer for each producer and a `DummyLayer` (nothing
stored) for each consumer. transformers' constructor refuses a config with K/V sharing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .device import EIGHT_BIT
from .errors import CrossLayerError

SCALE_DTYPE = torch.float16  # one per token and K/V head: 2 bytes beside head_dim bytes of values
SCALE_BYTES = SCALE_DTYPE.itemsize
MIN_SCALE = 2.0**-24  # the smallest float16 (subnormal): an all-zero vector still gets a valid scale
GRANULARITIES = ("token", "channel")


@dataclass(frozen=True)
class KVFormat:
    """An 8-bit storage format: its torch dtype and the largest magnitude it holds."""

    name: str
    dtype: torch.dtype
    qmax: float


def _qmax(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max if dtype.is_floating_point else torch.iinfo(dtype).max)


# device.EIGHT_BIT's formats: int8 up to 127, fp8 (float8_e4m3fn) up to 448
KV_FORMATS: dict[str, KVFormat] = {name: KVFormat(name, dtype, _qmax(dtype)) for name, dtype in EIGHT_BIT.items()}


class QuantizedKV(NamedTuple):
    """8-bit K or V of some tokens with their scales; dequantised = values * scale (broadcast).

    values: (B, Hkv, S, hd) int8 or float8_e4m3fn. scale: float16, (B, Hkv, S, 1) per token or
    (B, Hkv, 1, hd) per channel."""

    values: torch.Tensor
    scale: torch.Tensor

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.values, self.scale, dtype)


def quantize(x: torch.Tensor, fmt: KVFormat, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, scale) with x ~= values * scale. Without `scale`: one per vector of the last axis,
    amax / qmax, rounded to float16 first (so values are computed with the scale that is stored).
    With `scale` (broadcastable to x): values are clamped to the format's range."""
    xf = x.float()
    if scale is None:
        amax = xf.abs().amax(dim=-1, keepdim=True)  # (..., 1)
        scale = (amax / fmt.qmax).clamp(min=MIN_SCALE).to(SCALE_DTYPE)
    y = (xf / scale.float()).clamp(-fmt.qmax, fmt.qmax)
    values = y.round().to(fmt.dtype) if fmt.dtype == torch.int8 else y.to(fmt.dtype)
    return values, scale


def dequantize(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """values * scale in `dtype`."""
    return values.to(dtype) * scale.to(dtype)


def channel_scale(k: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """Per-channel key scales (B, Hkv, 1, hd) from rotated keys k (B, Hkv, T, hd): each rotary pair
    (i, i + hd/2) takes amax over tokens of the pair's norm, which bounds both channels at any position."""
    kf = k.float()
    half = kf.shape[-1] // 2
    pair_norm = torch.sqrt(kf[..., :half] ** 2 + kf[..., half:] ** 2)  # (B, Hkv, T, hd/2)
    amax = pair_norm.amax(dim=2, keepdim=True)  # (B, Hkv, 1, hd/2)
    scale = (amax / fmt.qmax).clamp(min=MIN_SCALE).to(SCALE_DTYPE)
    return torch.cat([scale, scale], dim=-1)  # (B, Hkv, 1, hd)


# ----------------------------------------------------------------------------------------------
# transformers' quantized cache, for producer layers only


def quantized_cache(config, backend: str = "quanto", **options):
    """transformers' `QuantizedCache` for a CLA model: the backend's quantised layer for every
    producer, a `DummyLayer` for every consumer (it reads its producer's K/V and stores nothing).

    `backend`: quanto, hqq or fp8; `options`: the backend's own (nbits, axis_key, axis_value,
    q_group_size, residual_length), as `generate(cache_config=...)` takes them."""
    from transformers import PreTrainedConfig
    from transformers.cache_utils import DummyLayer, QuantizedCache

    options.pop("config", None)
    # transformers checks that every layer is full attention, which a consumer's "dummy" slot is not:
    # build the cache for as many plain layers, then empty the consumers' slots
    plain = PreTrainedConfig(num_hidden_layers=config.num_hidden_layers)
    try:
        cache = QuantizedCache(backend, plain, **options)
    except (ImportError, ValueError) as e:
        raise CrossLayerError(f"quantized cache ({backend}): {e}") from None
    for layer, source in enumerate(config.kv_sources):
        if source != layer:
            cache.layers[layer] = DummyLayer()
    return cache
