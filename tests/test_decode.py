import subprocess
import sys

import pytest
import torch

from crosslayer import CLAConfig, CLAForCausalLM, CrossLayerError, cpu_decode
from crosslayer.cpu_decode import CPUDecoding
from crosslayer.decode import ProducerCache, fast_generate, sample_next
from crosslayer.kv import cache_nbytes
from tests.conftest import tiny_config

PATTERNS = [dict(cla_factor=1), dict(cla_factor=2), dict(cla_factor=3), dict(cla_factor=2, cla_pattern="keep_ends"),
            dict(kv_sources=[0, 0, 0, 3, 3, 5])]


def _model(attn="sdpa", **overrides):
    return CLAForCausalLM(tiny_config(initializer_range=0.3, attn_implementation=attn, **overrides)).eval()


def _batch():
    ids = torch.randint(1, 211, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding of different lengths
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: "-".join(f"{k}{v}" for k, v in p.items()))
def test_greedy_fast_path_equals_transformers_generate_with_a_dynamic_cache(pattern, static):
    model = _model(**pattern)
    ids, mask = _batch()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    out = fast_generate(model, ids, mask, max_new_tokens=20, static=static)
    assert torch.equal(out.sequences, ref)
    # and without padding, where no mask is built at all
    ref = model.generate(ids[:1], max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(fast_generate(model, ids[:1], max_new_tokens=20, static=static).sequences, ref)


@pytest.mark.parametrize("static", [False, True])
def test_decode_logits_equal_a_full_forward_eager_kernel_too(static):
    model = _model(attn="eager", cla_factor=2)  # the full forward attends with transformers-style eager attention
    ids, mask = _batch()
    out = fast_generate(model, ids, mask, max_new_tokens=6, static=static, output_logits=True)
    with torch.no_grad():
        full = model(out.sequences, attention_mask=torch.cat([mask, torch.ones(3, 6, dtype=mask.dtype)], 1)).logits
    # the prompt's last position and every decode step (each row's real tokens only; padding never scores)
    torch.testing.assert_close(out.logits, full[:, 10:-1], rtol=1e-4, atol=1e-4)  # fp32, different kernels


def test_cache_holds_producers_only_and_its_bytes_equal_a_hand_count():
    ids = torch.randint(0, 211, (3, 12))
    sizes = {}
    for factor, producers in ((1, 6), (2, 3), (3, 2)):
        model = _model(cla_factor=factor)
        cache = fast_generate(model.to(torch.bfloat16), ids, max_new_tokens=4).cache  # 16 slots, bf16
        assert len(cache.keys) == producers and cache.keys[0].shape == (3, 2, 16, 16)  # (batch, KV heads, slots, hd)
        # K and V x producers x 3 rows x 2 KV heads x 16 slots x head_dim 16 x 2 bytes
        assert cache_nbytes(cache) == 2 * producers * 3 * 2 * 16 * 16 * 2
        sizes[factor] = cache_nbytes(cache)
        # what the cache holds for the prompt is each producer's K/V of a plain forward (transformers' cache)
        with torch.no_grad():
            reference = model(ids, use_cache=True).cache
        for slot, layer in enumerate(model.config.producer_layers):
            assert torch.equal(cache.keys[slot][:, :, :12], reference.layers[layer].keys)
    assert sizes[1] == 2 * sizes[2] == 3 * sizes[3] == 36864


def test_eos_stops_rows_pads_them_and_ends_early():
    model = _model(cla_factor=2)
    ids, mask = _batch()
    free = fast_generate(model, ids, mask, max_new_tokens=12).sequences[:, 11:]
    eos = int(free[0, 2])  # row 0 emits this at step 2; use it as EOS
    out = fast_generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0).sequences[:, 11:]
    for row in range(3):
        hits = (free[row] == eos).nonzero()
        stop = int(hits[0]) if len(hits) else None
        if stop is None:
            assert torch.equal(out[row, :free.shape[1]], free[row, :out.shape[1]])
        else:
            assert torch.equal(out[row, :stop + 1], free[row, :stop + 1]) and bool((out[row, stop + 1:] == 0).all())
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=eos)
    assert torch.equal(torch.cat([ids, out], 1), ref)  # same tokens and same early end as transformers


