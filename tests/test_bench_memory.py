import json

import pytest
import torch

from crosslayer import CLAConfig, CLAForCausalLM
from crosslayer.__main__ import main
from crosslayer.bench.memory import _fits, allocation_bytes, largest_batch, measured_cache_bytes, weight_bytes


@pytest.mark.parametrize("limit", [1, 7, 100])
def test_largest_batch_search_is_exact_for_any_threshold(limit):
    for true_max in (0, 1, 2, 5, 64, 99):
        calls = []

        def fits(b, calls=calls, true_max=true_max):
            calls.append(b)
            return b <= true_max

        assert largest_batch(fits, limit=limit) == min(true_max, limit)
        assert len(calls) <= 2 * max(1, limit).bit_length() + 2


def test_measured_equals_analytic_and_cla2_is_half():
    sizes = {}
    for preset in ("tiny-H32-MQA", "tiny-H32-MQA-CLA2", "tiny-H32-GQA2"):
        model = CLAForCausalLM(CLAConfig.from_preset(preset)).to(torch.bfloat16).eval()
        for batch, context in ((1, 16), (3, 40)):
            measured = measured_cache_bytes(model, batch, context)
            assert measured == batch * context * model.config.kv_bytes_per_token(2)
        sizes[preset] = measured
    assert sizes["tiny-H32-MQA-CLA2"] * 2 == sizes["tiny-H32-MQA"]
    assert sizes["tiny-H32-GQA2"] == 2 * sizes["tiny-H32-MQA"]


def test_budget_search_finds_the_true_largest_batch_and_cla2_serves_twice_as_many():
    budget, context = 10 * 2**20, 96
    found = {}
    for preset in ("tiny-H32-MQA", "tiny-H32-MQA-CLA2"):
        model = CLAForCausalLM(CLAConfig.from_preset(preset)).eval()
        fits = _fits(model, context, budget)
        best = largest_batch(fits)
        assert fits(best) and not fits(best + 1)  # the true largest, checked by allocating both
        per_sequence = context * model.config.kv_bytes_per_token(4)
        assert allocation_bytes(model, best, context) == weight_bytes(model) + best * per_sequence
        found[preset] = best
    assert found["tiny-H32-MQA-CLA2"] >= 1.9 * found["tiny-H32-MQA"]


def test_cli_table_json_and_plot(tmp_path, capsys):
    code = main(["bench", "memory", "--presets", "tiny-H32-MQA,tiny-H32-MQA-CLA2", "--batch-sizes", "1,2",
                 "--context-lengths", "32,64", "--budget", "8MiB", "--dtype", "fp32", "--plot", str(tmp_path / "kv.png"),
                 "--json", "--json-out", str(tmp_path / "m.json")])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "m.json").read_text())
    assert all(r["measured_bytes"] == r["analytic_bytes"] for r in result["rows"]) and len(result["rows"]) == 8
    assert all(c["largest_batch"] == c["analytic_largest_batch"] for c in result["capacity"])
    assert (tmp_path / "kv.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["bench", "memory", "--batch-sizes", "0"]) == 2
