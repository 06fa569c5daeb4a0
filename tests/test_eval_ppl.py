import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from crosslayer import CLAConfig, CLAForCausalLM
from crosslayer.convert import from_hf
from crosslayer.eval.perplexity import perplexity, strided_nll, windows


def tiny_model(vocab=400):
    return CLAForCausalLM(CLAConfig.from_preset("tiny-H32-MQA-CLA2", vocab_size=vocab, initializer_range=0.1)).eval()


@pytest.mark.parametrize("n, context, stride", [(50, 16, 8), (50, 16, 16), (50, 16, 1), (17, 16, 5), (10, 64, 32)])
def test_windows_score_every_position_once(n, context, stride):
    scored = []
    for b, e, s in windows(n, context, stride):
        assert e - b <= context and b < s <= e
        if b > 0:  # after the first window, each scored token sees at least context - stride tokens (and one)
            assert s - b >= max(1, context - stride)
        scored += list(range(s, e))
    assert scored == list(range(1, n))
    assert all(e - b == min(context, n) for b, e, _ in windows(n, context, stride))  # full windows batch together


def test_strided_nll_equals_direct_per_token_computation():
    model = tiny_model()
    stream = torch.randint(0, 400, (41,))
    nll, count = strided_nll(model, stream, context=12, stride=5, batch_size=3, progress=False)
    # brute force: every scored token, predicted from exactly the left context its window gives it
    expected = 0.0
    with torch.no_grad():
        for b, e, s in windows(41, 12, 5):
            logp = torch.log_softmax(model(stream[b:e][None]).logits[0].double(), -1)
            for p in range(s, e):
                expected -= logp[p - b - 1, stream[p]].item()
    assert count == 40 and nll == pytest.approx(expected, rel=1e-6)
    # one window over everything is a single full forward
    full, _ = strided_nll(model, stream, context=64, stride=32, progress=False)
    with torch.no_grad():
        logp = torch.log_softmax(model(stream[None]).logits[0].double(), -1)
    assert full == pytest.approx(-logp[:-1].gather(-1, stream[1:, None]).sum().item(), rel=1e-6)


def test_text_perplexity_reports_bits_per_byte_and_word_ppl(tmp_path, wiki_tokenizer):
    text = "The quick brown fox jumps over the lazy dog .\n" * 5 + " = Valkyria Chronicles III = \n"
    (tmp_path / "t.txt").write_text(text)
    r = perplexity(tiny_model(), wiki_tokenizer, str(tmp_path / "t.txt"), context=32, stride=16, progress=False)
    n_tokens = len(wiki_tokenizer(text, add_special_tokens=False)["input_ids"])
    assert r["tokens"] == r["tokens_scored"] == n_tokens  # the EOS prefix lets the first token be scored
    assert r["perplexity"] == pytest.approx(math.exp(r["nll"] / n_tokens))
    assert r["bits_per_byte"] == pytest.approx(r["nll"] / len(text.encode()) / math.log(2))
    assert r["word_perplexity"] == pytest.approx(math.exp(r["nll"] / len(text.split())))


def test_llama_and_its_cla1_copy_score_identically_on_wikitext(wiki_tokenizer, shared_data):
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    cla = from_hf(llama)
    data = str(shared_data / "wikitext-2" / "wiki.test.raw")
    a = perplexity(llama, wiki_tokenizer, data, context=64, stride=32, batch_size=8, max_tokens=1500, progress=False)
    b = perplexity(cla, wiki_tokenizer, data, context=64, stride=32, batch_size=8, max_tokens=1500, progress=False)
    assert a["tokens_scored"] == b["tokens_scored"] == 1500
    assert a["nll"] == pytest.approx(b["nll"], rel=1e-6)


def test_prepared_folder_and_cli(tmp_path, capsys, shared_data):
    from crosslayer.__main__ import main
    from crosslayer.data import prepare

    data = tmp_path / "data"
    lines = (shared_data / "ptb" / "ptb.test.txt").read_text().splitlines(keepends=True)
    (tmp_path / "val.txt").write_text("".join(lines[:300]))  # a short validation split keeps the whole-split pass fast
    prepare(f"text:{shared_data}/ptb/ptb.valid.txt", data, tokenizer="bpe:300", val=str(tmp_path / "val.txt"),
            progress=False)
    from transformers import AutoTokenizer

    model = tiny_model(vocab=320)
    model.save_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(data).save_pretrained(tmp_path / "m")
    code = main(["eval", "ppl", str(tmp_path / "m"), "--data", str(data), "--context", "64", "--stride", "64",
                 "--batch-size", "16", "--max-tokens", "1500", "--no-progress", "--json",
                 "--json-out", str(tmp_path / "r.json")])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "r.json").read_text())
    assert result["tokens_scored"] == 1500 and result["perplexity"] > 1
    # whole split: bits per byte from the byte count prepare recorded
    code = main(["eval", "ppl", str(tmp_path / "m"), "--data", str(data), "--context", "128", "--batch-size", "16",
                 "--no-progress", "--json"])
    whole = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    from crosslayer.data import read_meta

    assert whole["bits_per_byte"] == pytest.approx(whole["nll"] / read_meta(data)["splits"]["val"]["bytes"] / math.log(2))
    assert main(["eval", "ppl", str(tmp_path / "m"), "--data", str(tmp_path / "nothing*.txt")]) == 2
    assert main(["eval", "ppl", str(tmp_path / "missing"), "--data", str(data)]) == 2


def test_cli_on_a_transformers_checkpoint_and_its_converted_copy(tmp_path, wiki_tokenizer, capsys):
    from crosslayer.__main__ import main

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    for name, model in (("llama", llama), ("cla", from_hf(llama))):
        model.save_pretrained(tmp_path / name)
        wiki_tokenizer.save_pretrained(tmp_path / name)
    (tmp_path / "t.txt").write_text("Robert Boulter is an English film , television and theatre actor . " * 20)
    scores = []
    for name in ("llama", "cla"):
        assert main(["eval", "ppl", str(tmp_path / name), "--data", str(tmp_path / "t.txt"), "--no-progress",
                     "--json"]) == 0
        scores.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert scores[0]["context"] == 128 and scores[0]["stride"] == 64  # defaults from the model's config
    assert scores[0]["nll"] == pytest.approx(scores[1]["nll"], rel=1e-6)


def test_hub_source_fails_clearly_offline():
    from crosslayer import CrossLayerError
    from crosslayer.eval.perplexity import read_text

    with pytest.raises(CrossLayerError, match="cannot load hf:wikitext"):
        read_text("hf:wikitext:wikitext-2-raw-v1:test")
