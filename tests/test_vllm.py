"""crosslayer's vLLM model (crosslayer/serving) against transformers, in vLLM's own environment.

Runs where vLLM is installed (`bash scripts/vllm-env.sh VENV`, then VENV/bin/python -m pytest
tests/test_vllm.py); skips elsewhere. Every engine is vLLM V1 on the CPU, fp32, in this process,
started once per model (module-scoped fixtures). Expected values come from transformers'
`generate` on the same checkpoint folder and from `crosslayer.kv` arithmetic, never from vLLM.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

# before vLLM is imported: one process (engines in this pytest process), a private compile cache
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(tempfile.gettempdir(), "crosslayer-vllm-cache"))
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # no usage reports from tests (servers inherit this)
vllm = pytest.importorskip("vllm", reason="vLLM is not installed here (its environment: bash scripts/vllm-env.sh VENV)")

from transformers.modeling_outputs import BaseModelOutputWithPast  # noqa: E402

from crosslayer import CLAConfig, CLAForCausalLM  # noqa: E402
from crosslayer.kv import plan  # noqa: E402
from crosslayer.serving.kv_scales import calibrate_kv_scales, read_kv_scales, write_kv_scales  # noqa: E402
from crosslayer.serving.offline import kv_capacity_tokens, offline_engine  # noqa: E402

from .conftest import DATA, SHARED  # noqa: E402

BUDGET = 4 << 20  # KV bytes every engine gets
BLOCK = 32  # tokens per KV page (the CPU backend's smallest)
NEW_TOKENS = 16
SHAPE = dict(vocab_size=400, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             head_dim=32, max_position_embeddings=256, initializer_range=0.05)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CASES = {  # name -> CLAConfig fields over SHAPE
    "cla1-gqa": dict(num_key_value_heads=2),
    "cla2-gqa": dict(num_key_value_heads=2, cla_factor=2),  # CLA1's twin: half the producers
    "cla3-mqa": dict(num_hidden_layers=6, num_key_value_heads=1, cla_factor=3, attention_bias=True,
                     tie_word_embeddings=True),
    "keep_ends-mha": dict(num_hidden_layers=6, num_key_value_heads=4, cla_factor=2, cla_pattern="keep_ends",
                          rope_parameters=LLAMA3),
    "cla2-mqa-yarn": dict(num_key_value_heads=1, cla_factor=2,
                          rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                           "original_max_position_embeddings": 64}),
    "custom-qwen2-bias": dict(num_hidden_layers=6, num_key_value_heads=2, kv_sources=[0, 0, 0, 3, 3, 5],
                              attention_bias=True, o_proj_bias=False, mlp_bias=True,
                              rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
}
# transformers 5.2x renamed generate's `past_key_values` to `cache`
CACHE_KWARG = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
SMOLLM2 = SHARED / "models" / "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the conversion served below: layers 0 and 1 own their K/V, then pairs (2,3) ... (28,29) share
SMOLLM2_PLAN = [0, 1] + [2 + 2 * (i // 2) for i in range(28)]


# ----------------------------------------------------------------------------------------------
# Models, references, engines


def _prompts(tokenizer, n_tokens=(3, 9, 21, 70)) -> list[list[int]]:
    """Token ids of real WikiText text, one prompt per length (the longest spans two KV pages)."""
    words = (DATA / "wikitext-2" / "wiki.valid.raw").read_text().split()[:400]
    ids = tokenizer(" ".join(words)).input_ids
    return [ids[50 * i: 50 * i + n] for i, n in enumerate(n_tokens)]


def _build(folder: Path, tokenizer, **fields) -> CLAForCausalLM:
    """A random CLA model whose norm scales and biases are not the identity (so folding them is tested)."""
    model = CLAForCausalLM(CLAConfig(**{**SHAPE, **fields})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.05)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


@torch.no_grad()
def _greedy(model, prompts: list[list[int]], new_tokens: int = NEW_TOKENS, margins: list | None = None,
            **kw) -> list[list[int]]:
    """transformers' greedy `generate`, one prompt at a time, no early stop. With `margins`, appends each
    prompt's per-step gap between the best and second-best logit."""
    out = []
    for ids in prompts:
        y = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True, **kw)
        out.append(y.sequences[0, len(ids):].tolist())
        if margins is not None:
            top2 = torch.stack(y.scores)[:, 0].topk(2, dim=-1).values  # (steps, 2)
            margins.append((top2[:, 0] - top2[:, 1]).tolist())
    return out


