"""CLAForCausalLM against a plain re-implementation of the paper's forward pass, written here from the paper.

The reference reads nothing from crosslayer but the weights (a state dict): RMS norm, RoPE, one K/V
projection per producer computed from the producer's own KV-input norm, consumers attending with
their producer's rotated K/V, GQA by sharing each K/V head among a group of query heads, SwiGLU,
the LM head. The sharing maps are written out by hand from the paper's definitions of each pattern.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from crosslayer import CLAConfig, CLAForCausalLM
from crosslayer.modeling import CACHE_NAME  # past_key_values before transformers 5.2x

# 6 layers; kv_sources by hand from the paper's pattern definitions
PLANS = {
    "cla2": (dict(cla_factor=2), [0, 0, 2, 2, 4, 4]),
    "cla3": (dict(cla_factor=3), [0, 0, 0, 3, 3, 3]),
    "keep_ends": (dict(cla_factor=2, cla_pattern="keep_ends"), [0, 1, 1, 3, 3, 5]),  # first and last own theirs
    "dense_front": (dict(cla_factor=2, cla_pattern="dense_front"), [0, 1, 2, 2, 4, 4]),  # first two own theirs
    "dense_back": (dict(cla_factor=2, cla_pattern="dense_back"), [0, 0, 2, 2, 4, 5]),  # last two own theirs
    "custom": (dict(kv_sources=[0, 0, 0, 3, 4, 4]), [0, 0, 0, 3, 4, 4]),
    "dense": (dict(cla_factor=1), [0, 1, 2, 3, 4, 5]),
}
SHAPES = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
}


def build(plan: dict, shape: dict, **extra) -> CLAForCausalLM:
    config = CLAConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=6, head_dim=16,
                       max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.1,
                       rope_parameters={"rope_type": "default", "rope_theta": 500.0}, attn_implementation="eager",
                       **plan, **shape, **extra)
    model = CLAForCausalLM(config).eval()
    with torch.no_grad():  # non-unit norms everywhere, so the two input scales of a producer differ
        for name, p in model.named_parameters():
            if "layernorm" in name or name == "model.norm.weight":
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def reference_logits(weights: dict, kv_sources: list[int], ids: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                     eps: float = 1e-6, theta: float = 500.0, tied: bool = False) -> torch.Tensor:
    """Logits (B, T, V) of the paper's model, from its weights alone, in float64."""
    sd = {k: v.double() for k, v in weights.items()}
    B, T = ids.shape
    h = sd["model.embed_tokens.weight"][ids]  # (B, T, d)

    def rms(x, w):
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def linear(x, name):
        y = x @ sd[f"{name}.weight"].T
        return y + sd[f"{name}.bias"] if f"{name}.bias" in sd else y

    half = head_dim // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float64) / half)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freq[None, :]  # (T, hd/2)
    cos, sin = angle.cos(), angle.sin()

    def rotate(x):  # (B, heads, T, hd): pairs (i, i + hd/2) rotated by position x frequency
        a, b = x[..., :half], x[..., half:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

    def split(x, n):
        return x.view(B, T, n, head_dim).transpose(1, 2)  # (B, n, T, hd)

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    cache = {}
    for i, src in enumerate(kv_sources):
        p = f"model.layers.{i}"
        q = rotate(split(linear(rms(h, sd[f"{p}.input_layernorm.weight"]), f"{p}.self_attn.q_proj"), heads))
        if src == i:  # a producer: its own K/V from its own KV-input scale
            x = rms(h, sd[f"{p}.kv_layernorm.weight"])
            cache[i] = (rotate(split(linear(x, f"{p}.self_attn.k_proj"), kv_heads)),
                        split(linear(x, f"{p}.self_attn.v_proj"), kv_heads))
        k, v = cache[src]
        group = heads // kv_heads
        out = torch.empty(B, heads, T, head_dim, dtype=h.dtype)
        for head in range(heads):
            kh, vh = k[:, head // group], v[:, head // group]  # the K/V head this query head belongs to
            scores = q[:, head] @ kh.transpose(-1, -2) / math.sqrt(head_dim)  # (B, T, T)
            out[:, head] = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ vh
        h = h + linear(out.transpose(1, 2).reshape(B, T, heads * head_dim), f"{p}.self_attn.o_proj")
        x = rms(h, sd[f"{p}.post_attention_layernorm.weight"])
        h = h + linear(F.silu(linear(x, f"{p}.mlp.gate_proj")) * linear(x, f"{p}.mlp.up_proj"), f"{p}.mlp.down_proj")
    head_weight = sd["model.embed_tokens.weight"] if tied else sd["lm_head.weight"]
    return rms(h, sd["model.norm.weight"]) @ head_weight.T


CASES = [(plan, "gqa") for plan in PLANS] + [("cla2", "mqa"), ("cla3", "mha"), ("keep_ends", "mqa"), ("custom", "mha")]


@pytest.mark.parametrize("plan, shape", CASES, ids=[f"{p}-{s}" for p, s in CASES])
def test_forward_equals_the_reference(plan, shape):
    fields, kv_sources = PLANS[plan]
    model = build(fields, SHAPES[shape])
    assert model.config.kv_sources == kv_sources  # the pattern is the paper's
    ids = torch.randint(0, 97, (2, 13))
    expected = reference_logits(model.state_dict(), kv_sources, ids, SHAPES[shape]["num_attention_heads"],
                                SHAPES[shape]["num_key_value_heads"], 16)
    with torch.no_grad():
        for attn in ("eager", "sdpa"):
            model.config._attn_implementation = attn
            torch.testing.assert_close(model(ids).logits.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("plan", ["cla2", "keep_ends", "custom"])
def test_cached_decoding_equals_the_reference(plan):
    fields, kv_sources = PLANS[plan]
    model = build(fields, SHAPES["gqa"])
    ids = torch.randint(0, 97, (2, 11))
    expected = reference_logits(model.state_dict(), kv_sources, ids, 4, 2, 16)
    with torch.no_grad():
        out = model(ids[:, :4], use_cache=True)
        steps, cache = [out.logits], getattr(out, CACHE_NAME)
        for t in range(4, 11):
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1).double(), expected, rtol=1e-5, atol=1e-5)


def test_biases_and_tied_head_equal_the_reference():
    # Qwen2's layout: biases on q, k, v, none on o; tied embeddings
    model = build(PLANS["cla2"][0], SHAPES["gqa"], attention_bias=True, o_proj_bias=False, tie_word_embeddings=True)
    sd = model.state_dict()
    assert "model.layers.0.self_attn.k_proj.bias" in sd and "model.layers.0.self_attn.o_proj.bias" not in sd
    ids = torch.randint(0, 97, (1, 9))
    expected = reference_logits(sd, PLANS["cla2"][1], ids, 4, 2, 16, tied=True)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.double(), expected, rtol=1e-5, atol=1e-5)


def test_the_reference_sees_a_wrong_sharing_map():
    # the comparison has teeth: the same weights read through another sharing map give other logits
    model = build(PLANS["cla2"][0], SHAPES["gqa"])
    ids = torch.randint(0, 97, (1, 9))
    wrong = reference_logits(model.state_dict(), [0, 0, 2, 2, 4, 4], ids, 4, 2, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.double(), wrong, rtol=1e-5, atol=1e-5)
        model.model.layers[3].self_attn.kv_source = 0  # layer 3 now reads layer 0's K/V instead of layer 2's
        assert not torch.allclose(model(ids).logits.double(), wrong, atol=1e-3)
