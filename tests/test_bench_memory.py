import json
import sys
import types
from pathlib import Path

import pytest
import torch

from crosslayer.__main__ import main
from crosslayer.bench.machine import machine_fields, machine_line
from crosslayer.bench.memory import (
    _fits,
    allocation_bytes,
    allocator_bytes,
    build_model,
    decode_throughput,
    largest_batch,
    measured_cache_bytes,
)

# the x86-64 flags of matrix units for 16- and 8-bit GEMMs, listed here rather than taken from crosslayer.device
MATRIX_FLAGS = {"amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx512f", "avx2"}


def this_cpu() -> tuple[str | None, set[str]] | None:
    """(model name, flags) of this machine's CPU, read from /proc/cpuinfo here; None where there is none."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return None
    lines = info.read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return model, set(flags)


def assert_names_this_cpu(caps: dict, out: str, gemm: bool = True) -> None:
    """`caps` (a benchmark's "cpu" or "host_cpu") describes this CPU as /proc/cpuinfo does, and the table's
    header line `out` names it and its matrix features."""
    assert caps["threads"] == torch.get_num_threads()
    if gemm:
        assert caps["gemm_gflops"]["fp32"] > 1 and caps["gemm_gflops"]["bf16"] > 1
    else:
        assert "gemm_gflops" not in caps  # nothing measured for a GPU benchmark
    if (cpu := this_cpu()) is None:
        return  # no /proc/cpuinfo to check the CPU's name and flags against
    model, flags = cpu
    if model is not None:
        assert caps["cpu"] == model
    assert set(caps["features"]) == MATRIX_FLAGS & flags
    assert caps["bf16_matrix_units"] == bool({"amx_bf16", "avx512_bf16"} & flags)
    named = f"{caps['cpu']}, {caps['threads']} threads, matrix features: {' '.join(sorted(MATRIX_FLAGS & flags)) or 'none'}"
    assert named in out


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
    printed = capsys.readouterr().out
    result = json.loads(printed.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "m.json").read_text())
    assert printed.startswith("CPU: ")  # the table's header names the machine
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
    assert result["device"].startswith(result["cpu"]["cpu"]) and "gpu" not in result
    assert_names_this_cpu(result["cpu"], printed)
    assert main(["bench", "memory", "--batch-sizes", "0"]) == 2
    assert main(["bench", "memory", "--decode-tokens", "4"]) == 2  # needs --budget


def test_a_gpu_benchmark_names_the_gpu_and_measures_no_cpu_gemm(monkeypatch):
    import crosslayer.bench.machine as machine

    def no_gemm():
        raise AssertionError("a GPU benchmark measured the CPU's GEMMs")

    monkeypatch.setattr(machine, "cpu_capabilities", no_gemm)
    h200 = types.SimpleNamespace(name="NVIDIA H200", major=9, minor=0, total_memory=150_754_820_096,
                                 multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: h200)
    fields = machine_fields(torch.device("cuda", 0))
    # NVIDIA's H200 datasheet: 989.4 TFLOP/s dense bf16 (1,979 with sparsity)
    assert fields["gpu"] == {"name": "NVIDIA H200", "compute_capability": "9.0", "memory_bytes": 150_754_820_096,
                             "multiprocessors": 132, "peak_bf16_flops": 989.4e12}
    line = machine_line(fields)
    assert line.startswith("GPU: NVIDIA H200 (compute 9.0, 140 GiB); host CPU: ")
    assert_names_this_cpu(fields["host_cpu"], line, gemm=False)


# ----------------------------------------------------------------------------------------------
# `bench serve` with a stand-in for vLLM: its JSON and table carry the machine as the others do


def test_bench_serve_carries_the_machine(tmp_path, capsys, monkeypatch):
    from crosslayer import CLAConfig, CLAForCausalLM
    from crosslayer.bench import serve

    fake = types.ModuleType("vllm")
    fake.__version__ = "0.0-fake"
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setenv("VLLM_NO_USAGE_STATS", "1")  # (the command sets it)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    served = []

    def run_one(folder, budget, kv_cache_dtype, workload, *args, **kwargs):
        served.append(folder)
        return {"kv_capacity_tokens": budget // 1024, "block_size": 16, "wall_s": 2.0, "steps": 10,
                "requests_per_s": len(workload) / 2, "output_tokens_per_s": 50.0, "output_tokens": 100,
                "peak_running": 4, "preemptions": 0}

    monkeypatch.setattr(serve, "run_one", run_one)
    CLAForCausalLM(CLAConfig.from_preset("tiny-H32-MQA")).save_pretrained(tmp_path / "m")
    code = main(["bench", "serve", "--models", f"m={tmp_path / 'm'}", "--budgets", "1MiB", "--kv-dtypes", "auto",
                 "--requests", "4", "--prompt-len", "4:8", "--output-len", "2:4", "--out", str(tmp_path / "out"), "--json"])
    assert code == 0 and served == [tmp_path / "m"]
    printed = capsys.readouterr().out
    result = json.loads(printed.strip().splitlines()[-1])
    assert json.loads((tmp_path / "out" / "serve.json").read_text()) == result
    assert result["machine"].startswith(result["cpu"]["cpu"]) and "gpu" not in result
    assert printed.startswith("CPU: ")
    assert_names_this_cpu(result["cpu"], printed)
