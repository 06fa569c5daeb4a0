"""`crosslayer eval tasks`: lm-eval's standard tasks on the local data in shared/data, tiny random models."""
# ruff: noqa: E402  (the offline switches must be set before datasets / huggingface_hub are imported)

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the network
os.environ["HF_DATASETS_OFFLINE"] = "1"

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from crosslayer import CLAConfig, CLAForCausalLM, CrossLayerError
from crosslayer.__main__ import build_parser
from crosslayer.convert import from_hf
from crosslayer.eval.lm_eval_tasks import local_data
from crosslayer.eval.tasks import TASKS, HubUnreachable, render_configs, run_tasks

pytest.importorskip("lm_eval")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LIMIT = 4
VOCAB = 300
# what the data folder holds: the split lm-eval reports, except SciQ (no test split in shared/data)
SPLITS = {"hellaswag": "validation", "piqa": "validation", "winogrande": "validation", "sciq": "validation",
          "openbookqa": "test", "boolq": "validation", "arc_easy": "test", "lambada_openai": "test"}


@pytest.fixture(scope="module")
def data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real data folder {DATA} is absent (it sits beside the checkout)")
    return DATA


@pytest.fixture(scope="module")
def tokenizer(data):
    """A small byte-level BPE trained on PTB validation text (under a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(data / "ptb" / "ptb.valid.txt")],
              trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CLAForCausalLM(CLAConfig.from_preset("tiny-H32-MQA", vocab_size=VOCAB)).eval()


@pytest.fixture(scope="module")
def everything(model, tokenizer, data):
    """All eight tasks on their local files, first LIMIT items, with lm-eval's per-item records."""
    return run_tasks(model, tokenizer, list(TASKS), data_dir=data, limit=LIMIT, batch_size=4, log_samples=True)


def jsonl(path: Path, n: int) -> list[dict]:
    with path.open() as f:
        return [json.loads(next(f)) for _ in range(n)]


@torch.no_grad()
def loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """log P(continuation | context) from one forward pass, and whether greedy decoding gives the continuation.

    Tokenised as lm-eval's convention for causal LMs: trailing spaces of the context belong to the
    continuation, and the continuation's tokens are those of context+continuation past the context's.
    """
    stripped = context.rstrip()
    continuation, context = context[len(stripped):] + continuation, stripped
    whole = tokenizer(context + continuation)["input_ids"]
    start = len(tokenizer(context)["input_ids"])
    assert len(whole) <= model.config.max_position_embeddings  # no truncation in these items
    logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    target = torch.tensor(whole[start:])
    scored = logp[start - 1 : len(whole) - 1]
    return scored.gather(-1, target[:, None]).sum().item(), bool((scored.argmax(-1) == target).all())


# --------------------------------------------------------------------------------------------------
# every task config loads its local file and scores items


def test_every_task_scores_its_local_data(everything):
    assert everything["lm_eval_version"] and everything["date"] and everything["limit"] == LIMIT
    for name, split in SPLITS.items():
        task = everything["tasks"][name]
        assert task["n"] == LIMIT and task["split"] == split and task["lm_eval_split"] == TASKS[name][1]
        assert len(everything["samples"][name]) == LIMIT
        metrics = task["metrics"]
        assert 0 <= metrics["acc"] <= 1 and "acc_stderr" in metrics
        if name in ("hellaswag", "piqa", "sciq", "openbookqa", "arc_easy"):
            assert 0 <= metrics["acc_norm"] <= 1 and "acc_norm_stderr" in metrics
        if name == "lambada_openai":
            assert metrics["perplexity"] > 1 and "perplexity_stderr" in metrics
    assert "not directly comparable" in everything["tasks"]["sciq"]["note"]
    assert everything["tasks"]["winogrande"]["note"] == ""  # used as it is, on lm-eval's split


