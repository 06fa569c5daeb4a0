"""A real pretrained model through conversion: SmolLM2-135M-Instruct (GGUF Q4_1, ../shared/models)."""

import io
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from crosslayer.__main__ import main
from crosslayer.calibration import FIT_RIDGE, read_calibration
from crosslayer.convert import convert, dense_copy, from_hf, load_source, read_source_config, share_kv, target_config
from crosslayer.loading import load_tokenizer
from crosslayer.plan import Reference, search

from .conftest import DATA, REPO, SHARED

GGUF = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    """(transformers' own GGUF load, fp32; its tokenizer; the first 512 tokens of WikiText-2 test), loaded once."""
    if not GGUF.is_file():
        pytest.skip(f"{GGUF} absent")
    model = load_source(GGUF, dtype=torch.float32)
    tokenizer = load_tokenizer(GGUF)
    text = (DATA / "wikitext-2" / "wiki.test.raw").read_text(encoding="utf-8")[:20000]
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:512]])
    return model, tokenizer, ids


def test_cla1_of_the_gguf_equals_transformers_gguf_load(smollm2):
    model, _, ids = smollm2
    cla = from_hf(model)
    assert cla.config.num_hidden_layers == 30 and cla.config.kv_bytes_per_token() == 23040
    with torch.no_grad():
        torch.testing.assert_close(cla(ids).logits, model(ids).logits, rtol=0, atol=1e-4)


def test_streamed_conversion_of_the_gguf_is_the_in_memory_one_byte_for_byte(smollm2, tmp_path):
    """convert() dequantises the GGUF one tensor at a time and writes as it goes; transformers' whole-file load,
    dense_copy, share_kv and save_pretrained give the same files."""
    model, _, _ = smollm2
    convert(GGUF, tmp_path / "streamed", cla_factor=2, kv_init="mean")
    config = target_config(read_source_config(GGUF.parent, GGUF.name), cla_factor=2)
    share_kv(dense_copy(model), config, "mean").save_pretrained(tmp_path / "reference")
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        assert (tmp_path / "reference" / name).read_bytes() == (tmp_path / "streamed" / name).read_bytes(), name


def test_gguf_converts_to_a_folder_a_fresh_process_loads(smollm2, tmp_path, capsys):
    model, tokenizer, ids = smollm2
    out = tmp_path / "smollm2-cla1"
    assert main(["convert", str(GGUF), "--out", str(out), "--cla-factor", "1", "--no-progress"]) == 0
    assert "K/V producers     30 -> 30 of 30 layers" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["CLAForCausalLM"]
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
            "plan.json"} <= {p.name for p in out.iterdir()}
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    script = (
        "import sys, json, torch, crosslayer\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "ids = torch.tensor(json.loads(sys.argv[2]))\n"
        "chat = tok.apply_chat_template(json.loads(sys.argv[3]), add_generation_prompt=True, tokenize=False)\n"
        "with torch.no_grad():\n"
        "    torch.save((type(model).__name__, model(ids).logits, chat, model.generation_config.eos_token_id),\n"
        "               sys.stdout.buffer)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(out), json.dumps(ids.tolist()), json.dumps(messages)],
                          capture_output=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    arch, logits, chat, eos = torch.load(io.BytesIO(proc.stdout), weights_only=True)
    assert arch == "CLAForCausalLM" and eos == model.generation_config.eos_token_id
    assert chat == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(ids).logits, rtol=0, atol=1e-4)


def test_fit_on_smollm2_solves_its_weighted_least_squares_problem(smollm2):
    """The fitted map of group [4, 5] makes the gradient of the weighted objective vanish; the objective is
    built here from transformers' own activations (queries rotated by its apply_rotary_pos_emb)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, tokenizer, _ = smollm2
    tokens = read_calibration(str(DATA / "wikitext-2" / "wiki.valid.raw"), tokenizer, tokens=512, seq_len=256)
    fitted = from_hf(model, kv_sources=[0, 1, 2, 3, 4, 4] + list(range(6, 30)), kv_init="fit", calibration=tokens)
    cfg, hd = model.config, model.config.head_dim
    n_kv, group = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    with torch.no_grad():
        hidden = model(tokens, output_hidden_states=True).hidden_states
        h = hidden[4].double()
        x = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)).flatten(0, 1)  # (N, d)
        offsets = torch.linspace(0, 255, 64).round().long()[None]
        cos, sin = model.model.rotary_emb(hidden[0], offsets)
        for which in ("k", "v"):
            w_t = fitted.model.layers[4].self_attn.get_parameter(f"{which}_proj.weight").double().T  # (d, kv)
            grad, scale, metric_sum = 0, 0, 0
            for j in (4, 5):
                layer = model.model.layers[j]
                xin = layer.input_layernorm(hidden[j])
                target = getattr(layer.self_attn, f"{which}_proj")(xin).flatten(0, 1).double()
                if which == "k":
                    q = layer.self_attn.q_proj(xin).flatten(0, 1).view(-1, cfg.num_attention_heads, 1, hd)
                    blocks = 0
                    for s in range(offsets.shape[1]):
                        r, _ = apply_rotary_pos_emb(q, q, cos[:, s : s + 1], sin[:, s : s + 1])
                        r = r.double().view(-1, n_kv, group, hd)
                        blocks = blocks + torch.einsum("nkgi,nkgj->kij", r, r) / len(r)
                else:
                    o = layer.self_attn.o_proj.weight.double().view(-1, n_kv, group, hd)
                    blocks = torch.einsum("dkgi,dkgj->kij", o, o)
                m = torch.block_diag(*blocks)
                grad = grad + x.T @ (x @ w_t - target) @ m
                scale = scale + (x.T @ target @ m).norm()
                metric_sum = metric_sum + m
            grad = grad + FIT_RIDGE * (x.T @ x).diagonal().mean() * w_t @ metric_sum
            assert (grad.norm() / scale).item() < 1e-4, which


def test_search_on_smollm2_costs_what_the_converted_model_costs(smollm2):
    model, tokenizer, _ = smollm2
    tokens = read_calibration(str(DATA / "wikitext-2" / "wiki.valid.raw"), tokenizer, tokens=128, seq_len=128)
    reference = Reference(from_hf(model), tokens)
    result = search(reference, producers=29, refine_rounds=0)  # boundary moves: tests/test_plan.py
    plan = result["kv_sources"]
    assert len(set(plan)) == 29 and plan[1] == 1  # layer 1 reusing layer 0's K/V is the costliest pair by far
    converted = from_hf(model, kv_sources=plan, kv_init="fit", calibration=tokens)
    with torch.no_grad():
        p = F.log_softmax(model(tokens).logits.double(), -1).flatten(0, 1)
        q = F.log_softmax(converted(tokens).logits.double(), -1).flatten(0, 1)
    kl = F.kl_div(q, p, log_target=True, reduction="sum").item() / p.shape[0]
    assert result["cost"] == pytest.approx(kl, rel=5e-3)
