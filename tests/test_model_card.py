"""The model card (README.md) of converted and trained folders, checked against the folder's own files
and against KV bytes computed here by hand."""

import json
import re
from pathlib import Path

import pytest
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from crosslayer.__main__ import main
from crosslayer.config import load_config
from crosslayer.model_card import base_model_name, model_card, training_record
from crosslayer.train import load_train_config, train

from .test_train import ptb, recipe  # noqa: F401  (ptb: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

KV_HEADS, HEAD_DIM, LAYERS = 2, 8, 6


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, wiki_tokenizer):
    """A saved tiny random Llama (6 layers, 2 K/V heads of 8 dims) with a real tokenizer."""
    config = LlamaConfig(vocab_size=len(wiki_tokenizer), hidden_size=64, intermediate_size=112,
                         num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=128)
    folder = tmp_path_factory.mktemp("src") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    wiki_tokenizer.save_pretrained(folder)
    return folder


def front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    return yaml.safe_load(match[1])


def kv_bytes_by_hand(producers: int) -> int:
    return 2 * KV_HEADS * HEAD_DIM * producers * 2  # K and V, heads x dims, 16-bit


@pytest.mark.parametrize("args, groups", [
    (["--cla-factor", "2", "--kv-init", "mean"], "[0-1] [2-3] [4-5]"),
    (["--cla-factor", "2", "--cla-pattern", "keep_ends", "--kv-init", "first"], "[0] [1-2] [3-4] [5]"),
    (["--cla-factor", "1"], "[0] [1] [2] [3] [4] [5]"),
])
def test_converted_folder_has_a_card_that_matches_its_config_and_plan(tmp_path, llama_folder, args, groups):
    out = tmp_path / "cla"
    assert main(["convert", str(llama_folder), "--out", str(out), "--no-progress", *args]) == 0
    card = (out / "README.md").read_text()
    config, plan = json.loads((out / "config.json").read_text()), json.loads((out / "plan.json").read_text())
    front = front_matter(card)
    assert front["base_model"] == "tiny-llama" and front["library_name"] == "transformers"
    assert front["pipeline_tag"] == "text-generation"
    assert {"crosslayer", "cross-layer-attention"} <= set(front["tags"])

    sources = config["kv_sources"]
    producers = [i for i, s in enumerate(sources) if s == i]
    assert f"`{sources}`" in card and f"`{groups}`" in card
    assert f"K/V producers: {len(producers)} (layers {', '.join(map(str, producers))})" in card
    assert f"chosen by: {plan['chosen_by']}" in card and f"K/V initialisation: `{plan['kv_init']}`" in card
    before, after = kv_bytes_by_hand(LAYERS), kv_bytes_by_hand(len(producers))
    assert f"| {LAYERS} | {before:,} |" in card and f"| {len(producers)} | {after:,} ({after / before:.1%}) |" in card
    assert "calibration" not in card.lower()  # none was read
    # how to load it: the folder's own code is named in config.json, as the card says
    assert "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)" in card and 'path = "cla"' in card
    assert "vllm serve cla" in card and config["auto_map"]["AutoModelForCausalLM"].startswith("modeling.")


def test_card_of_a_fit_conversion_names_its_calibration_data(tmp_path, llama_folder):
    src = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "wiki.valid.raw"
    text = tmp_path / "calib.txt"
    text.write_text(src.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    out = tmp_path / "fit"
    assert main(["convert", str(llama_folder), "--out", str(out), "--cla-factor", "3", "--calibration", str(text),
                 "--calibration-tokens", "256", "--calibration-seq-len", "32", "--compute-dtype", "fp32",
                 "--no-progress"]) == 0
    card = (out / "README.md").read_text()
    assert f"`{text}`: 256 tokens in sequences of 32, activations computed in fp32." in card
    assert "K/V initialisation: `fit`, least squares" in card and "`[0-2] [3-5]`" in card
    assert f"| 2 | {kv_bytes_by_hand(2):,} (33.3%) |" in card


def test_base_model_is_a_hub_id_as_given_or_a_paths_name(tmp_path):
    assert base_model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (tmp_path / "my-model").mkdir()
    assert base_model_name(tmp_path / "my-model") == "my-model"
    assert base_model_name(f"{tmp_path}/my-model/") == "my-model"
    assert base_model_name("./models/x.Q4_1.gguf") == "x.Q4_1.gguf"
    assert base_model_name(None) is None


def test_trained_folder_has_a_card_with_the_recipe_and_final_validation(tmp_path, ptb):  # noqa: F811
    cfg = load_train_config(recipe(tmp_path, ptb, max_steps=2, eval_every=2, checkpoint_every=2))
    train(cfg)
    run = Path(cfg.out)
    card = (run / "README.md").read_text()
    front = front_matter(card)
    assert "base_model" not in front and front["library_name"] == "transformers"  # trained from scratch
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in val if "val_loss" in r][-1]
    assert val["step"] == 2 and f"final validation loss: {val['val_loss']:.4f}" in card
    assert "- init: random (trained from scratch)" in card and "- objective: `lm`" in card
    assert "- steps: 2 of 1,024 tokens (2,048 tokens), sequences of 32" in card
    # test_train's model: 4 layers, CLA2, one K/V head of 16 dims
    saved = load_config(str(run / "config.json"))
    assert saved.kv_sources == [0, 0, 2, 2]
    assert f"| 4 | {2 * 1 * 16 * 4 * 2:,} |" in card and f"| 2 | {2 * 1 * 16 * 2 * 2:,} (50.0%) |" in card


def test_card_of_a_model_trained_from_a_converted_one_names_the_original(tmp_path, llama_folder):
    out = tmp_path / "cla2"
    assert main(["convert", str(llama_folder), "--out", str(out), "--cla-factor", "2", "--kv-init", "mean",
                 "--no-progress"]) == 0
    plan = json.loads((out / "plan.json").read_text())
    recipe_ = dict(init=str(out), data="data/x", objective="logits", teacher=str(llama_folder), teacher_topk=None,
                   distill_temperature=2.0, trainable="kv", seq_len=64, batch_tokens=4096, lr=1e-4, seed=3)
    record = training_record(recipe_, 10, {"step": 10, "val_loss": 2.5, "val_ppl": 12.18, "val_tokens": 8192})
    card = model_card(load_config(str(out / "config.json")), "recovered", plan=plan, training=record)
    front = front_matter(card)
    assert front["base_model"] == "tiny-llama" and "distillation" in front["tags"]
    assert f"trained by `crosslayer train` from `{out}`" in card and f"- teacher: `{llama_folder}` (temperature 2.0)" in card
    assert "- steps: 10 of 4,096 tokens (40,960 tokens)" in card and "- trainable: `kv`" in card
    assert "final validation loss: 2.5000 (perplexity 12.18) at step 10, on 8,192 tokens" in card
    assert f"chosen by: {plan['chosen_by']}" in card  # the conversion's plan, carried by the init folder
