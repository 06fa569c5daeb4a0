import json

import pytest
import torch

from crosslayer.__main__ import main
from crosslayer.bench.memory import (
    _fits,
    allocation_bytes,
    allocator_bytes,
    build_model,
    decode_throughput,
    largest_batch,
    measured_cache_bytes,
)


@pytest.mark.parametrize("limit", [1, 7, 100])
def test_largest_batch_search_is_exact_for_any_threshold(limit):
    for true_max in (0, 1, 2, 5, 64, 99):
        calls = []

        def fits(b, calls=calls, true_max=true_max):
            calls.append(b)
            return b <= true_max

        assert largest_batch(fits, limit=limit) == min(true_max, limit)
        assert len(calls) <= 2 * max(1, limit).bit_length() + 2


def test_allocator_bytes_sees_allocations_frees_and_the_peak():
    def work():
        kept = torch.zeros(1000, 250)  # 1,000,000 bytes, kept
        transient = torch.ones(500, 500) * 2  # two 1,000,000-byte tensors at once, then freed
        del transient
        return kept

    kept, peak, held = allocator_bytes(work)
    assert kept.shape == (1000, 250)
    assert held == 1_000_000 and 3_000_000 <= peak <= 3_000_064  # (and the scalar 2, a few bytes)


def test_measured_equals_analytic_by_hand_and_cla2_is_half():
    sizes = {}
    for preset, producers, kv_heads in (("tiny-H32-MQA", 4, 1), ("tiny-H32-MQA-CLA2", 2, 1), ("tiny-H32-GQA2", 4, 2)):
        model, _ = build_model(preset, torch.bfloat16, torch.device("cpu"), 64)
        for batch, context in ((1, 16), (3, 40)):
            # K and V x producers x batch x KV heads x context x head_dim 32 x 2 bytes
            assert measured_cache_bytes(model, batch, context) == 2 * producers * batch * kv_heads * context * 32 * 2
        # int8: one-byte values and one 2-byte scale per token, head, and K or V
        assert measured_cache_bytes(model, 3, 40, "int8") == 2 * producers * 3 * kv_heads * 40 * (32 + 2)
        sizes[preset] = measured_cache_bytes(model, 3, 40)
    assert sizes["tiny-H32-MQA-CLA2"] * 2 == sizes["tiny-H32-MQA"]
    assert sizes["tiny-H32-GQA2"] == 2 * sizes["tiny-H32-MQA"]


def test_budget_search_measures_the_allocation_and_cla2_serves_twice_as_many():
    budget, context = 16 * 2**20, 384  # long enough that the cache, not the step's logits, fills the budget
    found = {}
    for preset, producers in (("tiny-H32-MQA", 4), ("tiny-H32-MQA-CLA2", 2)):
        model, weights = build_model(preset, torch.float32, torch.device("cpu"), context)
        # the allocator handed out the parameters (fp32) and the rotary tables (16 fp32 inv_freq, twice)
        assert weights == sum(p.numel() for p in model.parameters()) * 4 + 2 * 16 * 4
        fits = _fits(model, context, budget, "auto", weights)
        best = largest_batch(fits)
        assert fits(best) and not fits(best + 1)  # the true largest, checked by allocating both
        # measured: weights + the cache (K and V x producers x batch x 1 head x context x 32 x 4 bytes) + the
        # decode step's activations (logits (batch, 4096) fp32 and smaller), so a little above the cache
        cache = 2 * producers * best * 1 * context * 32 * 4
        measured = allocation_bytes(model, best, context, "auto", weights)
        assert weights + cache < measured < weights + cache + best * 64 * 1024
        found[preset] = best
    assert found["tiny-H32-MQA-CLA2"] >= 1.9 * found["tiny-H32-MQA"]


def test_decode_throughput_runs_at_a_batch():
    model, _ = build_model("tiny-H32-MQA-CLA2", torch.float32, torch.device("cpu"), 64)
    for kv_dtype in ("auto", "int8"):
        assert decode_throughput(model, 3, 48, 4, kv_dtype) > 0


def test_cli_table_json_and_plot(tmp_path, capsys):
    code = main(["bench", "memory", "--presets", "tiny-H32-MQA,tiny-H32-MQA-CLA2", "--kv-dtypes", "auto,int8",
                 "--batch-sizes", "1,2", "--context-lengths", "384", "--budget", "16MiB", "--decode-tokens", "4",
                 "--dtype", "fp32", "--plot", str(tmp_path / "kv.png"), "--json", "--json-out", str(tmp_path / "m.json")])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "m.json").read_text())
    assert all(r["measured_bytes"] == r["analytic_bytes"] for r in result["rows"]) and len(result["rows"]) == 8
    assert {r["kv_dtype"] for r in result["rows"]} == {"fp32", "int8"}
    for c in result["capacity"]:  # the step's activations (logits: 16 KiB a row) take some, so found <= analytic
        assert c["largest_batch"] <= c["analytic_largest_batch"]
        assert c["allocated_bytes"] <= c["budget_bytes"] and c["decode_tokens_per_s"] > 0
        if c["context"] == 384:  # 52-131 KiB of cache a row
            assert c["largest_batch"] >= 0.7 * c["analytic_largest_batch"]
    at = {(c["preset"], c["kv_dtype"]): c["largest_batch"] for c in result["capacity"] if c["context"] == 384}
    assert at[("tiny-H32-MQA-CLA2", "int8")] >= 5 * at[("tiny-H32-MQA", "fp32")]  # analytic: 1024 / 136 = 7.5x
    assert (tmp_path / "kv.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["bench", "memory", "--batch-sizes", "0"]) == 2
    assert main(["bench", "memory", "--decode-tokens", "4"]) == 2  # needs --budget
