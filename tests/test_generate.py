import pytest
import torch

from crosslayer import CLAConfig, CLAForCausalLM, CrossLayerError
from crosslayer.__main__ import main
from crosslayer.generate import generate_texts


@pytest.fixture
def model_dir(tmp_path, wiki_tokenizer):
    model = CLAForCausalLM(CLAConfig.from_preset("tiny-H32-MQA-CLA2", vocab_size=400, initializer_range=0.2))
    model.save_pretrained(tmp_path / "m")
    wiki_tokenizer.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_greedy_cli_streams_the_models_own_greedy_continuation(model_dir, capsys, wiki_tokenizer):
    prompt = "The history of the city"
    assert main(["generate", str(model_dir), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr()
    model = CLAForCausalLM.from_pretrained(model_dir).eval()
    ids = wiki_tokenizer(prompt, return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert out.out.strip() == wiki_tokenizer.decode(expected[0], skip_special_tokens=True).strip()
    # the fast path preallocates producers only: 2 of 4 layers, fp32, prompt + 12 new tokens
    assert "fast KV cache" in out.err
    kv = int(out.err.split("KV cache ")[1].split(" bytes")[0].replace(",", ""))
    assert kv == (ids.shape[1] + 12) * model.config.kv_bytes_per_token(4)
    # transformers' dynamic cache holds the same layers, grown to prompt + 11 fed tokens
    assert main(["generate", str(model_dir), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "12",
                 "--cache", "dynamic"]) == 0
    out = capsys.readouterr()
    kv = int(out.err.split("KV cache ")[1].split(" bytes")[0].replace(",", ""))
    assert kv == (ids.shape[1] + 11) * model.config.kv_bytes_per_token(4)


def test_int8_cache_from_the_cli_holds_a_quarter_of_the_fp32_bytes(model_dir, capsys, wiki_tokenizer):
    prompt = "The history of the city"
    n = len(wiki_tokenizer(prompt).input_ids) + 12  # prompt + new tokens: the slots preallocated
    held = {}
    for kv_dtype in ("auto", "int8"):
        assert main(["generate", str(model_dir), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "12",
                     "--kv-dtype", kv_dtype]) == 0
        err = capsys.readouterr().err
        held[kv_dtype] = int(err.split("KV cache ")[1].split(" bytes")[0].replace(",", ""))
    # tiny-H32-MQA-CLA2: K and V x 2 producers x 1 KV head x 32 channels, fp32 or one byte + a 2-byte scale
    assert held["auto"] == n * 2 * 2 * 1 * 32 * 4 and held["int8"] == n * 2 * 2 * 1 * (32 + 2)
    assert main(["generate", str(model_dir), "--prompt", prompt, "--kv-dtype", "int8", "--cache", "dynamic"]) == 2


def test_batch_is_left_padded_static_equals_dynamic_and_seeded_sampling_repeats(model_dir, wiki_tokenizer):
    model = CLAForCausalLM.from_pretrained(model_dir).eval()
    prompts = ["A long prompt about the war and its end", "Short"]
    batch = generate_texts(model, wiki_tokenizer, prompts, max_new_tokens=8, temperature=0)
    alone = [generate_texts(model, wiki_tokenizer, [p], max_new_tokens=8, temperature=0)["texts"][0] for p in prompts]
    assert batch["texts"] == alone and batch["new_tokens"] == 16
    assert batch["cache"] == "fast"
    for cache in ("static", "dynamic"):
        other = generate_texts(model, wiki_tokenizer, prompts, max_new_tokens=8, temperature=0, cache=cache)
        assert other["texts"] == batch["texts"], cache
    a = generate_texts(model, wiki_tokenizer, prompts, max_new_tokens=8, temperature=1.0, seed=3)
    b = generate_texts(model, wiki_tokenizer, prompts, max_new_tokens=8, temperature=1.0, seed=3)
    c = generate_texts(model, wiki_tokenizer, prompts, max_new_tokens=8, temperature=1.0, seed=4)
    assert a["texts"] == b["texts"] != c["texts"]


def test_prompts_file_and_bad_arguments(model_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("First prompt\n\nSecond prompt\n")
    assert main(["generate", str(model_dir), "--prompts-file", str(tmp_path / "p.txt"), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("-" * 40) == 2 and "First prompt" in out and "Second prompt" in out
    for args in (["--prompt", "x", "--temperature", "-1"], ["--prompt", "x", "--top-p", "1.5"], [],
                 ["--prompts-file", str(tmp_path / "none.txt")], ["--prompt", "x", "--cache", "paged"],
                 ["--prompt", "x", "--cache", "dynamic", "--compile"]):
        assert main(["generate", str(model_dir), *args]) == 2, args
    with pytest.raises(CrossLayerError):
        generate_texts(torch.nn.Linear(1, 1), None, [""])
