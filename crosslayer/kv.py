"""KV-cache arithmetic: bytes per token, capacity planning, and the bytes a live cache really holds.

KV dtypes: 32- and 16-bit floats, and the 8-bit formats of `crosslayer.quant` (int8, fp8), which
store one float16 scale per token, K/V head and K or V beside the 8-bit values; their scales count.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from .config import CLAConfig
from .device import ELEMENT_BYTES
from .errors import CrossLayerError
from .quant import KV_FORMATS, SCALE_BYTES

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def cache_nbytes(cache: Any) -> int:
    """Bytes of K/V a live cache holds, scales and quantised states included: a transformers `Cache`
    (quantized ones too) or our `ProducerCache`. Tensors sharing storage count once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in _KV_FIELDS:
            for t in _tensors(getattr(layer, name, None)):
                storage = t.untyped_storage()
                key = (storage.data_ptr(), storage.nbytes())
                if storage.nbytes() and key not in seen:
                    seen.add(key)
                    total += storage.nbytes()
    return total


# where caches keep K/V: transformers' layers and ours (keys, values; 8-bit scales), transformers'
# quantized layers (quantised states; `keys`/`values` then hold the unquantised residual)
_KV_FIELDS = ("keys", "values", "key_scales", "value_scales", "_quantized_keys", "_quantized_values")


def _tensors(obj: Any):
    """Every plain tensor inside obj: tensors, tensor subclasses that wrap others (quanto's), and
    tuples, lists and dicts of them (HQQ's and fp8's (values, metadata) pairs)."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            for name in names:
                yield from _tensors(getattr(obj, name))
        else:
            yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def kv_bytes_per_token(config: CLAConfig, kv_dtype: str = "bf16") -> int:
    """Bytes cached per token: K and V of every producer layer in `kv_dtype`; for the 8-bit formats
    plus their scales (one float16 per token, K/V head, and K or V)."""
    if kv_dtype not in ELEMENT_BYTES:
        raise CrossLayerError(f"kv_dtype must be one of {', '.join(ELEMENT_BYTES)}; got {kv_dtype!r}")
    return int(config.kv_bytes_per_token(ELEMENT_BYTES[kv_dtype])) + kv_scale_bytes_per_token(config, kv_dtype)


def kv_scale_bytes_per_token(config: CLAConfig, kv_dtype: str) -> int:
    """The scales' share of `kv_bytes_per_token` (0 for float dtypes)."""
    if kv_dtype not in KV_FORMATS:
        return 0
    return 2 * config.num_key_value_heads * config.num_producer_layers * SCALE_BYTES


def parse_bytes(text: str) -> int:
    """'80GiB', '24G', '1.5e9', '512MB' -> bytes. Bare K/M/G/T are binary (GiB), as in nvidia-smi."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m[2].lower() not in _UNITS:
        raise CrossLayerError(f"cannot read memory size {text!r}; use e.g. 80GiB, 24G, 512MB or a byte count")
    return int(float(m[1]) * _UNITS[m[2].lower()])


def plan(
    config: CLAConfig,
    seq_len: int,
    memory_bytes: int | None = None,
    kv_dtype: str = "bf16",
    weight_dtype: str = "bf16",
) -> dict[str, Any]:
    """KV bytes per token (scales included) and per sequence, and how many sequences of `seq_len` fit
    in `memory_bytes` beside the weights (ignoring activations and allocator overhead)."""
    for name, d in (("kv_dtype", kv_dtype), ("weight_dtype", weight_dtype)):
        if d not in ELEMENT_BYTES:
            raise CrossLayerError(f"{name} must be one of {', '.join(ELEMENT_BYTES)}; got {d!r}")
    if seq_len < 1:
        raise CrossLayerError(f"seq_len must be >= 1, got {seq_len}")
    per_token = kv_bytes_per_token(config, kv_dtype)
    params = config.num_parameters()
    out: dict[str, Any] = {
        "kv_bytes_per_token": per_token,
        "kv_scale_bytes_per_token": kv_scale_bytes_per_token(config, kv_dtype),
        "kv_bytes_per_token_16bit": config.kv_bytes_per_token(2),
        "kv_dtype": kv_dtype,
        "producer_layers": config.num_producer_layers,
        "num_layers": config.num_hidden_layers,
        "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "kv_sources": config.kv_sources,
        "parameters": params,
        "weight_bytes": params * ELEMENT_BYTES[weight_dtype],
        "seq_len": seq_len,
        "kv_bytes_per_sequence": per_token * seq_len,
    }
    if memory_bytes is not None:
        free = memory_bytes - out["weight_bytes"]
        out["memory_bytes"] = memory_bytes
        out["max_sequences"] = max(0, int(free // out["kv_bytes_per_sequence"]))
        out["max_tokens"] = max(0, int(free // per_token))
    return out


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return str(n)
