"""8-bit KV caches: the formats' error bounds, the 8-bit attention, byte counts, and transformers'
QuantizedCache with CLA models. References are plain dequantisations written here, transformers'
own caches and Llama, and byte counts computed by hand from the shapes."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaForCausalLM, PreTrainedConfig
from transformers.cache_utils import DummyLayer, QuantizedCache

from crosslayer import CLAConfig, CLAForCausalLM, cpu_decode
from crosslayer import decode as decode_module
from crosslayer.config import to_llama_config
from crosslayer.convert import from_hf
from crosslayer.decode import (
    ATTENTION,
    ProducerCache,
    attention_implementation,
    chunked_nll,
    compiled,
    decode_attention,
    fast_generate,
    last_logits,
)
from crosslayer.kv import cache_nbytes, kv_bytes_per_token, plan
from crosslayer.modeling import CACHE_NAME
from crosslayer.quant import KV_FORMATS, QuantizedKV, channel_scale, quantize, quantized_cache

from .conftest import SHARED, tiny_config

FP8_MAX = 448.0


def _keys(shape=(2, 3, 50, 16)) -> torch.Tensor:
    """Rotary-like keys: a few channels 20x larger than the rest, as real K caches have."""
    x = torch.randn(shape)
    x[..., 3] *= 20
    x[..., 3 + shape[-1] // 2] *= 20
    return x


def test_int8_values_are_within_half_a_step_of_the_fp32_input():
    x = _keys()
    values, scale = quantize(x, KV_FORMATS["int8"])
    assert values.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (2, 3, 50, 1)
    step = (x.abs().amax(-1, keepdim=True) / 127).half().float()  # one step per token and head, as stored
    assert torch.equal(scale.float(), step)
    restored = values.float() * step  # plain dequantisation
    assert bool(((restored - x).abs() <= step / 2 + 1e-6).all())
    assert int(values.abs().max()) == 127  # the largest value of every vector uses the full range


def test_fp8_values_are_within_the_e4m3_rounding_error():
    x = _keys()
    values, scale = quantize(x, KV_FORMATS["fp8"])
    assert values.dtype == torch.float8_e4m3fn
    s = (x.abs().amax(-1, keepdim=True) / FP8_MAX).half().float()
    restored = values.float() * s
    y = x / s  # in the format's units: normal from 2^-6 (3 mantissa bits), subnormal spacing 2^-9 below
    bound = torch.where(y.abs() >= 2**-6, y.abs() * 2**-4, torch.full_like(y, 2**-10)) * s
    assert bool(((restored - x).abs() <= bound * (1 + 1e-3)).all())


def test_channel_scales_hold_every_rotation_of_the_calibration_keys():
    k = _keys()
    scale = channel_scale(k, KV_FORMATS["int8"]).float()  # (B, Hkv, 1, hd)
    half = k.shape[-1] // 2
    for angle in (0.3, 1.1, 2.5):  # RoPE rotates channel pairs (i, i + hd/2) by position-dependent angles
        c, s = math.cos(angle), math.sin(angle)
        rotated = torch.cat([k[..., :half] * c - k[..., half:] * s, k[..., half:] * c + k[..., :half] * s], -1)
        assert bool((rotated.abs() <= scale * 127 * (1 + 1e-3)).all())


def test_cache_stores_the_prefills_kv_within_the_formats_error():
    """The cache's dequantised K/V against the fp32 K/V transformers' own cache holds after the same prefill."""
    model = CLAForCausalLM(tiny_config(cla_factor=2, attn_implementation="sdpa")).eval()
    ids = torch.randint(0, 211, (2, 20))
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=reference, use_cache=True)
    for kv_dtype, rel in (("int8", 1 / 254), ("fp8", 2**-4), ("bf16", 2**-8)):
        cache = ProducerCache(model.config, 2, 24, torch.float32, "cpu", kv_dtype=kv_dtype)
        with torch.no_grad(), attention_implementation(model, ATTENTION):
            model(ids, cache=cache, use_cache=True)
        for slot, layer in enumerate(model.config.producer_layers):
            for stored, scales, exact in ((cache.keys, cache.key_scales, reference.layers[layer].keys),
                                          (cache.values, cache.value_scales, reference.layers[layer].values)):
                raw = stored[slot][:, :, :20]
                if kv_dtype == "fp8":
                    raw = raw.view(torch.float8_e4m3fn)
                restored = raw.float() * (scales[slot][:, :, :20].float() if scales is not None else 1)
                amax = exact.abs().amax(-1, keepdim=True)  # per token and head
                tolerance = amax * rel * 1.01 if kv_dtype == "int8" else exact.abs() * rel + amax * 2**-10
                assert bool(((restored - exact).abs() <= tolerance + 1e-7).all()), (kv_dtype, layer)


def test_one_token_8bit_attention_equals_sdpa_over_the_dequantised_kv(monkeypatch):
    B, Hkv, G, S, hd = 3, 2, 4, 37, 16
    q = torch.randn(B, Hkv * G, 1, hd)
    k, v = _keys((B, Hkv, S, hd)), torch.randn(B, Hkv, S, hd)
    mask = torch.rand(B, 1, 1, S) > 0.3
    mask[..., -1] = True
    for name in ("int8", "fp8"):
        for granularity in ("token", "channel"):
            fmt = KV_FORMATS[name]
            kq, ks = quantize(k, fmt, channel_scale(k, fmt) if granularity == "channel" else None)
            vq, vs = quantize(v, fmt)
            k_plain, v_plain = kq.float() * ks.float(), vq.float() * vs.float()  # dequantised here, independently
            expected = F.scaled_dot_product_attention(q, k_plain.repeat_interleave(G, 1), v_plain.repeat_interleave(G, 1),
                                                      attn_mask=mask, scale=0.25).transpose(1, 2)  # (B, 1, H, hd)
            out, _ = decode_attention(None, q, QuantizedKV(kq, ks), QuantizedKV(vq, vs), mask, scaling=0.25)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
            # the same in blocks of rows (what bounds the transient cast of a large cache)
            monkeypatch.setattr(decode_module, "DEQUANT_MIN_BYTES", Hkv * S * hd * 4)  # one row per block
            blocked, _ = decode_attention(None, q, QuantizedKV(kq, ks), QuantizedKV(vq, vs), mask, scaling=0.25)
            monkeypatch.undo()
            torch.testing.assert_close(blocked, expected, rtol=1e-5, atol=1e-5)


def test_kv_bytes_per_token_with_scales_and_cla2_int8_is_a_quarter_of_cla1_bf16():
    # SmolLM2-135M's shape: 30 layers, 3 KV heads of 64
    shape = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    cla1, cla2 = CLAConfig(**shape), CLAConfig(**shape, cla_factor=2)
    assert kv_bytes_per_token(cla1, "bf16") == 2 * 3 * 64 * 30 * 2 == 23040
    assert kv_bytes_per_token(cla2, "int8") == 2 * 3 * 15 * (64 * 1 + 2) == 5940  # values + one fp16 scale each
    assert kv_bytes_per_token(cla2, "int8") / kv_bytes_per_token(cla1, "bf16") == pytest.approx(0.25 * 66 / 64)
    r = plan(cla2, 1000, kv_dtype="fp8")
    assert r["kv_bytes_per_token"] == 5940 and r["kv_scale_bytes_per_token"] == 2 * 3 * 15 * 2


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_measured_8bit_cache_bytes_equal_the_hand_count(kv_dtype):
    model = CLAForCausalLM(tiny_config(cla_factor=3, attn_implementation="sdpa")).eval()  # 2 producers of 6
    out = fast_generate(model, torch.randint(0, 211, (3, 10)), max_new_tokens=5, kv_dtype=kv_dtype)
    # K and V x 2 producers x 3 rows x 2 heads x 15 slots x (16 one-byte values + one 2-byte scale)
    assert cache_nbytes(out.cache) == 2 * 2 * 3 * 2 * 15 * (16 + 2) == kv_bytes_per_token(model.config, kv_dtype) * 3 * 15
    channel = fast_generate(model, torch.randint(0, 211, (3, 10)), max_new_tokens=5, kv_dtype=kv_dtype,
                            k_granularity="channel").cache
    # keys: one scale per channel and row instead of per token: 2 producers x 3 rows x 2 heads x 16 channels
    assert cache_nbytes(channel) == 2 * 2 * 3 * 2 * 15 * 16 + 2 * 3 * 2 * 15 * 2 + 2 * 3 * 2 * 16 * 2


def _teacher_forced_logits(model, prompt, tokens, kv_dtype, compile):
    """Logits of the prompt's last position and of each step feeding `tokens`, through a static 8-bit cache."""
    B, T = prompt.shape
    cache = ProducerCache(model.config, B, T + tokens.shape[1], torch.float32, "cpu", static=True, kv_dtype=kv_dtype)

    def step(ids, pos, mask):
        return last_logits(model, cache, ids, pos, mask)

    step = compiled(step, torch.device("cpu"), model) if compile else step
    with torch.no_grad(), attention_implementation(model, ATTENTION):
        out = [last_logits(model, cache, prompt, torch.arange(T)[None], None)]
        cache.valid[:, :T] = True
        cache.length, cache.decoding = T, True
        for t in range(tokens.shape[1]):
            out.append(step(tokens[:, t:t + 1], torch.full((B, 1), T + t), cache.next_slot(masked=True)))
            cache.length += 1
    return torch.stack(out, 1)  # (B, steps + 1, V)


