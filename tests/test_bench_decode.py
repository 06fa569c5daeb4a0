import json
import sys
from pathlib import Path

import pytest
import torch

import crosslayer
from crosslayer import CLAConfig, CLAForCausalLM
from crosslayer.__main__ import main
from crosslayer.bench.decode import VLLM_RUNNER, build_models, bytes_per_decode_step, measure_bandwidth, vllm_reference

from .test_bench_memory import assert_names_this_cpu


def test_models_share_weights_and_the_cla1_copy_is_exact():
    llama, cla1, cla2 = build_models("tiny-H32-MQA-CLA2", torch.device("cpu"), torch.float32, 64)
    assert cla1.config.num_producer_layers == 4 and cla2.config.kv_sources == [0, 0, 2, 2]
    ids = torch.randint(0, 4096, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(cla1(ids).logits, llama(ids).logits, rtol=0, atol=1e-6)
        # mean-pooled K/V: the CLA2 producer's projection of any input is the mean of what layers 0 and 1
        # of the Llama project it to (computed by the Llama's own modules), and so is its K/V-input norm
        x = torch.randn(5, 128)
        layers = llama.model.layers[0], llama.model.layers[1]
        producer = cla2.model.layers[0]
        for ours, theirs in ((producer.self_attn.k_proj, [lay.self_attn.k_proj for lay in layers]),
                             (producer.self_attn.v_proj, [lay.self_attn.v_proj for lay in layers]),
                             (producer.kv_layernorm, [lay.input_layernorm for lay in layers])):
            torch.testing.assert_close(ours(x), (theirs[0](x) + theirs[1](x)) / 2, rtol=1e-6, atol=1e-6)


def test_roofline_bytes_by_hand_and_bandwidth():
    model = CLAForCausalLM(CLAConfig.from_preset("tiny-H32-MQA-CLA2")).eval()
    # tiny-H32-MQA-CLA2: d 128, FFN 352, 4 layers, 4 query heads and 1 KV head of 32, producers 0 and 2, vocab 4096
    per_layer = 128 * 128 * 2 + 3 * 128 * 352 + 2 * 128  # q, o, gate/up/down, two norms
    per_producer = 2 * 128 * 32 + 128  # k, v, K/V-input norm
    params = 2 * 4096 * 128 + 4 * per_layer + 2 * per_producer + 128  # embedding, LM head, final norm
    assert params == 1_738_112
    weights_read = (params - (4096 - 2) * 128) * 4  # fp32; only the batch's 2 embedding rows are read
    kv = 2 * 100 * (2 * 1 * 32 * 2 * 4)  # 2 rows x 100 tokens x (K and V x 1 head x 32 x 2 producers x 4 bytes)
    assert bytes_per_decode_step(model, model.config, 2, 100) == weights_read + kv == 4_958_720
    kv_int8 = 2 * 100 * (2 * 1 * 2 * (32 + 2))  # one-byte values and a 2-byte scale per token and head
    assert bytes_per_decode_step(model, model.config, 2, 100, "int8") == weights_read + kv_int8
    bw = measure_bandwidth(torch.device("cpu"), nbytes=16 << 20, repeats=2)
    assert 1e8 < bw < 1e13  # a real copy of 16 MiB took a plausible time


def test_cli_table_ratios_and_json(tmp_path, capsys):
    code = main(["bench", "decode", "--preset", "tiny-H32-MQA-CLA2", "--batch-sizes", "1,2", "--prompt-len", "8",
                 "--new-tokens", "4", "--repeats", "1", "--warmup", "0", "--modes", "eager", "--kv-dtypes", "auto,int8",
                 "--baselines", "generate", "--json", "--json-out", str(tmp_path / "d.json"),
                 "--profile", str(tmp_path / "prof")])
    assert code == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "d.json").read_text())
    # the header names the device, then the CPU with its matrix features and GEMM peaks, as the JSON does
    assert out.splitlines()[0].startswith(f"device: {result['device']}, float32, tiny-H32-MQA-CLA2, prompt 8, ")
    assert out.splitlines()[1].startswith("CPU: ") and result["device"].startswith(result["cpu"]["cpu"])
    assert_names_this_cpu(result["cpu"], out.splitlines()[1])
    assert {(r["model"], r["kv_dtype"], r["batch"]) for r in result["rows"]} == {
        (m, kv, b) for m, kvs in (("transformers", ["fp32"]), ("CLA1", ["fp32", "int8"]),
                                  ("tiny-H32-MQA-CLA2", ["fp32", "int8"])) for kv in kvs for b in (1, 2)}
    assert all(r["decode_tokens_per_s"] > 0 and 0 < r["bw_util"] and r["e2e_tokens_per_s"] > 0 for r in result["rows"])
    checks = result["greedy_equal_to_transformers"]
    assert checks["1"]["CLA1/eager/auto"] and checks["2"]["CLA1/eager/auto"]  # fp32: token for token
    kv = {(r["model"], r["kv_dtype"]): r["kv_bytes_per_token"] for r in result["rows"]}
    assert kv[("tiny-H32-MQA-CLA2", "fp32")] * 2 == kv[("CLA1", "fp32")] == kv[("transformers", "fp32")] == 1024
    assert kv[("tiny-H32-MQA-CLA2", "int8")] == 2 * 2 * (32 + 2)  # K and V x 2 producers x (values + scale)
    ratio = next(e for e in result["ratios"] if e["batch"] == 1 and e["kv_dtype"] == "fp32")
    rows = {r["model"]: r["decode_tokens_per_s"] for r in result["rows"] if r["batch"] == 1 and r["kv_dtype"] == "fp32"}
    assert abs(ratio["cla1_over_generate"] - rows["CLA1"] / rows["transformers"]) < 1e-9
    assert len(result["profiles"]) == 2 and "Self CPU" in (tmp_path / "prof" / "profile-ours-eager-b1.txt").read_text()
    for bad in (["--modes", "fast"], ["--kv-dtypes", "int4"], ["--baselines", "vllm"],
                ["--preset", "tiny-H32-MQA", "--repeats", "1"]):  # the last shares nothing
        assert main(["bench", "decode", *bad]) == 2, bad