def test_converted_docs_keep_the_local_items_and_labels(everything, data):
    samples = everything["samples"]
    targets = {name: [s["target"] for s in samples[name]] for name in samples}
    lines = (data / "hellaswag" / "hellaswag_val_full.txt").read_text().split("\n")
    assert targets["hellaswag"] == [int(lines[6 * i + 1]) for i in range(LIMIT)]
    # lm-eval's prompt for HellaSwag's first validation item (ctx_b capitalised)
    assert samples["hellaswag"][0]["arguments"][0][0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert targets["piqa"] == [int(x) for x in (data / "piqa" / "valid-labels.lst").read_text().split()[:LIMIT]]
    assert targets["boolq"] == [int(d["answer"]) for d in jsonl(data / "boolq" / "validation.jsonl", LIMIT)]
    for name in ("arc_easy", "openbookqa"):
        docs = jsonl(data / name / "test.jsonl", LIMIT)
        assert targets[name] == [d["gold"] for d in docs]
        assert [[c for _, c in s["arguments"]] for s in samples[name]] == [[" " + c for c in d["choices"]] for d in docs]
    lambada = jsonl(data / "lambada_openai" / "lambada_openai.jsonl", LIMIT)
    assert [s["arguments"][0] for s in samples["lambada_openai"]] == [(d["context"], " " + d["continuation"])
                                                                      for d in lambada]
    sciq = jsonl(data / "sciq" / "validation.jsonl", LIMIT)
    assert [s["arguments"][3][1] for s in samples["sciq"]] == [" " + d["correct_answer"] for d in sciq]


@pytest.mark.parametrize("name", ["piqa", "arc_easy", "hellaswag", "winogrande"])
def test_multiple_choice_scores_equal_an_independent_computation(everything, model, tokenizer, name):
    accs, norms = [], []
    for sample in everything["samples"][name]:
        # WinoGrande varies the context, not the continuation: its gold is the option in the doc
        gold = int(sample["doc"]["answer"]) - 1 if name == "winogrande" else sample["target"]
        lls = []
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
            ll, _ = loglikelihood(model, tokenizer, context, continuation)
            assert resp[0][0] == pytest.approx(ll, rel=1e-4, abs=1e-3)
            lls.append(ll)
        accs.append(float(np.argmax(lls) == gold))
        if name != "winogrande":  # acc_norm: log-likelihood per character of the choice (without the leading space)
            lengths = [len(c) - 1 for _, c in sample["arguments"]]
            norms.append(float(np.argmax(np.array(lls) / lengths) == gold))
    metrics = everything["tasks"][name]["metrics"]
    assert metrics["acc"] == pytest.approx(np.mean(accs))
    assert metrics["acc_stderr"] == pytest.approx(np.std(accs, ddof=1) / math.sqrt(LIMIT))
    if norms:
        assert metrics["acc_norm"] == pytest.approx(np.mean(norms))


def test_lambada_perplexity_and_accuracy_equal_an_independent_computation(everything, model, tokenizer):
    lls, hits = [], []
    for sample in everything["samples"]["lambada_openai"]:
        ll, greedy = loglikelihood(model, tokenizer, *sample["arguments"][0])
        assert sample["resps"][0][0][0] == pytest.approx(ll, rel=1e-4, abs=1e-3)
        lls.append(ll)
        hits.append(float(greedy))
    metrics = everything["tasks"]["lambada_openai"]["metrics"]
    assert metrics["perplexity"] == pytest.approx(math.exp(-np.mean(lls)), rel=1e-3)
    assert metrics["acc"] == pytest.approx(np.mean(hits))


def test_rendered_configs_change_only_the_data_location(data, tmp_path):
    from lm_eval.tasks._yaml_loader import load_yaml

    from crosslayer.eval.tasks import lm_eval_tasks_dir

    render_configs(list(TASKS), data, tmp_path)
    data_keys = {"dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split", "test_split"}
    for name, (lm_eval_yaml, _) in TASKS.items():
        ours = load_yaml(tmp_path / "tasks" / f"{name}.yaml", resolve_func=False)
        theirs = load_yaml(lm_eval_tasks_dir() / lm_eval_yaml, resolve_func=False)
        assert ours["task"] == theirs["task"] == name
        assert (theirs.get("test_split") or theirs["validation_split"]) == TASKS[name][1]  # the split lm-eval reports
        changed = {k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)}
        assert changed <= data_keys, name  # prompts, process_docs, metrics, version: lm-eval's own
        assert ours["dataset_path"] == "json" and ours["training_split"] is None
        split = SPLITS[name]
        assert ours[f"{split}_split"] == split and Path(ours["dataset_kwargs"]["data_files"][split]).is_file()


def test_hellaswag_context_boundary():
    split = local_data._split_hellaswag_ctx
    assert split("A man is sitting on a roof. he") == ("A man is sitting on a roof.", "he")
    assert split("Get a blender. Put fruit in it.") == ("Get a blender. Put fruit in it.", "")
    assert split("1 a guy plays. 2 a guy") == ("1 a guy plays.", "2 a guy")
    assert split("no sentence end here") == ("no sentence end here", "")


