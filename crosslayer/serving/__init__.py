"""Serving crosslayer models with inference engines.

vLLM: `plugin.register` (the `vllm.general_plugins` entry point) registers `vllm_model.CLAForCausalLM`,
a vLLM V1 model whose consumer layers share their producer's KV-cache pages; `kv_scales` measures and
stores per-producer fp8 KV-cache scales. Nothing here is imported by `import crosslayer`.
"""