def test_8bit_decoding_is_the_same_eager_static_and_compiled(monkeypatch):
    monkeypatch.setitem(cpu_decode.CPU_COMPILE_OPTIONS, "max_autotune", False)  # GEMM autotuning only costs time here
    model = CLAForCausalLM(tiny_config(cla_factor=2, attn_implementation="sdpa")).eval()
    ids = torch.randint(0, 211, (2, 7))
    prompt, tokens = ids, torch.randint(0, 211, (2, 10))
    for kv_dtype in ("int8", "fp8"):
        eager = fast_generate(model, ids, max_new_tokens=10, kv_dtype=kv_dtype).sequences
        assert torch.equal(fast_generate(model, ids, max_new_tokens=10, kv_dtype=kv_dtype, static=True).sequences, eager)
        # compiled kernels may differ from eager ones in the last bit of an fp32 K or V, which can round one
        # 8-bit value the other way (one step of its format); beyond that the logits agree
        reference = _teacher_forced_logits(model, prompt, tokens, kv_dtype, compile=False)
        fused = _teacher_forced_logits(model, prompt, tokens, kv_dtype, compile=True)
        assert (fused - reference).abs().max() < 0.02 * reference.abs().max()


def test_scoring_through_the_cache_equals_a_full_forward_and_8bit_costs_little():
    model = CLAForCausalLM(tiny_config(cla_factor=2, attn_implementation="sdpa")).eval()
    stream = torch.randint(0, 211, (3 * 40 + 7,))  # 3 segments of 40; the 7 left over are not scored
    with torch.no_grad():
        rows = stream[:120].view(3, 40)
        logprobs = torch.log_softmax(model(rows).logits.float(), -1)[:, :-1]
        reference = -logprobs.gather(-1, rows[:, 1:, None]).double().sum().item()  # one full forward, no cache
    # token by token (decode steps), chunks (the last one shorter), a prompt of 10 then token by token
    for chunk, prefill in ((1, 0), (13, 0), (1, 10)):
        nll, count = chunked_nll(model, stream, 40, chunk, batch_size=2, prefill=prefill)
        assert count == 3 * 39 and nll == pytest.approx(reference, rel=1e-5)
    for kv_dtype in ("int8", "fp8"):
        quantised, _ = chunked_nll(model, stream, 40, 1, kv_dtype=kv_dtype, batch_size=2)
        assert quantised != reference and quantised == pytest.approx(reference, rel=1e-2)