def test_missing_or_malformed_local_data_is_a_clear_error(model, tokenizer, data, tmp_path):
    with pytest.raises(CrossLayerError, match="piqa.*valid.jsonl.*not found"):
        run_tasks(model, tokenizer, ["piqa"], data_dir=tmp_path, limit=2)
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n' * 3)
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(CrossLayerError, match="one label 0/1 per item"):
        run_tasks(model, tokenizer, ["piqa"], data_dir=tmp_path, limit=2)
    with pytest.raises(CrossLayerError, match="unknown task.*mmlu.*supported: hellaswag, piqa"):
        run_tasks(model, tokenizer, ["piqa", "mmlu"], data_dir=data)
    with pytest.raises(CrossLayerError, match="positive"):
        run_tasks(model, tokenizer, ["piqa"], data_dir=data, limit=0)


def test_online_path_without_network_points_to_data_dir(model, tokenizer, model_dir):
    # the library points to its parameter, the command line to its flag
    with pytest.raises(HubUnreachable, match=r"Rowan/hellaswag.*data_dir=DIR"):
        run_tasks(model, tokenizer, ["hellaswag"])
    args = build_parser().parse_args(["eval", "tasks", str(model_dir), "--tasks", "hellaswag"])
    with pytest.raises(CrossLayerError, match=r"Rowan/hellaswag.*--data-dir"):
        args.func(args)


# --------------------------------------------------------------------------------------------------
# a plain transformers model and its CLA copy


def test_llama_and_its_cla_copy_score_identically(tokenizer, data):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=4,
                                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                                         initializer_range=0.05)).eval()
    cla = from_hf(llama)
    kw = dict(tasks=["piqa", "winogrande"], data_dir=data, limit=3, log_samples=True)
    a, b = run_tasks(llama, tokenizer, **kw), run_tasks(cla, tokenizer, **kw)
    for name in kw["tasks"]:
        assert a["tasks"][name]["metrics"] == b["tasks"][name]["metrics"]
        for x, y in zip(a["samples"][name], b["samples"][name], strict=True):
            assert [r[0][0] for r in x["resps"]] == pytest.approx([r[0][0] for r in y["resps"]], rel=1e-5, abs=1e-5)


# --------------------------------------------------------------------------------------------------
# the command line, in-process


@pytest.fixture(scope="module")
def model_dir(model, tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_writes_results_json_and_markdown(model_dir, data, tmp_path, capsys):
    from crosslayer.__main__ import main

    out = tmp_path / "out"
    rc = main(["eval", "tasks", str(model_dir), "--tasks", "piqa,sciq,lambada_openai", "--data-dir", str(data),
               "--limit", "2", "--batch-size", "2", "--device", "cpu", "--dtype", "fp32", "--out", str(out),
               "--log-samples"])
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    assert result["model"] == str(model_dir) and result["lm_eval_version"] and result["date"]
    assert result["dtype"] == "float32" and result["limit"] == 2 and "samples" not in result
    assert list(result["tasks"]) == ["piqa", "sciq", "lambada_openai"]
    for name, task in result["tasks"].items():
        assert task["n"] == 2 and task["split"] == SPLITS[name] and task["data"].startswith(str(data))
        assert {"acc", "acc_stderr"} <= task["metrics"].keys()
    assert "perplexity_stderr" in result["tasks"]["lambada_openai"]["metrics"]
    assert "not directly comparable" in result["tasks"]["sciq"]["note"]
    table = (out / "results.md").read_text()
    assert "| task | split | n | acc | acc_norm | perplexity |" in table
    piqa = result["tasks"]["piqa"]["metrics"]
    assert f"| piqa | validation | 2 | {piqa['acc']:.4f} ± {piqa['acc_stderr']:.4f} |" in table
    assert "- sciq: lm-eval reports the test split" in table
    assert table in capsys.readouterr().out
    samples = [json.loads(line) for line in (out / "samples_piqa.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and {"doc", "arguments", "resps", "acc"} <= samples[0].keys()


def test_cli_unknown_task_exits_2(capsys):
    from crosslayer.__main__ import main

    assert main(["eval", "tasks", "no-model-needed", "--tasks", "hellaswag,mmlu"]) == 2
    err = capsys.readouterr().err
    assert "unknown task(s): mmlu" in err and "lambada_openai" in err


def test_cli_online_without_network_exits_2_mentioning_data_dir(model_dir, capsys):
    from crosslayer.__main__ import main

    assert main(["eval", "tasks", str(model_dir), "--tasks", "piqa", "--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert "--data-dir" in err and "Traceback" not in err