def run_engine(folder: Path, work, **kw):
    """`work(llm)` on a vLLM engine for `folder`: fp32, eager, BUDGET bytes of KV pages, prefix caching on."""
    with offline_engine(folder, dtype="float32", enforce_eager=True, max_model_len=256, block_size=BLOCK,
                        kv_cache_memory_bytes=BUDGET, enable_prefix_caching=True, seed=0, **kw) as llm:
        return work(llm)


def _vllm_greedy(llm, prompts: list[list[int]], new_tokens: int = NEW_TOKENS):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], [o.num_cached_tokens or 0 for o in outs]


def _predicted_capacity(config: CLAConfig, kv_dtype: str) -> int:
    """BUDGET over `crosslayer kv`'s bytes per token, in whole pages. vLLM's fp8 cache keeps one scale per
    layer (not crosslayer's per-token scales), so only the values count."""
    row = plan(config, seq_len=1, kv_dtype=kv_dtype)
    per_token = row["kv_bytes_per_token"] - row["kv_scale_bytes_per_token"]
    return BUDGET // (BLOCK * per_token) * BLOCK


@pytest.fixture(scope="module")
def served(tmp_path_factory, wiki_tokenizer):
    """Per case: transformers' tokens, then one engine's tokens (twice: the second run hits the
    prefix cache), its capacity, and which Attention layers share pages."""
    results = {}
    prompts = _prompts(wiki_tokenizer)
    for name, fields in CASES.items():
        folder = tmp_path_factory.mktemp(name)
        torch.manual_seed(len(results))
        model = _build(folder, wiki_tokenizer, **fields)
        expected = _greedy(model, prompts)

        def work(llm):
            first, _ = _vllm_greedy(llm, prompts)
            again, cached = _vllm_greedy(llm, prompts)
            targets = llm.apply_model(
                lambda m: [layer.self_attn.attn.kv_sharing_target_layer_name for layer in m.model.layers])[0]
            return dict(first=first, again=again, cached=cached, capacity=kv_capacity_tokens(llm), targets=targets)

        results[name] = dict(run_engine(folder, work), config=model.config, expected=expected, prompts=prompts)
    return results


# ----------------------------------------------------------------------------------------------
# Tokens, sharing, capacity, prefix caching


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_transformers(served, case):
    r = served[case]
    assert len({len(p) for p in r["prompts"]}) == len(r["prompts"])  # one batch, prompts of different lengths
    assert r["first"] == r["expected"]


@pytest.mark.parametrize("case", list(CASES))
def test_consumers_share_their_producers_pages(served, case):
    config = served[case]["config"]
    expected = [None if s == i else f"model.layers.{s}.self_attn.attn" for i, s in enumerate(config.kv_sources)]
    assert served[case]["targets"] == expected


@pytest.mark.parametrize("case", list(CASES))
def test_kv_capacity_is_what_crosslayer_kv_predicts(served, case):
    config = served[case]["config"]
    assert served[case]["capacity"] == _predicted_capacity(config, "fp32")


def test_cla2_holds_twice_the_tokens_of_its_cla1_twin(served):
    assert served["cla2-gqa"]["capacity"] == 2 * served["cla1-gqa"]["capacity"] > 0


@pytest.mark.parametrize("case", list(CASES))
def test_prefix_cache_hits_give_the_same_tokens(served, case):
    r = served[case]
    assert r["cached"][-1] >= BLOCK  # the 70-token prompt's first page came from the cache
    assert r["again"] == r["expected"]


def test_a_rope_type_vllm_computes_differently_is_refused(tmp_path, wiki_tokenizer):
    longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 16, "long_factor": [2.0] * 16,
                "original_max_position_embeddings": 64}
    _build(tmp_path, wiki_tokenizer, num_key_value_heads=2, cla_factor=2, rope_parameters=longrope)
    with pytest.raises(Exception, match="does not serve rope_type 'longrope'"):
        run_engine(tmp_path, lambda llm: None)


# ----------------------------------------------------------------------------------------------
# fp8 KV cache: consumers dequantise with their producer's scales


