import json
import re

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from crosslayer import CLAConfig, CLAForCausalLM, CrossLayerError
from crosslayer.convert import from_hf
from crosslayer.eval.passkey import build_prompt, heatmap, passkey


class Oracle(nn.Module):
    """A stub 'model' that reads the prompt and answers with whatever number follows 'pass key is'."""

    def __init__(self, tokenizer, honest=True):
        super().__init__()
        self.tokenizer, self.honest = tokenizer, honest
        self.anchor = nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"max_position_embeddings": 4096})()

    def generate(self, input_ids, max_new_tokens, **kw):
        text = self.tokenizer.decode(input_ids[0])
        key = re.search(r"pass key is (\d+)", text)[1] if self.honest else "11111"
        answer = self.tokenizer(" " + key, add_special_tokens=False, return_tensors="pt").input_ids
        return torch.cat([input_ids, answer[:, :max_new_tokens]], 1)


def test_prompt_has_the_length_and_the_key_at_its_depth(wiki_tokenizer):
    for length in (200, 300, 1000):
        for depth in (0.0, 0.5, 1.0):
            ids = build_prompt(wiki_tokenizer, length, depth, 12345)
            assert length - 40 <= len(ids) <= length
            text = wiki_tokenizer.decode(ids)
            assert text.count("12345") == 2 and text.endswith("The pass key is")
            before = text[: text.index("12345")].count("The grass is green")
            total = text.count("The grass is green")
            assert total >= 1 and abs(before / total - depth) <= 0.5 / total + 1e-9


def test_oracle_finds_every_key_and_liars_and_random_models_do_not(wiki_tokenizer, tmp_path):
    lengths, depths = [200, 300], [0.0, 0.5, 1.0]
    good = passkey(Oracle(wiki_tokenizer), wiki_tokenizer, lengths, depths, trials=3, progress=False)
    assert good["accuracy"] == 1.0 and len(good["cells"]) == 6
    assert passkey(Oracle(wiki_tokenizer, honest=False), wiki_tokenizer, lengths, depths, trials=3,
                   progress=False)["accuracy"] == 0.0
    model = CLAForCausalLM(CLAConfig.from_preset("tiny-H32-MQA-CLA2", vocab_size=400)).eval()
    assert passkey(model, wiki_tokenizer, [200], [0.5], trials=2, progress=False)["accuracy"] == 0.0
    heatmap(good, tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(CrossLayerError, match="depths"):
        passkey(model, wiki_tokenizer, [200], [1.5], progress=False)
    with pytest.raises(CrossLayerError, match="cannot hold"):
        passkey(model, wiki_tokenizer, [40], [0.5], progress=False)


def test_llama_and_its_cla1_copy_answer_identically(wiki_tokenizer):
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=1)).eval()
    a = passkey(llama, wiki_tokenizer, [200], [0.0, 1.0], trials=2, progress=False)
    b = passkey(from_hf(llama), wiki_tokenizer, [200], [0.0, 1.0], trials=2, progress=False)
    assert [c["answers"] for c in a["cells"]] == [c["answers"] for c in b["cells"]]


def test_cli_writes_json_and_heatmap(wiki_tokenizer, tmp_path, capsys):
    from crosslayer.__main__ import main

    model = CLAForCausalLM(CLAConfig.from_preset("tiny-H32-MQA-CLA2", vocab_size=400))
    model.save_pretrained(tmp_path / "m")
    wiki_tokenizer.save_pretrained(tmp_path / "m")
    code = main(["eval", "passkey", str(tmp_path / "m"), "--lengths", "200,300", "--depths", "0,1", "--trials", "1",
                 "--out", str(tmp_path / "out"), "--no-progress", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(c["length"], c["depth"]) for c in result["cells"]] == [(200, 0), (200, 1), (300, 0), (300, 1)]
    assert (tmp_path / "out" / "passkey.png").exists() and (tmp_path / "out" / "passkey.json").exists()
    assert main(["eval", "passkey", str(tmp_path / "m"), "--lengths", "abc"]) == 2