# ----------------------------------------------------------------------------------------------
# transformers' QuantizedCache

BACKENDS = {
    "fp8": ({}, None),  # backend -> (its options, (module, pip package) or None)
    "quanto": (dict(nbits=4, q_group_size=16, residual_length=8), ("optimum.quanto", "optimum-quanto")),
    "hqq": (dict(nbits=4, q_group_size=16, residual_length=8), ("hqq", "hqq")),
}


@pytest.fixture(scope="module")
def llama_and_copies():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(to_llama_config(tiny_config(initializer_range=0.3))).eval()
    return llama, from_hf(llama), from_hf(llama, cla_factor=2)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_quantized_cache_cla1_copy_equals_llama_and_cla2_stores_producers_only(backend, llama_and_copies):
    options, package = BACKENDS[backend]
    if package is not None:
        module, dist = package
        pytest.importorskip(module, reason=f"the {backend} backend needs `pip install {dist}` (not in the dev extra)")
    llama, cla1, cla2 = llama_and_copies
    ids = torch.randint(1, 211, (2, 24))
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                  cache_implementation="quantized", cache_config={"backend": backend, **options})
    reference = llama.generate(ids, **kwargs)
    copy = cla1.generate(ids, **kwargs)
    assert torch.equal(copy.sequences, reference.sequences)  # the CLA1 copy decodes what the Llama decodes
    plain_kwargs = {k: v for k, v in kwargs.items() if not k.startswith("cache_")}
    shared = cla2.generate(ids, cache=quantized_cache(cla2.config, backend, **options), **plain_kwargs)
    producers = set(cla2.config.producer_layers)
    assert [i for i, layer in enumerate(getattr(shared, CACHE_NAME).layers)
            if not isinstance(layer, DummyLayer)] == sorted(producers)
    # 3 producers of 6 hold what 6 layers did
    assert cache_nbytes(getattr(shared, CACHE_NAME)) * 2 == cache_nbytes(getattr(copy, CACHE_NAME)) > 0
    # transformers' own QuantizedCache, every slot a quantised layer (consumers just never write theirs)
    plain = QuantizedCache(backend, PreTrainedConfig(num_hidden_layers=6), **options)
    unshared = cla2.generate(ids, cache=plain, **plain_kwargs)
    assert torch.equal(shared.sequences, unshared.sequences)
    assert cache_nbytes(getattr(unshared, CACHE_NAME)) == cache_nbytes(getattr(shared, CACHE_NAME))


