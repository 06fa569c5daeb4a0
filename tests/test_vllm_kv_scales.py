"""fp8 KV-cache scales for vLLM (crosslayer.serving.kv_scales): calibration and the kv_scales.json file.

No vLLM needed: calibration runs the transformers model; the reference is transformers' own Llama.
"""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from crosslayer.convert import from_hf
from crosslayer.errors import CrossLayerError
from crosslayer.serving.kv_scales import FILE, calibrate_kv_scales, read_kv_scales, write_kv_scales

from .conftest import tiny_config


def _cache_of(output):
    """The cache a transformers forward returned (`cache` since 5.2x, `past_key_values` before)."""
    return output.cache if hasattr(output, "cache") else output.past_key_values


@torch.no_grad()
def test_calibrated_scales_are_the_amax_of_llamas_own_cache_over_448():
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         attn_implementation="eager")).eval()
    batches = [torch.randint(0, 97, (2, 11)), torch.randint(0, 97, (1, 23))]
    amax = {i: [0.0, 0.0] for i in range(3)}
    for ids in batches:
        cache = _cache_of(llama(ids, use_cache=True))
        for i, layer in enumerate(cache.layers):
            amax[i][0] = max(amax[i][0], layer.keys.abs().max().item())
            amax[i][1] = max(amax[i][1], layer.values.abs().max().item())
    scales = calibrate_kv_scales(from_hf(llama, cla_factor=1), batches)
    assert scales["tokens"] == 2 * 11 + 23
    for i in range(3):
        assert scales["k_scale"][str(i)] == pytest.approx(amax[i][0] / 448, rel=1e-5)
        assert scales["v_scale"][str(i)] == pytest.approx(amax[i][1] / 448, rel=1e-5)


def test_scales_file_round_trip_holds_one_pair_per_producer(tmp_path):
    from crosslayer import CLAForCausalLM

    config = tiny_config(kv_sources=[0, 0, 2, 2, 2, 5])
    scales = calibrate_kv_scales(CLAForCausalLM(config).eval(), [torch.randint(0, 211, (1, 9))])
    assert set(scales["k_scale"]) == set(scales["v_scale"]) == {"0", "2", "5"}
    write_kv_scales(tmp_path, scales)
    read = read_kv_scales(tmp_path, config)
    assert read == {i: (scales["k_scale"][str(i)], scales["v_scale"][str(i)]) for i in (0, 2, 5)}
    assert read_kv_scales(tmp_path / "elsewhere", config) is None


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(format="other"), "not a crosslayer KV-scales file"),
    (lambda s: s["k_scale"].pop("2"), "one scale per producer layer"),
    (lambda s: s["v_scale"].update({"1": 0.5}), "one scale per producer layer"),
    (lambda s: s["v_scale"].update({"5": 0.0}), "must be positive"),
])
def test_a_bad_scales_file_is_refused_naming_the_problem(tmp_path, edit, message):
    config = tiny_config(kv_sources=[0, 0, 2, 2, 2, 5])
    scales = {"format": "crosslayer-kv-scales", "fp8_max": 448.0, "tokens": 1,
              "k_scale": {"0": 0.1, "2": 0.1, "5": 0.1}, "v_scale": {"0": 0.1, "2": 0.1, "5": 0.1}}
    edit(scales)
    (tmp_path / FILE).write_text(json.dumps(scales))
    with pytest.raises(CrossLayerError, match=message):
        read_kv_scales(tmp_path, config)