def _rtz_e4m3(x: torch.Tensor) -> torch.Tensor:
    """fp8 e4m3 as vLLM's CPU KV-cache kernel stores it: saturate at 448, round toward zero."""
    x = x.float().clamp(-448.0, 448.0)
    normal = (x.view(torch.int32) & ~((1 << 20) - 1)).view(torch.float32)  # keep 3 mantissa bits
    subnormal = torch.trunc(x / 2**-9) * 2**-9
    return torch.where(x.abs() >= 2**-6, normal, subnormal)


def _fp8_cache(config: CLAConfig, scales: dict[int, tuple[float, float]]):
    """A transformers cache that stores every producer's K/V as vLLM's fp8 cache holds them."""
    from transformers.cache_utils import DynamicCache

    class Fp8Cache(DynamicCache):
        def update(self, keys, values, layer_idx, *args, **kwargs):
            k, v = scales[layer_idx]
            return super().update(_rtz_e4m3(keys / k) * k, _rtz_e4m3(values / v) * v, layer_idx, *args, **kwargs)

    return Fp8Cache(config=config)


def test_fp8_cache_uses_each_producers_scales_in_its_consumers(tmp_path, wiki_tokenizer):
    torch.manual_seed(7)
    model = _build(tmp_path, wiki_tokenizer, **CASES["cla2-gqa"])
    prompts = _prompts(wiki_tokenizer)
    write_kv_scales(tmp_path, calibrate_kv_scales(model, [torch.tensor([p]) for p in prompts]))
    scales = read_kv_scales(tmp_path, model.config)
    assert all(k != 1.0 and v != 1.0 for k, v in scales.values())
    expected, margins = [], []
    for p in prompts:  # one cache per prompt: generate fills it
        expected += _greedy(model, [p], margins=margins, **{CACHE_KWARG: _fp8_cache(model.config, scales)})

    def work(llm):
        used = llm.apply_model(lambda m: [(layer.self_attn.attn._k_scale_float, layer.self_attn.attn._v_scale_float)
                                          for layer in m.model.layers])[0]
        return _vllm_greedy(llm, prompts)[0], used, kv_capacity_tokens(llm)

    got, used, capacity = run_engine(tmp_path, work, kv_cache_dtype="fp8")
    assert used == [scales[s] for s in model.config.kv_sources]
    # vLLM's CPU kernel dequantises in its own order and precision, so a near-tie (best two logits
    # within 0.01) may go either way; tokens must agree up to the first one, over most of the run
    agreed = 0
    for want, have, gaps in zip(expected, got, margins, strict=True):
        n = next((i for i, g in enumerate(gaps) if g < 0.01), len(gaps))
        assert have[:n] == want[:n]
        agreed += n
    assert agreed >= 0.75 * NEW_TOKENS * len(prompts)
    # 1 byte per element: 4x the tokens of this model at 32 bits, 8x its CLA1 twin's
    assert capacity == _predicted_capacity(model.config, "fp8") == 4 * _predicted_capacity(model.config, "fp32")


# ----------------------------------------------------------------------------------------------
# `crosslayer bench serve`: the same workload on a CLA2 model and its CLA1 twin


def test_bench_serve_cli(tmp_path, wiki_tokenizer, capsys):
    from crosslayer.__main__ import main

    folders = {}
    for name, fields in (("cla1", CASES["cla1-gqa"]), ("cla2", CASES["cla2-gqa"])):
        torch.manual_seed(0)
        _build(tmp_path / name, wiki_tokenizer, **fields)
        folders[name] = tmp_path / name
    requests, lo, hi = 12, 4, 12
    code = main(["bench", "serve", "--models", f"cla1={folders['cla1']},cla2={folders['cla2']}", "--budgets", "2MiB",
                 "--kv-dtypes", "auto", "--requests", str(requests), "--prompt-len", "8:40",
                 "--output-len", f"{lo}:{hi}", "--dtype", "float32", "--out", str(tmp_path / "out"), "--json"])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert json.loads((tmp_path / "out" / "serve.json").read_text())["rows"] == result["rows"]
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"cla1", "cla2"} and any(line.startswith("cla2 ") for line in out)
    block = rows["cla1"]["block_size"]
    for name, r in rows.items():  # capacity: the budget over crosslayer.kv's bytes per token, in whole pages
        per_token = plan(CLAConfig.from_pretrained(folders[name]), seq_len=1, kv_dtype="fp32")["kv_bytes_per_token"]
        assert r["kv_capacity_tokens"] == (2 << 20) // (block * per_token) * block
        assert requests * lo <= r["output_tokens"] <= requests * hi  # ignore_eos: every request its drawn length
        assert r["requests_per_s"] * r["wall_s"] == pytest.approx(requests)
    assert rows["cla2"]["capacity_vs_baseline"] == 2.0
    assert rows["cla1"]["output_tokens"] == rows["cla2"]["output_tokens"]  # one seeded workload for both


