import json
import math

import pytest
import torch

from crosslayer import CLAForCausalLM
from crosslayer.__main__ import main
from crosslayer.bench.train import flops_per_token
from crosslayer.config import CLAConfig

from .test_bench_memory import assert_names_this_cpu


@pytest.mark.parametrize("preset", ["tiny-H32-MQA", "tiny-H32-MQA-CLA2", "tiny-H32-GQA2"])
def test_flops_per_token_equals_the_flops_a_training_step_performs(preset):
    from torch.utils.flop_counter import FlopCounterMode

    config = CLAConfig.from_preset(preset, attn_implementation="eager")  # matmuls the counter sees on a CPU
    model = CLAForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (2, 48))
    with FlopCounterMode(display=False) as counter:  # counts every matmul and attention kernel, forward and backward
        model(input_ids=ids, labels=ids).loss.backward()
    assert flops_per_token(config, 48) * 2 * 48 == counter.get_total_flops()


def test_bench_train_reports_every_model_and_ratios(capsys, tmp_path, monkeypatch):
    from crosslayer.train import SequenceOrder

    consumed = []  # tokens our trainer really reads per call, counted here
    real_batch = SequenceOrder.batch

    def counting(self, indices):
        rows = real_batch(self, indices)
        consumed.append(rows[:, 1:].numel())
        return rows

    monkeypatch.setattr(SequenceOrder, "batch", counting)
    out = tmp_path / "r.json"
    code = main(["bench", "train", "--presets", "tiny-H32-MQA,tiny-H32-MQA-CLA2", "--seq-len", "32",
                 "--micro-batch", "2", "--steps", "1", "--warmup", "1", "--repeats", "2", "--json", "--json-out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    result = json.loads(printed.strip().splitlines()[-1])
    assert result == json.loads(out.read_text())
    assert printed.splitlines()[1].startswith("CPU: ")  # the header names the CPU, its matrix features and GEMM peaks
    assert_names_this_cpu(result["cpu"], printed.splitlines()[1])
    names = [r["name"] for r in result["rows"]]
    assert names == ["transformers Llama (tiny-H32-MQA shape)", "crosslayer tiny-H32-MQA", "crosslayer tiny-H32-MQA-CLA2"]
    assert set(consumed) == {32 * 2}  # one micro-batch of 2 sequences x 32 tokens per step
    for r in result["rows"]:
        assert len(r["step_s_all"]) == 2 and min(r["step_s_all"]) <= r["step_s"] <= max(r["step_s_all"])
        assert r["tokens_per_s"] == pytest.approx(consumed[0] / r["step_s"])
    rows = {r["name"]: r for r in result["rows"]}
    assert result["ours_over_transformers"] == pytest.approx(
        rows["crosslayer tiny-H32-MQA"]["tokens_per_s"] / rows[names[0]]["tokens_per_s"])
    assert rows["crosslayer tiny-H32-MQA-CLA2"]["kv_bytes_per_token"] == 256


def test_bench_train_refuses_a_cla_baseline_shape():
    assert main(["bench", "train", "--presets", "tiny-H32-MQA-CLA2", "--steps", "1"]) == 2


def test_quickstart_trains_the_three_way_comparison(tmp_path, capsys):
    code = main(["quickstart", "--out", str(tmp_path / "qs"), "--steps", "2", "--seq-len", "64",
                 "--batch-tokens", "512", "--no-progress"])
    assert code == 0
    table = capsys.readouterr().out
    rows = json.loads((tmp_path / "qs" / "results.json").read_text())
    assert [r["model"] for r in rows] == ["tiny-H32-MQA", "tiny-H32-MQA-CLA2", "tiny-H16-MQA"]
    assert [r["kv_bytes_per_token"] for r in rows] == [512, 256, 256]
    for r in rows:
        assert math.isfinite(r["val_ppl"]) and r["val_ppl"] > 1 and r["tokens"] == 1024
        assert f"{r['val_ppl']:.2f}" in table
    assert (tmp_path / "qs" / "tiny-H32-MQA-CLA2" / "model.safetensors").exists()
    # it ends with the Pareto plot: CLA2 and H16 halve the KV bytes, so MQA is on the frontier only if it
    # beats both, and of the two 256-byte models only the lower perplexity is (both on a tie)
    assert (tmp_path / "qs" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mqa, cla2, h16 = (r["val_ppl"] for r in rows)
    assert [r["pareto"] for r in rows] == [mqa < min(cla2, h16), cla2 <= h16, h16 <= cla2]
    front = ", ".join(r["model"] for r in rows if r["pareto"])
    assert f"Pareto frontier (no other model has fewer KV bytes and lower perplexity): {front};" in table
    # a second run on the same folder reuses the data and the finished runs
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--steps", "2", "--seq-len", "64",
                 "--batch-tokens", "512", "--no-progress"]) == 0
    again = json.loads((tmp_path / "qs" / "results.json").read_text())
    assert [r["val_ppl"] for r in again] == [r["val_ppl"] for r in rows]
