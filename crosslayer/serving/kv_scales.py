"""Per-producer fp8 KV-cache scales: measured on calibration text, kept in `kv_scales.json`.

An fp8 (e4m3) KV cache stores k / k_scale and reads it back times k_scale. With the default scale
of 1.0 values below 2^-6 lose precision and values above 448 saturate; a scale of amax / 448 fits
each producer's K (after RoPE) and V to the format's range. Only producer layers have scales:
consumers read their producer's cache pages, so they must dequantise with their producer's scales
(crosslayer's vLLM model sees to that). The file sits beside config.json, so transformers ignores it:

    {"format": "crosslayer-kv-scales", "fp8_max": 448.0, "tokens": 4096,
     "k_scale": {"0": 0.031, "2": 0.027, ...}, "v_scale": {"0": 0.004, ...}}   (keys: producer layers)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import CLAConfig
from ..errors import CrossLayerError

FILE = "kv_scales.json"
FORMAT = "crosslayer-kv-scales"
FP8_E4M3_MAX = 448.0


@torch.no_grad()
def calibrate_kv_scales(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict:
    """amax / 448 of each producer's K (rotated) and V over `batches` of token ids (B, T).

    Runs the transformers model with a fresh cache per batch and reads what the producers cached.
    """
    from transformers.cache_utils import DynamicCache

    config: CLAConfig = model.config
    amax = {i: [0.0, 0.0] for i in config.producer_layers}
    tokens = 0
    for ids in batches:
        cache = DynamicCache(config=config)
        model(input_ids=ids.to(model.device), cache=cache, use_cache=True, logits_to_keep=1)
        for i in config.producer_layers:
            layer = cache.layers[i]
            amax[i][0] = max(amax[i][0], layer.keys.abs().max().item())
            amax[i][1] = max(amax[i][1], layer.values.abs().max().item())
        tokens += ids.numel()
    if not tokens:
        raise CrossLayerError("calibrate_kv_scales needs at least one batch of tokens")
    return {
        "format": FORMAT, "fp8_max": FP8_E4M3_MAX, "tokens": tokens,
        "k_scale": {str(i): max(k, 1e-12) / FP8_E4M3_MAX for i, (k, _) in amax.items()},
        "v_scale": {str(i): max(v, 1e-12) / FP8_E4M3_MAX for i, (_, v) in amax.items()},
    }


def write_kv_scales(folder: str | Path, scales: dict) -> Path:
    """Write `scales` (from `calibrate_kv_scales`) as FOLDER/kv_scales.json."""
    path = Path(folder) / FILE
    path.write_text(json.dumps(scales, indent=1) + "\n")
    return path


def read_kv_scales(folder: str | Path, config: CLAConfig) -> dict[int, tuple[float, float]] | None:
    """{producer layer: (k_scale, v_scale)} from FOLDER/kv_scales.json; None if there is none."""
    path = Path(folder) / FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CrossLayerError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CrossLayerError(f"{path} is not a crosslayer KV-scales file (format {FORMAT!r})")
    producers = set(config.producer_layers)
    out = {}
    for kind in ("k_scale", "v_scale"):
        table = raw.get(kind)
        if not isinstance(table, dict) or {int(k) for k in table} != producers:
            raise CrossLayerError(f"{path}: {kind} must give one scale per producer layer {sorted(producers)}")
        for k, value in table.items():
            if not isinstance(value, (int, float)) or not value > 0:
                raise CrossLayerError(f"{path}: {kind}[{k}] = {value!r}; scales must be positive numbers")
    for i in producers:
        out[i] = (float(raw["k_scale"][str(i)]), float(raw["v_scale"][str(i)]))
    return out