# ----------------------------------------------------------------------------------------------
# `vllm serve` of a converted SmolLM2, answered by the OpenAI client


@pytest.fixture(scope="module")
def smollm2_cla2(tmp_path_factory):
    """SmolLM2-135M-Instruct (GGUF, dequantised to fp32) converted to CLA with SMOLLM2_PLAN, with its tokenizer
    and chat template; and the transformers model for reference."""
    pytest.importorskip("gguf", reason="reading the GGUF checkpoint needs the gguf package")
    if not (SMOLLM2 / SMOLLM2_GGUF).exists():
        pytest.skip(f"{SMOLLM2 / SMOLLM2_GGUF} absent (it sits beside the checkout in CI)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from crosslayer.convert import from_hf

    source = AutoModelForCausalLM.from_pretrained(SMOLLM2, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2, gguf_file=SMOLLM2_GGUF)
    model = from_hf(source, kv_sources=SMOLLM2_PLAN)
    folder = tmp_path_factory.mktemp("smollm2-cla2")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_gone(pgid: int, timeout: float) -> bool:
    """Whether every process of group `pgid` has exited within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.5)
    return False


@contextlib.contextmanager
def vllm_server(folder: Path, log: Path):
    """`vllm serve FOLDER` on 127.0.0.1 (its own process group); yields the base URL; SIGINT, then checks
    that the server and every process it started have exited."""
    import httpx

    port = _free_port()
    exe = Path(sys.executable).with_name("vllm")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    cmd = [str(exe), "serve", str(folder), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "512", "--kv-cache-memory-bytes", str(64 << 20), "--enforce-eager", "--seed", "0",
           "--served-model-name", "smollm2-cla2"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"vllm serve not ready after 300 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError("vllm serve did not exit within 60 s of SIGINT") from None
        if not _group_gone(proc.pid, timeout=20):  # its engine core, workers, resource tracker
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("vllm serve left processes running 20 s after it exited")
        assert code == 0, f"vllm serve exited with {code}:\n{log.read_text()[-3000:]}"


def test_vllm_serve_answers_the_openai_client(smollm2_cla2, tmp_path):
    from openai import OpenAI

    folder, model, tokenizer = smollm2_cla2
    prompt = "The capital of France is"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer(prompt).input_ids
    expected_text = tokenizer.decode(_greedy(model, [ids], 12)[0], skip_special_tokens=True)
    chat_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    chat_ids = list(chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids)
    expected_chat = tokenizer.decode(_greedy(model, [chat_ids], 12)[0], skip_special_tokens=True)

    with vllm_server(folder, tmp_path / "serve.log") as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["smollm2-cla2"]
        done = client.completions.create(model="smollm2-cla2", prompt=prompt, max_tokens=12, temperature=0,
                                         extra_body={"ignore_eos": True})
        stream = client.completions.create(model="smollm2-cla2", prompt=prompt, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True}, stream=True)
        streamed = [chunk.choices[0].text for chunk in stream]
        chat = client.chat.completions.create(model="smollm2-cla2", messages=messages, max_tokens=12, temperature=0,
                                              extra_body={"ignore_eos": True, "skip_special_tokens": True})

    assert done.choices[0].text == expected_text
    assert done.usage.prompt_tokens == len(ids) and done.usage.completion_tokens == 12
    assert len(streamed) > 1 and "".join(streamed) == expected_text
    assert chat.choices[0].message.content == expected_chat
    assert chat.usage.prompt_tokens == len(chat_ids)  # the chat template was applied as transformers applies it
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "crosslayer" and config["kv_sources"] == SMOLLM2_PLAN
