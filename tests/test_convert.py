import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from crosslayer import CLAForCausalLM, CrossLayerError
from crosslayer.convert import from_hf


def tiny_llama(**kw):
    fields = dict(vocab_size=257, hidden_size=64, intermediate_size=112, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=128, rope_theta=1000.0, initializer_range=0.05)
    fields.update(kw)
    return LlamaForCausalLM(LlamaConfig(**fields)).eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("tie", [False, True])
def test_cla1_copy_of_gqa_llama_has_identical_logits(attn, tie):
    llama = tiny_llama(tie_word_embeddings=tie, attn_implementation=attn)
    cla = from_hf(llama)
    assert isinstance(cla, CLAForCausalLM) and cla.config.num_key_value_heads == 2
    ids = torch.randint(0, 257, (3, 17))
    with torch.no_grad():
        torch.testing.assert_close(cla(ids).logits, llama(ids).logits, rtol=0, atol=1e-6)
        # cached decoding of the copy equals the original's
        a = llama.generate(ids[:, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
        b = cla.generate(ids[:, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_llama3_rope_scaling_is_carried_over(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    llama = tiny_llama(rope_parameters=rope, max_position_embeddings=256)
    llama.save_pretrained(tmp_path / "src")
    cla = from_hf(tmp_path / "src")  # from a folder, as users have
    ids = torch.randint(0, 257, (1, 100))
    with torch.no_grad():
        torch.testing.assert_close(cla(ids).logits, llama(ids).logits, rtol=0, atol=1e-5)


def test_factor_two_mean_and_first():
    llama = tiny_llama()
    layers = llama.model.layers
    mean = from_hf(llama, cla_factor=2, kv_init="mean")
    first = from_hf(llama, cla_factor=2, kv_init="first")
    assert mean.config.kv_sources == [0, 0, 2, 2]
    for p in (0, 2):
        for proj in ("k_proj", "v_proj"):
            a, b = getattr(layers[p].self_attn, proj).weight, getattr(layers[p + 1].self_attn, proj).weight
            assert torch.equal(getattr(mean.model.layers[p].self_attn, proj).weight, (a + b) / 2)
            assert torch.equal(getattr(first.model.layers[p].self_attn, proj).weight, a)
        norms = layers[p].input_layernorm.weight, layers[p + 1].input_layernorm.weight
        assert torch.equal(mean.model.layers[p].kv_layernorm.weight, (norms[0] + norms[1]) / 2)
        # consumers keep their own query-side weights
        assert torch.equal(mean.model.layers[p + 1].self_attn.q_proj.weight, layers[p + 1].self_attn.q_proj.weight)
        assert torch.equal(mean.model.layers[p + 1].input_layernorm.weight, layers[p + 1].input_layernorm.weight)


def test_converted_model_does_not_share_storage_with_source():
    llama = tiny_llama()
    cla = from_hf(llama)
    with torch.no_grad():
        cla.model.layers[0].self_attn.q_proj.weight.add_(1.0)
    assert not torch.equal(cla.model.layers[0].self_attn.q_proj.weight, llama.model.layers[0].self_attn.q_proj.weight)


def test_bad_inputs(tmp_path):
    with pytest.raises(CrossLayerError, match="kv_init must be one of"):
        from_hf(tiny_llama(), kv_init="median")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CrossLayerError, match="no config.json"):
        from_hf(tmp_path / "empty")