def test_generate_with_cache_implementation_quantized_stores_producers_only(llama_and_copies):
    _, _, cla2 = llama_and_copies
    ids = torch.randint(1, 211, (2, 24))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    out = cla2.generate(ids, cache_implementation="quantized", cache_config={"backend": "fp8"}, **kwargs)
    layers = getattr(out, CACHE_NAME).layers
    assert [i for i, layer in enumerate(layers) if not isinstance(layer, DummyLayer)] == cla2.config.producer_layers
    # the same tokens as transformers' own QuantizedCache with a quantised slot for every layer
    unshared = cla2.generate(ids, cache=QuantizedCache("fp8", PreTrainedConfig(num_hidden_layers=6)), **kwargs)
    assert torch.equal(out.sequences, unshared.sequences)


def test_fp8_quantized_cache_bytes_by_hand(llama_and_copies):
    _, _, cla2 = llama_and_copies
    cache = quantized_cache(cla2.config, "fp8")
    cla2.generate(torch.randint(1, 211, (2, 24)), max_new_tokens=4, do_sample=False, pad_token_id=0, cache=cache)
    # 3 producers x K and V x (2 rows x 2 heads x 27 tokens x 16 one-byte values + one fp32 scale)
    assert cache_nbytes(cache) == 3 * 2 * (2 * 2 * 27 * 16 + 4)


# ----------------------------------------------------------------------------------------------
# A real model

SMOLLM2 = SHARED / "models" / "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_greedy_answer_is_the_same_through_8bit_and_bf16_caches():
    if not (SMOLLM2 / SMOLLM2_GGUF).exists():
        pytest.skip(f"{SMOLLM2 / SMOLLM2_GGUF} absent (it sits beside the checkout in CI)")
    from transformers import AutoTokenizer

    from crosslayer.convert import load_source

    model = from_hf(load_source(SMOLLM2 / SMOLLM2_GGUF))  # its exact CLA1 copy, fp32
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2, gguf_file=SMOLLM2_GGUF)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answers = {kv: fast_generate(model, chat["input_ids"], chat["attention_mask"], max_new_tokens=24,
                                 kv_dtype=kv).sequences[0, chat["input_ids"].shape[1]:] for kv in ("bf16", "int8", "fp8")}
    assert tokenizer.decode(answers["bf16"]).startswith("The capital of France is Paris.")
    assert torch.equal(answers["int8"], answers["bf16"]) and torch.equal(answers["fp8"], answers["bf16"])