def test_sampling_is_seeded_and_respects_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    # softmax mass of the first two tokens is 0.64 + 0.24 = 0.88 >= 0.8: the nucleus is {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.8, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}
    assert set(sample_next(logits, 1.0, generator=g).tolist()) == {0, 1, 2, 3, 4}
    freq = (sample_next(logits, 1.0, generator=g) == 0).float().mean()
    assert abs(freq - logits[0].softmax(-1)[0]) < 0.05
    assert torch.equal(sample_next(logits[:1], 0.0), torch.tensor([0]))
    model = _model(cla_factor=2)
    ids, mask = _batch()
    runs = [fast_generate(model, ids, mask, max_new_tokens=10, temperature=1.0, top_k=50,
                          generator=torch.Generator().manual_seed(s)).sequences for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_reused_cache_and_bad_inputs():
    model = _model(cla_factor=2)
    ids, mask = _batch()
    cache = ProducerCache(model.config, 3, 64, torch.float32, "cpu")
    first = fast_generate(model, ids, mask, max_new_tokens=8, cache=cache).sequences
    again = fast_generate(model, ids, mask, max_new_tokens=8, cache=cache).sequences  # no stale state carried over
    assert torch.equal(first, again)
    with pytest.raises(CrossLayerError, match="cache is for batch 3"):
        fast_generate(model, ids[:2], max_new_tokens=8, cache=cache)
    with pytest.raises(CrossLayerError, match="needs a crosslayer model"):
        fast_generate(torch.nn.Linear(2, 2), ids)
    with pytest.raises(CrossLayerError, match="max_new_tokens"):
        fast_generate(model, ids, max_new_tokens=0)


def test_right_padding_and_too_long_a_generation_are_refused_before_any_work(monkeypatch):
    model = _model(cla_factor=2)  # max_position_embeddings 128
    ids, mask = _batch()

    def no_work(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(model, "forward", no_work)
    right = mask.flip(-1)  # the same rows padded on the right
    with pytest.raises(CrossLayerError, match="left-padded"):
        fast_generate(model, ids, right, max_new_tokens=4)
    gap = torch.ones_like(mask)
    gap[0, 4] = 0  # a hole inside a row
    with pytest.raises(CrossLayerError, match="left-padded"):
        fast_generate(model, ids, gap, max_new_tokens=4)
    empty = mask.clone()
    empty[2] = 0
    with pytest.raises(CrossLayerError, match="left-padded"):
        fast_generate(model, ids, empty, max_new_tokens=4)
    with pytest.raises(CrossLayerError, match=r"prompt \(11 tokens\) \+ max_new_tokens \(118\) exceeds .* \(128\)"):
        fast_generate(model, ids, mask, max_new_tokens=118)
    monkeypatch.undo()
    assert fast_generate(model, ids, mask, max_new_tokens=117).sequences.shape == (3, 11 + 117)  # exactly at the limit


def test_compiled_decode_step_equals_eager(monkeypatch):
    model = CLAForCausalLM(CLAConfig.from_preset("tiny-H32-MQA-CLA2", initializer_range=0.2,
                                                 attn_implementation="sdpa")).eval()
    ids = torch.randint(0, 4096, (2, 7))
    eager = fast_generate(model, ids, max_new_tokens=10, output_logits=True)
    compiled = fast_generate(model, ids, max_new_tokens=10, compile=True, output_logits=True)
    assert torch.equal(eager.sequences, compiled.sequences)
    # logits too (a cache write frozen into the step as a constant changes them long before a token flips)
    torch.testing.assert_close(compiled.logits, eager.logits, rtol=1e-4, atol=1e-4)
    eager = eager.sequences
    # the compiled CPU step freezes the weights in: changed in place, they must be seen, not the frozen ones
    # (recompiled without autotuning the GEMMs, which only costs the test time here)
    monkeypatch.setitem(cpu_decode.CPU_COMPILE_OPTIONS, "max_autotune", False)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(-3.0)
        model.lm_head.weight.add_(0.5 * torch.randn_like(model.lm_head.weight))
    eager_new = fast_generate(model, ids, max_new_tokens=10).sequences
    assert not torch.equal(eager_new, eager)
    assert torch.equal(fast_generate(model, ids, max_new_tokens=10, compile=True).sequences, eager_new)


def test_cpu_linears_equal_torchs_linear_on_both_paths():
    torch.manual_seed(0)
    for rows, (n, k) in ((1, (48, 32)), (9, (48, 32)), (1, (1024, 1024)), (3, (1024, 1030))):
        x, w, b = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
        expected = x.double() @ w.double().T + b.double()  # a plain matmul in double precision
        for bias in (b, None):
            with CPUDecoding().linears(torch.nn.Module(), rows=rows) as cpu:
                out = cpu.packed_linear(x, w, bias)
            torch.testing.assert_close(out.double(), expected - (0 if bias is not None else b.double()),
                                       rtol=1e-4, atol=1e-4)
    with CPUDecoding().linears(torch.nn.Module()) as cpu:  # a weight changed in place is packed again
        packed_linear = cpu.packed_linear
        x, w = torch.randn(9, 32), torch.randn(48, 32)
        before = packed_linear(x, w, None)
        w.mul_(2)
        torch.testing.assert_close(packed_linear(x, w, None), 2 * before)
    model = _model(cla_factor=2)
    for ids in (torch.randint(1, 211, (2, 9)), torch.randint(1, 211, (1, 1))):  # oneDNN (18 rows); torch (1 row)
        with torch.no_grad():
            plain = model(ids).logits
            with CPUDecoding().linears(model):
                routed = model(ids).logits
        torch.testing.assert_close(routed, plain, rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(model.lm_head)  # restored afterwards


def test_importing_registers_nothing_and_each_caller_owns_its_packed_weights():
    # a fresh interpreter: the attention kernel and the op appear at their first use, not at import
    code = ("import torch, crosslayer.decode\n"
            "from transformers import AttentionInterface\n"
            "print('crosslayer_decode' in AttentionInterface._global_mapping,\n"
            "      hasattr(torch.ops.crosslayer, 'packed_linear'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    model = _model(cla_factor=2)
    x, w = torch.randn(9, 32), torch.randn(48, 32)
    first, second = CPUDecoding(), CPUDecoding()
    with torch.no_grad(), first.linears(model, rows=9):
        expected = x @ w.T
        torch.testing.assert_close(torch.ops.crosslayer.packed_linear(x, w, None), expected, rtol=1e-5, atol=1e-5)
        assert len(first.packed) == 1  # the op packed into the object whose block runs
        with second.linears(torch.nn.Module()):
            torch.ops.crosslayer.packed_linear(x, w, None)
            assert len(second.packed) == 1 and len(first.packed) == 1
        assert not second.packed  # freed on the way out
        torch.ops.crosslayer.packed_linear(x, w, None)
        assert len(first.packed) == 1  # back to the outer block's pack, not packed again
    assert not first.packed
