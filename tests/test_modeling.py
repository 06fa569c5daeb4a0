import json
import subprocess
import sys

import pytest
import torch

import crosslayer  # noqa: F401  (registers the Auto classes)
from crosslayer import CLAForCausalLM
from crosslayer.kv import cache_nbytes
from crosslayer.modeling import CACHE_NAME  # past_key_values before transformers 5.2x

from .conftest import REPO, tiny_config

SHARINGS = [
    dict(cla_factor=1),
    dict(cla_factor=2, cla_pattern="uniform"),
    dict(cla_factor=3, cla_pattern="uniform"),
    dict(cla_factor=2, cla_pattern="keep_ends"),
    dict(cla_factor=2, cla_pattern="dense_front"),
    dict(cla_factor=2, cla_pattern="dense_back"),
    dict(kv_sources=[0, 0, 0, 3, 4, 4]),
]
IDS = ["cla1", "cla2", "cla3", "keep_ends", "dense_front", "dense_back", "explicit"]


def model_for(sharing, attn="sdpa", **kw):
    return CLAForCausalLM(tiny_config(**sharing, **kw, attn_implementation=attn)).eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("sharing", SHARINGS, ids=IDS)
def test_cached_decoding_equals_full_forward(sharing, attn):
    model = model_for(sharing, attn)
    ids = torch.randint(0, 211, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], use_cache=True)
        steps, cache = [out.logits], getattr(out, CACHE_NAME)
        for t in range(5, 12):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    # the cache holds exactly the producers' K/V, nothing for consumers
    producers = set(model.config.producer_layers)
    for i, layer in enumerate(cache.layers):
        assert (layer.keys is not None) == (i in producers)
    assert cache_nbytes(cache) == 2 * 12 * model.config.kv_bytes_per_token(bytes_per_element=4)


@pytest.mark.parametrize("sharing", SHARINGS, ids=IDS)
def test_generate_same_tokens_with_and_without_cache(sharing):
    model = model_for(sharing)
    ids = torch.randint(0, 211, (2, 6))
    with_cache = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    without = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert with_cache.shape == (2, 14)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("sharing", SHARINGS, ids=IDS)
def test_left_padded_batch_equals_sequences_alone(sharing, attn):
    model = model_for(sharing, attn)
    a, b = torch.randint(1, 211, (1, 9)), torch.randint(1, 211, (1, 5))
    pad = torch.zeros(1, 4, dtype=torch.long)
    batch = torch.cat([a, torch.cat([pad, b], 1)])
    mask = torch.cat([torch.ones(1, 9), torch.cat([torch.zeros(1, 4), torch.ones(1, 5)], 1)]).long()
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone_a = model.generate(a, max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone_b = model.generate(b, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0], alone_a[0])
    assert torch.equal(out[1, 4:], alone_b[0])
    # logits too, not only argmax
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).logits[1, 4:]
        single = model(b).logits[0]
    torch.testing.assert_close(padded, single, rtol=1e-5, atol=1e-5)


def test_cache_bytes_through_generate_and_cla2_is_half_of_cla1():
    sizes = {}
    for factor in (1, 2):
        model = model_for(dict(cla_factor=factor, num_hidden_layers=4)).to(torch.bfloat16)
        ids = torch.randint(0, 211, (3, 7))
        out = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
        seen = getattr(out, CACHE_NAME).get_seq_length()
        assert seen == 7 + 5 - 1  # the last generated token is never fed back
        sizes[factor] = cache_nbytes(getattr(out, CACHE_NAME))
        assert sizes[factor] == 3 * seen * model.config.kv_bytes_per_token(2)
    assert sizes[2] * 2 == sizes[1]


def test_gradients_reach_shared_kv_from_every_layer_of_its_group():
    # group of layer 0 is {0, 1, 2}; silence every other path into the loss but one layer's attention
    config = tiny_config(kv_sources=[0, 0, 0, 3, 3, 5], attn_implementation="eager")
    ids = torch.randint(0, 211, (2, 10))
    for reader in (0, 1, 2, None):
        model = CLAForCausalLM(config)
        with torch.no_grad():
            for j in range(6):
                if j != reader:
                    model.model.layers[j].self_attn.o_proj.weight.zero_()
        model(ids, labels=ids).loss.backward()
        grad_k = model.model.layers[0].self_attn.k_proj.weight.grad
        grad_v = model.model.layers[0].self_attn.v_proj.weight.grad
        grad_norm = model.model.layers[0].kv_layernorm.weight.grad
        if reader is None:  # the control: no layer reads the K/V into the output
            assert grad_k.abs().max() == 0 and grad_v.abs().max() == 0
        else:
            assert grad_k.abs().max() > 0 and grad_v.abs().max() > 0 and grad_norm.abs().max() > 0


def test_consumers_own_no_kv_weights():
    model = model_for(dict(cla_factor=2))
    names = {n for n, _ in model.named_parameters()}
    assert "model.layers.0.self_attn.k_proj.weight" in names and "model.layers.0.kv_layernorm.weight" in names
    assert not any(n.startswith("model.layers.1.self_attn.k_proj") or "layers.1.kv_layernorm" in n for n in names)


def test_eager_and_sdpa_agree():
    torch.manual_seed(1)
    eager = model_for(dict(cla_factor=2), "eager")
    sdpa = model_for(dict(cla_factor=2), "sdpa")
    sdpa.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 211, (2, 11))
    torch.testing.assert_close(eager(ids).logits, sdpa(ids).logits, rtol=1e-5, atol=1e-5)


def test_default_init_is_the_papers():
    from crosslayer import CLAConfig

    config = CLAConfig.from_preset("tiny-H32-MQA-CLA2")
    assert config.initializer_range == 0.01275
    w = CLAForCausalLM(config).model.layers[0].mlp.up_proj.weight
    assert abs(w.std().item() - 0.01275) < 5e-4 and abs(w.mean().item()) < 5e-4


def test_save_then_load_in_fresh_process_gives_identical_logits(tmp_path):
    model = model_for(dict(kv_sources=[0, 0, 0, 3, 4, 4]))
    model.save_pretrained(tmp_path / "m")
    ids = torch.randint(0, 211, (2, 9))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = model(ids).logits
    script = f"""
import torch, crosslayer
from transformers import AutoModelForCausalLM, AutoConfig
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r}).eval()
assert type(m).__name__ == "CLAForCausalLM", type(m)
ids = torch.load({str(tmp_path / 'ids.pt')!r})
with torch.no_grad():
    torch.save(m(ids).logits, {str(tmp_path / 'out.pt')!r})
print(AutoConfig.from_pretrained({str(tmp_path / 'm')!r}).kv_sources)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [0, 0, 0, 3, 4, 4]
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_activation_checkpointing_gives_identical_gradients():
    model = CLAForCausalLM(tiny_config(cla_factor=3)).train()
    ids = torch.randint(0, 211, (2, 16))
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        assert torch.equal(plain[n], p.grad), n
