import re

import pytest

from crosslayer import PRESETS, CLAConfig, CrossLayerError, kv_sources_for
from crosslayer.config import load_config, preset_fields

from .conftest import SHARED, tiny_config


def test_uniform_groups_from_layer_zero_last_group_shorter():
    assert kv_sources_for(7, 3, "uniform") == [0, 0, 0, 3, 3, 3, 6]
    assert kv_sources_for(4, 1, "uniform") == [0, 1, 2, 3]


def test_patterns_at_paper_shape_have_eleven_producers():
    keep = kv_sources_for(20, 2, "keep_ends")
    front = kv_sources_for(20, 2, "dense_front")
    back = kv_sources_for(20, 2, "dense_back")
    assert keep[:4] == [0, 1, 1, 3] and keep[-2:] == [17, 19]
    assert front[:5] == [0, 1, 2, 2, 4]
    assert back[-3:] == [16, 18, 19] and back[:2] == [0, 0]
    for sources in (keep, front, back):
        assert sum(s == i for i, s in enumerate(sources)) == 11


@pytest.mark.parametrize("fields, message", [
    (dict(kv_sources=[0, 2, 2, 3, 4, 5]), r"kv_sources\[1\] = 2 points at a later layer"),
    (dict(kv_sources=[0, 0, 1, 3, 4, 5]), r"kv_sources\[2\] = 1, but layer 1 is itself a consumer"),
    (dict(kv_sources=[0, 0, 2]), r"kv_sources has 3 entries but the model has num_hidden_layers=6"),
    (dict(kv_sources=[0, -1, 2, 3, 4, 5]), r"kv_sources\[1\] = -1 is negative"),
    (dict(kv_sources=[0, 0.5, 2, 3, 4, 5]), r"must be a list of layer indices"),
    (dict(num_attention_heads=4, num_key_value_heads=3), r"must be divisible by num_key_value_heads"),
    (dict(num_attention_heads=2, num_key_value_heads=4), r"cannot exceed num_attention_heads"),
    (dict(cla_factor=0), r"cla_factor must be an integer >= 1"),
    (dict(cla_pattern="zigzag"), r"cla_pattern must be one of uniform, keep_ends"),
    (dict(head_dim=15), r"head_dim must be even"),
    (dict(hidden_size=0), r"hidden_size must be a positive integer"),
    (dict(kv_sources=[0, 0, 0, 3, 3, 3], cla_factor=2), r"contradicts cla_factor=2"),
    (dict(cla_pattern="custom"), r"needs an explicit kv_sources"),
    (dict(attention_dropout=0.1), r"no dropout"),
])
def test_invalid_configs_rejected_with_their_message(fields, message):
    with pytest.raises(CrossLayerError, match=message):
        tiny_config(**fields)


def test_explicit_kv_sources_become_custom_and_survive_save(tmp_path):
    c = tiny_config(kv_sources=[0, 0, 0, 3, 4, 4])
    assert c.cla_pattern == "custom" and c.producer_layers == [0, 3, 4]
    assert c.kv_sharing_modes == ["store", "reuse", "reuse", None, "store", "reuse"]
    c.save_pretrained(tmp_path)
    again = CLAConfig.from_pretrained(tmp_path)
    assert again.kv_sources == [0, 0, 0, 3, 4, 4] and again.cla_pattern == "custom"


def test_num_parameters_matches_built_model():
    from crosslayer import CLAForCausalLM

    for c in (tiny_config(cla_factor=2), tiny_config(cla_factor=3, tie_word_embeddings=True, attention_bias=True)):
        model = CLAForCausalLM(c)
        assert c.num_parameters() == sum(p.numel() for p in model.parameters())


def _paper_table():
    """(model, KV bytes) rows of every table in the paper's reference figures."""
    text = (SHARED / "paper" / "README.md").read_text()
    rows = {}
    for section in re.split(r"\n## ", text):
        scale = "3b" if section.startswith("Table 5") or section.startswith("Table 7") else "1b"
        if not section.startswith(("Table 1", "Table 3", "Table 5", "Table 7")):
            continue
        for m in re.finditer(r"^\| (H\d+-[\w-]+) \| (\d+) \|", section, re.M):
            rows[f"{scale}-{m[1]}"] = int(m[2])
    return rows


def test_presets_reproduce_the_papers_kv_column():
    if not (SHARED / "paper" / "README.md").exists():
        pytest.skip("paper reference figures absent")
    table = _paper_table()
    assert len(table) >= 25  # all of Table 1 plus the 3B models
    for name, kv_bytes in table.items():
        assert name in PRESETS, name
        assert CLAConfig.from_preset(name).kv_bytes_per_token() == kv_bytes, name


def test_preset_shapes_and_head_count_choices():
    c = CLAConfig.from_preset("1b-H128-MQA")
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads) == (2048, 5472, 20, 16)
    assert CLAConfig.from_preset("1b-H46-MQA").num_attention_heads == 45
    assert CLAConfig.from_preset("1b-H90-MQA-CLA2").num_attention_heads == 23
    assert CLAConfig.from_preset("3b-H64-MQA").num_attention_heads == 48
    assert CLAConfig.from_preset("tinyllama-1.1b-CLA2").kv_bytes_per_token() == 2 * 4 * 64 * 11 * 2
    assert preset_fields("1b-H128-GQA4-CLA2")["num_key_value_heads"] == 4
    with pytest.raises(CrossLayerError, match="unknown preset"):
        CLAConfig.from_preset("2b-H128-MQA")
    with pytest.raises(CrossLayerError, match="needs a -CLA"):
        CLAConfig.from_preset("1b-H128-MQA-KeepEnds")


def test_load_config_from_llama_json_and_yaml(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=1, vocab_size=100).save_pretrained(tmp_path / "llama")
    c = load_config(str(tmp_path / "llama"), cla_factor=2)
    assert c.num_producer_layers == 2 and c.head_dim == 16 and c.num_key_value_heads == 1
    (tmp_path / "m.yaml").write_text("preset: tiny-H32-MQA\ncla_factor: 2\n")
    assert load_config(str(tmp_path / "m.yaml")).kv_bytes_per_token() == 256
    (tmp_path / "bad.yaml").write_text("hidden_sise: 3\n")
    with pytest.raises(CrossLayerError, match="unknown config field"):
        load_config(str(tmp_path / "bad.yaml"))
    with pytest.raises(CrossLayerError, match="not found"):
        load_config(str(tmp_path / "missing.json"))