# a stand-in for vLLM's offline API: each prompt continues with its last token + 1, repeated
FAKE_VLLM = {
    "__init__.py": """
__version__ = "0.0-fake"


class SamplingParams:
    def __init__(self, max_tokens, **kwargs):
        self.max_tokens = max_tokens


class _Completion:
    def __init__(self, token_ids):
        self.token_ids = token_ids


class _Output:
    def __init__(self, token_ids):
        self.outputs = [_Completion(token_ids)]


class LLM:
    def __init__(self, model, **kwargs):
        import json, os
        with open(os.path.join(model, "config.json")) as f:
            saved = json.load(f)
        assert saved.get("dtype", saved.get("torch_dtype")) == kwargs["dtype"]  # the weights as vLLM is told

    def generate(self, requests, params, use_tqdm=False):
        return [_Output([r["prompt_token_ids"][-1] + 1] * params.max_tokens) for r in requests]
""",
    "inputs.py": "def TokensPrompt(prompt_token_ids):\n    return {'prompt_token_ids': prompt_token_ids}\n",
}


@pytest.mark.parametrize("dtype, name", [(torch.float32, "float32"), (torch.bfloat16, "bfloat16")])
def test_vllm_reference_runs_from_the_package_in_another_python(dtype, name, tmp_path, monkeypatch):
    assert VLLM_RUNNER.parent == Path(crosslayer.__file__).parent / "bench"  # ships with the package, no checkout
    (tmp_path / "vllm").mkdir()
    for file, text in FAKE_VLLM.items():
        (tmp_path / "vllm" / file).write_text(text)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    llama, _, _ = build_models("tiny-H32-MQA-CLA2", torch.device("cpu"), dtype, 64)
    prompts = {1: torch.tensor([[5, 6, 7]]), 2: torch.tensor([[1, 2, 3], [4, 5, 9]])}
    result = vllm_reference(llama, prompts, new_tokens=3, repeats=2, python=sys.executable)
    assert result["version"] == "0.0-fake"
    assert result[1]["tokens"] == [[8, 8, 8]] and result[2]["tokens"] == [[4, 4, 4], [10, 10, 10]]
    assert len(result[2]["tokens_per_s_all"]) == 2 and result[2]["tokens_per_s"] > 0 and result[2]["dtype"] == name
