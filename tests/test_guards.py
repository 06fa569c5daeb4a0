"""Guards where a user would otherwise get wrong results silently: each refuses, with one clear message."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from crosslayer import CLAForCausalLM, CrossLayerError
from crosslayer.__main__ import main
from crosslayer.data import load_tokens, prepare, read_meta
from crosslayer.eval.perplexity import perplexity
from crosslayer.loading import load_model
from crosslayer.train import TrainConfig, Trainer, train

from .conftest import DATA, tiny_config

PTB = DATA / "ptb"


@pytest.fixture(scope="module")
def ptb_bpe(tmp_path_factory):
    """PTB prepared with a BPE trained on it (a tokenizer no model below has)."""
    if not PTB.is_dir():
        pytest.skip(f"{PTB} absent")
    out = tmp_path_factory.mktemp("ptb") / "bpe"
    prepare(f"text:{PTB}/ptb.valid.txt", out, tokenizer="bpe:300", val=f"{PTB}/ptb.test.txt", progress=False)
    return out


@pytest.fixture(scope="module")
def cla_model(tmp_path_factory, wiki_tokenizer):
    """A crosslayer model folder with its own tokenizer (BPE 400 on WikiText-2)."""
    folder = tmp_path_factory.mktemp("cla") / "model"
    CLAForCausalLM(tiny_config(vocab_size=len(wiki_tokenizer), cla_factor=2)).save_pretrained(folder)
    wiki_tokenizer.save_pretrained(folder)
    return folder


def recipe(tmp_path: Path, data: Path, **kw) -> TrainConfig:
    fields = dict(data=str(data), out=str(tmp_path / "run"), seq_len=32, batch_tokens=256, micro_batch=8,
                  max_steps=2, eval_every=2, eval_tokens=512, checkpoint_every=2, progress=False,
                  dtype="fp32")  # auto would follow the CPU's matrix units
    return TrainConfig.from_dict({**fields, **kw})


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_init_from_a_model_that_is_not_crosslayer_points_at_convert(family, tmp_path, ptb_bpe, wiki_tokenizer):
    shape = dict(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    model = LlamaForCausalLM(LlamaConfig(**shape)) if family == "llama" else Qwen2ForCausalLM(Qwen2Config(**shape))
    model.save_pretrained(tmp_path / family)
    wiki_tokenizer.save_pretrained(tmp_path / family)
    with pytest.raises(CrossLayerError, match=f"is a '{family}' model, not a crosslayer one; convert it first"):
        Trainer(recipe(tmp_path, ptb_bpe, init=str(tmp_path / family)))


def test_init_refuses_data_prepared_with_another_tokenizer(tmp_path, ptb_bpe, cla_model):
    with pytest.raises(CrossLayerError, match="was not tokenised with the tokenizer of"):
        Trainer(recipe(tmp_path, ptb_bpe, init=str(cla_model)))
    # prepared with the model's own tokenizer, the same text trains
    data = tmp_path / "own"
    prepare(f"text:{PTB}/ptb.valid.txt", data, tokenizer=f"hf:{cla_model}", val=f"{PTB}/ptb.test.txt", progress=False)
    summary = train(recipe(tmp_path, data, init=str(cla_model)))
    assert summary["val_loss"] > 0
    # the run's model carries the tokenizer it was trained with
    assert (AutoTokenizer.from_pretrained(tmp_path / "run").get_vocab()
            == AutoTokenizer.from_pretrained(cla_model).get_vocab())


def test_eval_ppl_refuses_a_prepared_folder_of_another_tokenizer(ptb_bpe, cla_model):
    model, tokenizer = load_model(cla_model)
    with pytest.raises(CrossLayerError, match="was tokenised with another tokenizer"):
        perplexity(model, tokenizer, str(ptb_bpe), context=32, progress=False)


def test_documents_start_with_bos_when_the_tokenizer_adds_one(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # a Llama-style tokenizer: its own encoding puts <s> (id 1) in front; </s> (id 2) ends documents
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    llama_like = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    llama_like.save_pretrained(tmp_path / "tok")
    (tmp_path / "docs").mkdir()
    for i, text in enumerate(["ab c", "de", "f"] * 400):  # enough tokens for prepare's minimum
        (tmp_path / "docs" / f"{i:04d}.txt").write_text(text)
    meta = prepare(f"text:{tmp_path}/docs/*.txt", tmp_path / "data", tokenizer=f"hf:{tmp_path / 'tok'}",
                   val_fraction=0.1, progress=False)
    assert meta["bos_token_id"] == 1
    ids = load_tokens(tmp_path / "data", "train").tolist()
    starts = [0] + [i + 1 for i, t in enumerate(ids[:-1]) if t == 2]  # every document begins after an EOS
    assert all(ids[s] == 1 for s in starts) and ids.count(1) == ids.count(2)
    # a byte-level BPE (GPT-2 convention: one end-of-text token, no BOS) adds none
    bpe = prepare(f"text:{tmp_path}/docs/*.txt", tmp_path / "bpe", tokenizer="bpe:300", val_fraction=0.1,
                  progress=False)
    assert bpe["bos_token_id"] is None and read_meta(tmp_path / "bpe")["tokenizer_fingerprint"]


def test_generate_texts_leaves_the_callers_tokenizer_alone(cla_model):
    from crosslayer.generate import generate_texts

    model, tokenizer = load_model(cla_model)
    tokenizer.pad_token, tokenizer.padding_side = None, "right"
    out = generate_texts(model, tokenizer, ["The tower", "A long prompt about the tower"], max_new_tokens=3,
                         temperature=0)
    assert len(out["texts"]) == 2
    assert tokenizer.pad_token is None and tokenizer.padding_side == "right"


def test_a_step_checkpoint_loads_in_eval_and_generate(tmp_path, cla_model, capsys):
    data = tmp_path / "own"
    prepare(f"text:{PTB}/ptb.valid.txt", data, tokenizer=f"hf:{cla_model}", val=f"{PTB}/ptb.test.txt", progress=False)
    train(recipe(tmp_path, data, init=str(cla_model), max_steps=3, checkpoint_every=2, keep_checkpoints=3))
    step2 = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert {"config.json", "state", "tokenizer.json", "trainer.pt"} <= {p.name for p in step2.iterdir()}
    text = tmp_path / "t.txt"
    text.write_text("the company said it expects earnings to rise in the fourth quarter . " * 8)
    assert main(["eval", "ppl", str(step2), "--data", str(text), "--context", "64", "--no-progress", "--json"]) == 0
    at2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", "ppl", str(tmp_path / "run"), "--data", str(text), "--context", "64", "--no-progress",
                 "--json"]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert at2["perplexity"] != final["perplexity"]  # a different model: step 2, not the final step 3
    # the final folder and the last step checkpoint hold the same weights
    last, _ = load_model(tmp_path / "run" / "checkpoints" / "step_00000003", tokenizer=False)
    saved, _ = load_model(tmp_path / "run", tokenizer=False)
    for (name, a), b in zip(last.state_dict().items(), saved.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert main(["generate", str(step2), "--prompt", "the company", "--temperature", "0", "--max-new-tokens", "4"]) == 0


def test_recipe_keys_of_recovery_are_checked(tmp_path):
    base = dict(model="tiny-H32-MQA", data="d", out=str(tmp_path / "o"), max_steps=1)
    with pytest.raises(CrossLayerError, match="needs a teacher"):
        TrainConfig.from_dict({**base, "objective": "logits"})
    with pytest.raises(CrossLayerError, match="trainable must be one of"):
        TrainConfig.from_dict({**base, "trainable": "everything"})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**base, "teacher": "x"}))
    with pytest.raises(CrossLayerError, match="takes no teacher"):
        from crosslayer.train import load_train_config

        load_train_config(path)
