"""A Llama-style decoder with Cross-Layer Attention, top to bottom.

Brandon, Mishra, Nrusimha, Panda, Ragan-Kelley, "Reducing Transformer Key-Value Cache Size with
Cross-Layer Attention" (NeurIPS 2024). Pre-norm RMSNorm, RoPE, SwiGLU, no dropout, as in Llama.
Deviations from transformers' Llama:
  - `config.kv_sources[i]` names the layer whose K/V layer i attends with. Producer layers
    (`kv_sources[i] == i`) own `k_proj`/`v_proj` and write the KV cache; consumer layers own only
    `q_proj`/`o_proj` and read their producer's K/V (already rotated) from a per-forward `SharedKV`.
  - Producers normalise their KV input with their own RMSNorm (`kv_layernorm`), separate from
    the query-input norm (`input_layernorm`): the paper keeps separate affine parameters for the
    two projections. For a model converted from Llama both start as copies of one norm.
  - `head_dim` is independent of `hidden_size`.
  - The output projection's bias has its own flag, `o_proj_bias` (default: `attention_bias`), so
    Qwen2's layout (biases on q, k, v only) is one config away.
  - Weights are initialised N(0, 0.01275) (the paper's) unless `initializer_range` says otherwise.
The cache is transformers' own: `DynamicCache(config=...)` reads `config.kv_sharing_modes` and
gives consumer layers a `DummyLayer` that stores nothing, so only producers hold K/V.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .config import CLAConfig

# transformers 5.2x renamed the cache argument and output field `past_key_values` -> `cache`;
# vLLM pins 5.16-5.20, so we speak whichever this transformers does.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def slice_logits_to_keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The positions whose logits are needed: the last `logits_to_keep` (0: all), or the given indices."""
    if isinstance(logits_to_keep, int):
        return hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
    return hidden_states[:, logits_to_keep]


class SharedKV:
    """Producer layer -> its full (past + new) rotated K/V, for one forward pass.

    A plain object rather than a dict on purpose: wrappers such as FSDP2 rebuild the dicts, lists
    and tuples they find in a module's arguments, which would hide a producer's writes from its
    consumers; an object passes through by reference.
    """

    __slots__ = ("kv",)

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


class CLARMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """x / rms(x), without the learned scale; in fp32 for stability under bf16, as Llama does."""
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * self.normalize(x)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class CLARotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE; any rope type transformers implements (default, linear, llama3, ...)."""

    def __init__(self, config: CLAConfig) -> None:
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        if self.rope_type == "default":
            inv_freq, self.attention_scaling = self.default_inv_freq(config)
        else:
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[self.rope_type](config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def default_inv_freq(config: CLAConfig, device=None, seq_len=None) -> tuple[torch.Tensor, float]:
        base, dim = config.rope_parameters["rope_theta"], config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
        return inv_freq, 1.0

    compute_default_rope_parameters = default_inv_freq  # the name transformers' dynamic rope looks up

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd) broadcast over heads
    return x * cos + rotate_half(x) * sin


class CLAMLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, config: CLAConfig) -> None:
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention. GQA by viewing the query heads as (kv_heads, group): K/V are broadcast,
    never copied."""
    B, H, T, hd = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    q = query.view(B, Hkv, H // Hkv, T, hd)  # (B, Hkv, G, T, hd)
    scores = torch.matmul(q, key.unsqueeze(2).transpose(-1, -2)) * scaling  # (B, Hkv, G, T, S)
    if attention_mask is not None:
        mask = attention_mask.unsqueeze(2)  # (B, 1, 1, T, S)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value.unsqueeze(2))  # (B, Hkv, G, T, hd)
    out = out.reshape(B, H, T, hd).transpose(1, 2).contiguous()  # (B, T, H, hd)
    return out, probs.reshape(B, H, T, S)


class CLAAttention(nn.Module):
    """Self-attention that either produces K/V (and caches them) or reuses a producer's."""

    def __init__(self, config: CLAConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.kv_source = config.kv_sources[layer_idx]
        self.is_producer = self.kv_source == layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        d, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=bias)
        if self.is_producer:
            self.k_proj = nn.Linear(d, config.num_key_value_heads * self.head_dim, bias=bias)
            self.v_proj = nn.Linear(d, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=config.o_proj_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        kv_input: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        shared_kv: SharedKV,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, _ = hidden_states.shape
        cos, sin = position_embeddings
        q = self.q_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        q = apply_rotary(q, cos, sin)
        if self.is_producer:
            k = self.k_proj(kv_input).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
            v = self.v_proj(kv_input).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
            k = apply_rotary(k, cos, sin)
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)  # (B, Hkv, S, hd): past + new
            shared_kv.kv[self.layer_idx] = (k, v)
        else:
            k, v = shared_kv.kv[self.kv_source]

        attention_fn: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention
        )
        out, weights = attention_fn(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        out = out.reshape(B, T, -1).contiguous()  # (B, T, H*hd)
        return self.o_proj(out), weights


class CLADecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: CLAConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = CLAAttention(config, layer_idx)
        self.mlp = CLAMLP(config)
        self.input_layernorm = CLARMSNorm(config.hidden_size, config.rms_norm_eps)  # query input
        if self.self_attn.is_producer:
            self.kv_layernorm = CLARMSNorm(config.hidden_size, config.rms_norm_eps)  # K/V input
        self.post_attention_layernorm = CLARMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        shared_kv: SharedKV | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        # one normalisation, two learned scales: the query input and (producers only) the K/V input
        normed = self.input_layernorm.normalize(hidden_states)
        q_input = self.input_layernorm.weight * normed
        kv_input = self.kv_layernorm.weight * normed if self.self_attn.is_producer else None
        attn_out, _ = self.self_attn(
            q_input, kv_input, position_embeddings, attention_mask, shared_kv, cache=cache, **kwargs,
        )
        hidden_states = residual + attn_out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class CLAPreTrainedModel(PreTrainedModel):
    config_class = CLAConfig
    config: CLAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CLADecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": CLADecoderLayer, "attentions": CLAAttention}


class CLAModel(CLAPreTrainedModel):
    def __init__(self, config: CLAConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(CLADecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = CLARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = CLARotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, d)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)  # consumer layers get DummyLayer slots
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0  # layer 0 is always a producer
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past

        mask = create_causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids=position_ids)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        shared_kv = SharedKV()
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(
                hidden_states, attention_mask=mask, position_embeddings=position_embeddings,
                shared_kv=shared_kv, cache=cache, **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **{CACHE_NAME: cache})


class CLAForCausalLM(CLAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CLAConfig) -> None:
        super().__init__(config)
        self.model = CLAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """`generate(cache_implementation="quantized")`: transformers' QuantizedCache refuses a config whose
        layers share K/V, so producers get the backend's quantised layer and consumers a DummyLayer."""
        if (generation_config.cache_implementation == "quantized" and model_kwargs.get(CACHE_NAME) is None
                and self.config.num_producer_layers < self.config.num_hidden_layers):
            # here, not at the top: a saved model's own code (auto_map) carries config/modeling/errors only
            from .quant import quantized_cache

            options = dict(generation_config.cache_config or {})
            model_kwargs[CACHE_NAME] = quantized_cache(self.config, options.pop("backend", "quanto"), **options)
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(out.last_hidden_state, logits_to_keep))  # (B, T, V)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions,
            **{CACHE_NAME: getattr(out, CACHE_NAME)},
        )
