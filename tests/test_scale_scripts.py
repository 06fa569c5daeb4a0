"""scripts/random_model.py and scripts/peak_memory.py, the tools of the conversion-at-scale measurements (issue 20).

A tiny random checkpoint must be what transformers itself loads as a bf16 Llama (no missing or unexpected
keys, shards laid out byte for byte as safetensors writes them); peak_memory must report a known allocation.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 300-token byte-level BPE tokenizer saved as transformers saves one (fast to build, unlike a GGUF's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    folder = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    return folder


def random_model(out: Path, tokenizer: Path, *extra: str) -> dict:
    cmd = [sys.executable, str(SCRIPTS / "random_model.py"), "tiny", str(out), "--tokenizer", str(tokenizer),
           "--vocab", "320", "--layers", "3", "--hidden", "64", "--intermediate", "96", *extra]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_random_model_loads_in_transformers(tmp_path, tokenizer_dir):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "m"
    info = random_model(out, tokenizer_dir, "--max-shard-size", "40KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert info["shards"] == len(shards) >= 3
    assert [p.name for p in shards] == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert (out / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()

    model, loading = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, output_loading_info=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not loading["missing_keys"] and not loading["unexpected_keys"] and not loading["mismatched_keys"]
    state = model.state_dict()
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    # 3 layers x 9 tensors + embeddings, final norm, head; the 49,152 default vocabulary overridden
    assert len(state) == 30 and state["model.embed_tokens.weight"].shape == (320, 64)
    assert model.config.tie_word_embeddings is False and model.config.num_key_value_heads == 2

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in state.values()) == info["weight_bytes"]
    for shard in shards:  # the same bytes safetensors writes for the same tensors
        tensors = load_file(shard)
        assert all(index["weight_map"][name] == shard.name for name in tensors)
        save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
        assert shard.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()

    assert torch.equal(state["model.layers.1.input_layernorm.weight"], torch.ones(64, dtype=torch.bfloat16))
    w = state["model.layers.2.mlp.gate_proj.weight"].float()  # 6,144 values
    assert abs(w.mean().item()) < 0.002 and 0.019 < w.std().item() < 0.021
    assert not torch.equal(state["model.layers.0.self_attn.q_proj.weight"], state["model.layers.1.self_attn.q_proj.weight"])
    tok = AutoTokenizer.from_pretrained(out)
    logits = model(tok("the lazy fox", return_tensors="pt").input_ids).logits
    assert logits.shape[-1] == 320 and torch.isfinite(logits).all()

    # seeded per tensor: one shard or many, the same values; another seed, others
    single = random_model(tmp_path / "one", tokenizer_dir)
    assert single["shards"] == 1 and (tmp_path / "one" / "model.safetensors").is_file()
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    one = load_file(tmp_path / "one" / "model.safetensors")
    assert all(torch.equal(one[name], t) for name, t in state.items())
    random_model(tmp_path / "seed1", tokenizer_dir, "--seed", "1")
    other = load_file(tmp_path / "seed1" / "model.safetensors")
    assert not torch.equal(other["lm_head.weight"], one["lm_head.weight"])


def test_random_model_refuses_a_non_empty_folder(tmp_path, tokenizer_dir):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x").write_text("keep")
    run = subprocess.run([sys.executable, str(SCRIPTS / "random_model.py"), "tiny", str(tmp_path / "m"),
                          "--tokenizer", str(tokenizer_dir)], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "not an empty folder" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"] and (tmp_path / "m" / "x").read_text() == "keep"


def peak_memory(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "peak.json"
    run = subprocess.run([sys.executable, str(SCRIPTS / "peak_memory.py"), "--json", str(out), *args],
                         capture_output=True, text=True, timeout=120)
    return run, json.loads(out.read_text())


ALLOC = 300_000_000
# the bytes written into (b'\x01' * n fills every page), then held while the sampler looks
HOLD = "import time, sys; b = b'\\x01' * {n}; time.sleep({s}); sys.exit({rc})"


def test_peak_memory_reports_a_known_allocation(tmp_path):
    run, r = peak_memory(tmp_path, "--weights-bytes", str(ALLOC), "--",
                         sys.executable, "-c", HOLD.format(n=ALLOC, s=0.6, rc=0))
    assert run.returncode == 0, run.stderr
    # an interpreter holds ~10-40 MB besides the allocation (more when the venv's site imports grow)
    p = r["peak_bytes"]
    assert ALLOC <= p["rss"] <= ALLOC + 80e6
    assert ALLOC <= p["anon"] <= ALLOC + 80e6 and p["file"] < 80e6
    assert ALLOC <= r["ru_maxrss_bytes"] <= ALLOC + 80e6 and ALLOC <= r["vmhwm_bytes"] <= ALLOC + 80e6
    if Path("/usr/bin/time").exists():
        assert r["time_v"] and ALLOC <= r["time_v_max_rss_bytes"] <= ALLOC + 80e6
    assert r["ratio"]["rss"] == pytest.approx(p["rss"] / ALLOC, abs=1e-3) and 1.0 <= r["ratio"]["rss"] < 1.27
    assert 0.5 < r["wall_s"] < 60 and r["samples"] >= 3
    assert r["cpu_model"] and r["date"] and r["command"][0] == sys.executable
    assert "peak RSS 0.3" in run.stderr  # the table line


def test_peak_memory_sums_the_process_tree_and_passes_the_exit_code(tmp_path):
    # two children hold 150 MB each at the same time: the tree's peak is ~300 MB, each process's high-water
    # mark (what ru_maxrss and /usr/bin/time report) ~150 MB; the command's exit code comes through
    half = ALLOC // 2
    child = f'{sys.executable} -c "{HOLD.format(n=half, s=1.5, rc=0)}"'
    run, r = peak_memory(tmp_path, "--no-time", "--", "bash", "-c", f"{child} & {child}; wait; exit 3")
    assert run.returncode == 3 and r["returncode"] == 3
    assert ALLOC <= r["peak_bytes"]["rss"] <= ALLOC + 120e6
    assert half <= r["ru_maxrss_bytes"] <= half + 80e6
    assert r["max_processes"] >= 3 and "ratio" not in r
