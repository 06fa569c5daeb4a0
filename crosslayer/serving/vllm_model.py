"""Cross-Layer Attention as a vLLM model: `CLAForCausalLM` for vLLM V1, top to bottom.

Brandon et al., "Reducing Transformer Key-Value Cache Size with Cross-Layer Attention" (NeurIPS
2024); the same network as `crosslayer.modeling`, written with vLLM's layers so that vLLM's paged
KV cache holds the producer layers only. vLLM imports this module through the plugin
(`crosslayer.serving.plugin`); nothing else in crosslayer imports it. Deviations from vLLM's Llama:
  - `config.kv_sources[i]` names the layer whose K/V layer i attends with. A producer
    (`kv_sources[i] == i`) has a fused `qkv_proj` and writes its own cache pages. A consumer has a
    `q_proj` only, rotates only its queries, and its `Attention` is built with
    `kv_sharing_target_layer_name` = its producer's attention prefix: vLLM allocates no pages for
    it and its attention reads the producer's. This halves vLLM's KV memory per token for CLA2.
  - One RMS normalisation, two learned scales: `input_layernorm.weight` scales the query input and
    (producers) `kv_layernorm.weight` the K/V input. Both scales are folded into the input columns
    of the projections at load time (W diag(g) x == W (g * x)), so the layer normalises once with no
    learned scale and a producer still runs one fused QKV matmul.
  - The output projection's bias follows `config.o_proj_bias`; q/k/v biases `attention_bias`.
  - fp8 KV cache: each consumer dequantises with its producer's k/v scales (vLLM would leave a
    sharing layer at its own default of 1.0). Scales come from the checkpoint's quantisation config
    if it has one, or from `kv_scales.json` in the model folder (`crosslayer.serving.kv_scales`).
Tensor parallelism works as in Llama; pipeline parallelism is not supported (a consumer must sit
on the same stage as its producer).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.sequence import IntermediateTensors
from vllm.utils.torch_utils import is_quantized_kv_cache

from ..config import CLAConfig
from .kv_scales import read_kv_scales

# checkpoint projection -> (fused vLLM parameter, shard id); q/k/v only on producers
STACKED = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# rope types of ours that vLLM computes differently (checked against transformers' generate)
UNSUPPORTED_ROPE = {"longrope": "vLLM's (Phi-3's) longrope applies its short and long factors differently from "
                                "transformers', and greedy tokens differ"}


class CLAMLP(nn.Module):
    """SwiGLU feed-forward: one fused gate/up matmul."""

    def __init__(self, config: CLAConfig, quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"crosslayer's vLLM model supports hidden_act 'silu' only, got {config.hidden_act!r}")
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_up_proj = MergedColumnParallelLinear(d, [f, f], bias=bias, quant_config=quant_config,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(f, d, bias=bias, quant_config=quant_config, prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)  # (N, 2 * f / tp)
        x, _ = self.down_proj(self.act_fn(x))
        return x


class CLAAttention(nn.Module):
    """Attention that produces K/V (fused QKV, writes the cache) or reuses its producer's pages."""

    def __init__(self, config: CLAConfig, layer_idx: int, cache_config: CacheConfig | None,
                 quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        heads, kv_heads, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        if heads % tp or (kv_heads % tp if kv_heads >= tp else tp % kv_heads):
            raise ValueError(f"{heads} query / {kv_heads} KV heads cannot be split over tensor parallel size {tp}")
        self.num_heads, self.num_kv_heads, self.head_dim = heads // tp, max(1, kv_heads // tp), hd
        self.q_size, self.kv_size = self.num_heads * hd, self.num_kv_heads * hd
        self.kv_source = config.kv_sources[layer_idx]
        self.is_producer = self.kv_source == layer_idx
        d, bias = config.hidden_size, config.attention_bias
        if self.is_producer:
            self.qkv_proj = QKVParallelLinear(d, hd, heads, kv_heads, bias=bias, quant_config=quant_config,
                                              prefix=f"{prefix}.qkv_proj")
            target = None
        else:
            self.q_proj = ColumnParallelLinear(d, heads * hd, bias=bias, quant_config=quant_config,
                                               prefix=f"{prefix}.q_proj")
            # the producer's Attention, by the exact name vLLM registered it under
            target = f"{prefix.rsplit('.layers.', 1)[0]}.layers.{self.kv_source}.self_attn.attn"
        self.o_proj = RowParallelLinear(heads * hd, d, bias=config.o_proj_bias, quant_config=quant_config,
                                        prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(hd, max_position=config.max_position_embeddings,
                                   rope_parameters=config.rope_parameters, is_neox_style=True)
        self.attn = Attention(self.num_heads, hd, hd**-0.5, num_kv_heads=self.num_kv_heads,
                              cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn",
                              kv_sharing_target_layer_name=target)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.is_producer:
            qkv, _ = self.qkv_proj(x)  # (N, q_size + 2 kv_size)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q, k = self.rotary_emb(positions, q, k)
            out = self.attn(q, k, v)  # writes k, v to this layer's pages
        else:
            q, _ = self.q_proj(x)  # (N, q_size)
            q, _ = self.rotary_emb(positions, q, None)
            out = self.attn(q, None, None)  # reads the producer's pages
        out, _ = self.o_proj(out)
        return out


class CLADecoderLayer(nn.Module):
    def __init__(self, config: CLAConfig, layer_idx: int, cache_config: CacheConfig | None,
                 quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        self.self_attn = CLAAttention(config, layer_idx, cache_config, quant_config, f"{prefix}.self_attn")
        self.mlp = CLAMLP(config, quant_config, f"{prefix}.mlp")
        # no learned scale here: the query and K/V scales live in the projections (folded at load)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, has_weight=False)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:  # fused: residual += hidden_states, then normalise
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


@support_torch_compile(dynamic_arg_dims={"input_ids": {0: "b"}, "positions": {0: "b"},
                                         "intermediate_tensors": {0: "b"}, "inputs_embeds": {0: "b"}})
class CLAModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: CLAConfig = vllm_config.model_config.hf_config
        self.config = config
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, quant_config=quant_config)
        # built in order, so every producer's Attention exists before its consumers name it
        self.layers = nn.ModuleList(
            CLADecoderLayer(config, i, cache_config, quant_config, f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)  # (N, d)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class CLAForCausalLM(nn.Module):
    """vLLM's entry point for checkpoints whose config.json says `"architectures": ["CLAForCausalLM"]`."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: CLAConfig = vllm_config.model_config.hf_config
        rope_type = (config.rope_parameters or {}).get("rope_type", "default")
        if rope_type in UNSUPPORTED_ROPE:
            raise ValueError(f"crosslayer's vLLM model does not serve rope_type {rope_type!r}: "
                             f"{UNSUPPORTED_ROPE[rope_type]}")
        self.config = config
        self.model_path = vllm_config.model_config.model
        self.kv_scales: dict[int, tuple[float, float]] | None = None  # kv_scales.json, read by load_weights
        self.model = CLAModel(vllm_config=vllm_config, prefix=f"{prefix}.model" if prefix else "model")
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=f"{prefix}.lm_head" if prefix else "lm_head")
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    # -- weights ----------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load a crosslayer safetensors checkpoint, folding each layer's two RMSNorm scales
        into the columns of the projections they feed (q: input_layernorm, k/v: kv_layernorm).

        A projection that arrives before its norm scale waits for it, so any file order works.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        scales: dict[tuple[int, str], torch.Tensor] = {}  # (layer, "q" | "kv") -> norm weight
        waiting: dict[tuple[int, str], list[tuple[str, torch.Tensor]]] = {}

        def load_projection(layer: int, proj: str, suffix: str, tensor: torch.Tensor) -> None:
            attn = self.model.layers[layer].self_attn
            if suffix == "weight":
                tensor = tensor * scales[(layer, "q" if proj == "q_proj" else "kv")].to(tensor.dtype)  # (out, d) * (d,)
            if attn.is_producer:
                name = f"model.layers.{layer}.self_attn.qkv_proj.{suffix}"
                params[name].weight_loader(params[name], tensor, STACKED[proj][1])
            else:
                name = f"model.layers.{layer}.self_attn.q_proj.{suffix}"
                params[name].weight_loader(params[name], tensor)
            loaded.add(name)

        for name, tensor in weights:
            if name.startswith("lm_head.") and self.config.tie_word_embeddings:
                continue  # the embedding is the head
            m = _LAYER_NAME.match(name)
            if m is None:
                self._load_plain(params, name, tensor, loaded)
                continue
            layer, rest = int(m[1]), m[2]
            if rest in ("input_layernorm.weight", "kv_layernorm.weight"):
                key = (layer, "q" if rest.startswith("input") else "kv")
                scales[key] = tensor.float()
                for args in waiting.pop(key, []):
                    load_projection(layer, *args)
                continue
            proj, _, suffix = rest.removeprefix("self_attn.").partition(".")
            if rest.startswith("self_attn.") and proj in ("q_proj", "k_proj", "v_proj"):
                if proj != "q_proj" and not self.model.layers[layer].self_attn.is_producer:
                    raise ValueError(f"{name}: layer {layer} is a consumer (kv_sources[{layer}] = "
                                     f"{self.config.kv_sources[layer]}) and has no K/V projections")
                key = (layer, "q" if proj == "q_proj" else "kv")
                if suffix == "weight" and key not in scales:
                    waiting.setdefault(key, []).append((proj, suffix, tensor))
                else:
                    load_projection(layer, proj, suffix, tensor)
                continue
            for src, (dst, shard) in STACKED.items():
                if f".{src}." in f".{rest}":
                    fused = f"model.layers.{layer}.{rest.replace(src, dst)}"
                    params[fused].weight_loader(params[fused], tensor, shard)
                    loaded.add(fused)
                    break
            else:
                self._load_plain(params, name, tensor, loaded)
        if waiting:
            missing = sorted(f"model.layers.{i}.{'input' if k == 'q' else 'kv'}_layernorm.weight" for i, k in waiting)
            raise ValueError(f"checkpoint has projections but not their norm scales: {', '.join(missing[:5])}")
        self.kv_scales = read_kv_scales(self.model_path, self.config)
        return loaded

    @staticmethod
    def _load_plain(params: dict, name: str, tensor: torch.Tensor, loaded: set[str]) -> None:
        if name not in params:
            raise ValueError(f"checkpoint tensor {name} has no place in crosslayer's vLLM model")
        param = params[name]
        getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        loaded.add(name)

    def process_weights_after_loading(self) -> None:
        """After vLLM has finalised every Attention's fp8 scales: producers take the scales of
        `kv_scales.json` if there is one, and every consumer takes its producer's."""
        layers = [layer.self_attn for layer in self.model.layers]
        if not is_quantized_kv_cache(layers[0].attn.kv_cache_dtype):
            return
        for i, attn in enumerate(layers):
            if attn.is_producer and self.kv_scales is not None:
                k, v = self.kv_scales[i]
                _set_kv_scales(attn.attn, k, v)
            elif not attn.is_producer:
                src = layers[attn.kv_source].attn
                _set_kv_scales(attn.attn, src._k_scale_float, src._v_scale_float)


def _set_kv_scales(attn: Attention, k_scale: float, v_scale: float) -> None:
    """Every copy of the k/v dequantisation scales an Attention keeps (device, host, float)."""
    attn._k_scale.fill_(k_scale)
    attn._v_scale.fill_(v_scale)
    attn._k_scale_cpu.fill_(k_scale)
    attn._v_scale_cpu.fill_(v_scale)
    attn._k_scale_float, attn._v_scale_float = float(k_scale), float(v_scale)

