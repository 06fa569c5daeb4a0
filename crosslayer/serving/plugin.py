"""vLLM plugin: makes `vllm serve DIR` / `LLM(model=DIR)` work for crosslayer checkpoints.

Registered as an entry point of the `vllm.general_plugins` group (pyproject.toml), which vLLM
loads in every process it starts (API server, engine core, workers), so the function may run
several times. It registers our config class with transformers' AutoConfig (config.json says
`"model_type": "crosslayer"`) and our vLLM model under the architecture name the checkpoints carry
(`"architectures": ["CLAForCausalLM"]`); the model module is imported lazily, by vLLM, when a
crosslayer checkpoint is actually loaded.
"""

from __future__ import annotations

from transformers import AutoConfig

from ..config import CLAConfig

ARCHITECTURE = "CLAForCausalLM"
MODEL_CLASS = "crosslayer.serving.vllm_model:CLAForCausalLM"


def register() -> None:
    """The `vllm.general_plugins` entry point."""
    from vllm import ModelRegistry  # here, not above: importing this module must not need vLLM

    AutoConfig.register(CLAConfig.model_type, CLAConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
