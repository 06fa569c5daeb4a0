import json

import torch

from crosslayer import CLAConfig, CLAForCausalLM
from crosslayer.__main__ import main
from crosslayer.bench.decode import build_models, bytes_per_decode_step, measure_bandwidth
from crosslayer.bench.memory import weight_bytes


def test_models_share_weights_and_the_cla1_copy_is_exact():
    llama, cla1, cla2 = build_models("tiny-H32-MQA-CLA2", torch.device("cpu"), torch.float32, 64)
    assert cla1.config.num_producer_layers == 4 and cla2.config.kv_sources == [0, 0, 2, 2]
    ids = torch.randint(0, 4096, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(cla1(ids).logits, llama(ids).logits, rtol=0, atol=1e-6)
    k = llama.model.layers[0].self_attn.k_proj.weight, llama.model.layers[1].self_attn.k_proj.weight
    assert torch.equal(cla2.model.layers[0].self_attn.k_proj.weight, (k[0] + k[1]) / 2)


def test_roofline_bytes_and_bandwidth():
    model = CLAForCausalLM(CLAConfig.from_preset("tiny-H32-MQA-CLA2")).eval()
    c = model.config
    embed = c.vocab_size * c.hidden_size * 4
    assert bytes_per_decode_step(model, c, 2, 100) == weight_bytes(model) - embed + 2 * c.hidden_size * 4 + 2 * 100 * 512
    bw = measure_bandwidth(torch.device("cpu"), nbytes=16 << 20, repeats=2)
    assert 1e8 < bw < 1e13  # a real copy of 16 MiB took a plausible time


def test_cli_table_ratios_and_json(tmp_path, capsys):
    code = main(["bench", "decode", "--preset", "tiny-H32-MQA-CLA2", "--batch-sizes", "1,2", "--prompt-len", "8",
                 "--new-tokens", "4", "--repeats", "1", "--warmup", "0", "--modes", "eager",
                 "--json", "--json-out", str(tmp_path / "d.json"), "--profile", str(tmp_path / "prof")])
    assert code == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "d.json").read_text())
    assert {(r["model"], r["batch"]) for r in result["rows"]} == {
        (m, b) for m in ("transformers", "CLA1", "tiny-H32-MQA-CLA2") for b in (1, 2)}
    assert all(r["decode_tokens_per_s"] > 0 and 0 < r["bw_util"] for r in result["rows"])
    assert result["greedy_equal_to_transformers"] == {"1": {"eager": True}, "2": {"eager": True}}
    kv = {r["model"]: r["kv_bytes_per_token"] for r in result["rows"]}
    assert kv["tiny-H32-MQA-CLA2"] * 2 == kv["CLA1"] == kv["transformers"]
    ratio = result["ratios"][0]
    rows = {r["model"]: r["decode_tokens_per_s"] for r in result["rows"] if r["batch"] == 1}
    assert abs(ratio["cla1_over_transformers"] - rows["CLA1"] / rows["transformers"]) < 1e-9
    assert len(result["profiles"]) == 2 and "Self CPU" in (tmp_path / "prof" / "profile-ours-eager-b1.txt").read_text()
    assert main(["bench", "decode", "--modes", "fast"]) == 2
    assert main(["bench", "decode", "--preset", "tiny-H32-MQA", "--repeats", "1"]) == 2  # shares nothing
