"""Loading any causal LM (ours, converted, or plain transformers) the same way for every evaluation."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CrossLayerError


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA, fp32 on CPU."""
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in table:
        raise CrossLayerError(f"dtype must be auto, fp32, bf16 or fp16; got {dtype!r}")
    return table[dtype]


def load_model(spec: str | Path, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) from a local folder or a hub id; our classes are registered on import."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import crosslayer  # noqa: F401  (registers CLAConfig / CLAForCausalLM with the Auto classes)

    path = Path(spec)
    if path.exists() and not (path / "config.json").exists():
        raise CrossLayerError(f"{path} has no config.json: not a model folder")
    if not path.exists() and (str(spec).startswith((".", "/")) or str(spec).count("/") > 1):
        raise CrossLayerError(f"model folder not found: {spec}")
    dev = pick_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(spec))
        model = AutoModelForCausalLM.from_pretrained(str(spec), dtype=pick_dtype(dtype, dev))
    except OSError as e:
        raise CrossLayerError(f"cannot load model {spec}: {e}") from None
    return model.to(dev).eval(), tokenizer
