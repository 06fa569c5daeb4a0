"""Every command x every input a user can get wrong: one line naming the field, exit 2, no traceback, nothing lost.

Each case runs the CLI in-process; an exception escaping `main` (what a user would see as a traceback)
fails the test by itself.
"""

import shutil
from pathlib import Path

import pytest
import yaml

from crosslayer import CLAForCausalLM
from crosslayer.__main__ import main

from .conftest import DATA, tiny_config


@pytest.fixture(scope="module")
def folders(tmp_path_factory, wiki_tokenizer):
    """Model folders, good and broken in the ways users break them."""
    root = tmp_path_factory.mktemp("models")
    good = root / "good"
    CLAForCausalLM(tiny_config(vocab_size=len(wiki_tokenizer))).save_pretrained(good)
    wiki_tokenizer.save_pretrained(good)
    no_tok = root / "no-tokenizer"  # exactly what README's save_pretrained example writes
    CLAForCausalLM(tiny_config(vocab_size=len(wiki_tokenizer))).save_pretrained(no_tok)
    corrupt = root / "corrupt"
    shutil.copytree(good, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    truncated = root / "truncated"
    shutil.copytree(good, truncated)
    data = (good / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    small_vocab = root / "small-vocab"  # a tokenizer with more ids than the model's vocabulary
    CLAForCausalLM(tiny_config(vocab_size=211)).save_pretrained(small_vocab)
    wiki_tokenizer.save_pretrained(small_vocab)
    text = root / "t.txt"
    text.write_text("The tower is 324 metres tall, about the same height as an 81-storey building. " * 20)
    recipe = root / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": "tiny-H32-MQA", "data": str(root / "no-data"), "out": str(root / "run"),
                                      "max_steps": 1}))
    bad_yaml = root / "bad.yaml"
    bad_yaml.write_text("model: [unclosed\n")
    suite = root / "suite.yaml"
    suite.write_text(yaml.safe_dump({"tasks": "piqa", "colour": "blue"}))
    nonempty = root / "nonempty"
    nonempty.mkdir()
    (nonempty / "keep.txt").write_text("precious")
    empty_prompts = root / "empty.txt"
    empty_prompts.write_text("\n  \n")
    return {"good": good, "no_tok": no_tok, "corrupt": corrupt, "truncated": truncated, "small_vocab": small_vocab,
            "text": text, "recipe": recipe, "bad_yaml": bad_yaml, "suite": suite, "nonempty": nonempty,
            "empty_prompts": empty_prompts, "root": root}


# (arguments with {placeholders}, a fragment the one-line message must contain)
CASES = [
    # model folders
    ("eval ppl {no_tok} --data {text}", "has no tokenizer files"),
    ("eval passkey {no_tok} --lengths 64", "has no tokenizer files"),
    ("generate {no_tok} --prompt hi", "has no tokenizer files"),
    ("eval ppl {corrupt} --data {text}", "cannot load the model weights"),
    ("eval ppl {truncated} --data {text}", "cannot load the model weights"),
    ("generate {truncated} --prompt hi", "cannot load the model weights"),
    ("eval ppl {small_vocab} --data {text}", "but the model's vocabulary is 211"),
    ("eval ppl {root}/absent --data {text}", "model folder not found"),
    ("eval ppl {text} --data {text}", "is a file"),
    ("eval ppl {root}/x.gguf --data {text}", "GGUF file not found"),
    ("eval ppl {good} --data {root}/nothing*.txt", "no file matches"),
    ("eval ppl {good} --data {text} --context 0", "argument --context: expected an integer >= 1"),
    ("eval ppl {good} --data {text} --stride -3", "argument --stride: expected an integer >= 1"),
    ("eval ppl {good} --data {text} --dtype fp64", "argument --dtype: invalid choice"),
    ("eval ppl {good} --data {text} --device tpu", "device must be auto, cpu, cuda"),
    ("eval passkey {good} --lengths abc", "argument --lengths"),
    ("eval passkey {good} --lengths 64 --depths 0,2", "depths must lie in [0, 1]"),
    ("eval passkey {good} --lengths 8", "cannot hold the instructions"),
    ("eval tasks {good} --tasks hellaswag,mmlu", "unknown task(s): mmlu"),
    ("eval tasks {good} --limit 0", "argument --limit"),
    ("eval tasks {good} --data-dir {root}/absent", "--data-dir: folder not found"),
    ("eval all {good} --out {root}/report --config {suite}", "unknown suite setting key(s): colour"),
    ("eval all {good} --out {root}/report --config {root}/absent.yaml", "suite settings not found"),
    ("eval all {good} --out {root}/report --passkey-depths x", "passkey_depths"),
    # generate
    ("generate {good}", "give exactly one of --prompt or --prompts-file"),
    ("generate {good} --prompts-file {empty_prompts}", "holds no non-empty line"),
    ("generate {good} --prompts-file {root}/absent.txt", "file not found"),
    ("generate {good} --prompt hi --top-p 2", "top_p must lie in (0, 1]"),
    ("generate {good} --prompt hi --temperature -1", "argument --temperature"),
    ("generate {good} --prompt hi --chat", "no chat template"),
    # convert
    ("convert {root}/absent --out {root}/c1 --cla-factor 2", "is not a folder"),
    ("convert {good} --out {nonempty} --cla-factor 2", "already exists and is not an empty folder"),
    ("convert {good} --out {root}/c2 --cla-factor 0", "argument --cla-factor"),
    ("convert {good} --out {root}/c3", "--cla-factor: give the layers per sharing group"),
    ("convert {root}/absent.gguf --out {root}/c4 --cla-factor 2", "GGUF file not found"),
    # train
    ("train {root}/absent.yaml", "training recipe not found"),
    ("train {bad_yaml}", "is not valid YAML"),
    ("train {recipe}", "does not exist; create it with `prepare`"),
    ("train {recipe} --set lr=abc", "lr: expected float"),
    ("train {recipe} --set colour=blue", "unknown training key(s): colour"),
    ("train {recipe} --set seq_len", "--set expects key=value"),
    # prepare
    ("prepare text:{root}/none*.txt --out {root}/d1", "matches no files"),
    ("prepare --out {root}/d2 --tokenizer bpe:12", "VOCAB must be an integer >= 257"),
    ("prepare --out {root}/d3 --tokenizer sentencepiece", "unknown tokenizer"),
    ("prepare text:{text} --out {nonempty}", "is not empty and holds no prepared dataset"),
    # kv, bench, sweep, plot
    ("kv no-such-preset", "unknown preset"),
    ("kv {text}", "must hold a mapping of model config keys"),
    ("kv {empty_prompts}", "holds no config fields"),
    ("kv tiny-H32-MQA --memory lots", "cannot read memory size"),
    ("kv", "give a preset name"),
    ("bench memory --batch-sizes 0", "argument --batch-sizes"),
    ("bench memory --budget lots", "cannot read memory size"),
    ("bench decode --new-tokens 1", "--new-tokens must be >= 2"),
    ("sweep {root}/absent.yaml", "sweep file not found"),
    ("plot {root}/absent.jsonl", "results file not found"),
]


@pytest.mark.parametrize("command, message", CASES, ids=[c for c, _ in CASES])
def test_bad_input_gets_one_line_and_exit_2(command, message, folders, capsys):
    args = [part.format(**{k: str(v) for k, v in folders.items()}) for part in command.split()]
    before = {p: p.read_bytes() for p in folders["root"].rglob("*") if p.is_file()}
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, (command, err)
    assert len(err.splitlines()) == 1 and err.startswith("crosslayer ") and message in err, err
    assert {p: p.read_bytes() for p in before} == before  # nothing the user had was touched
    assert not Path(str(folders["root"] / "c1")).exists()


def test_every_flag_says_its_type_and_default():
    import argparse

    from crosslayer.__main__ import build_parser

    def parsers(parser, path):
        yield path, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from parsers(sub, f"{path} {name}")

    seen = 0
    for path, parser in parsers(build_parser(), "crosslayer"):
        text = parser.format_help()
        assert "usage:" in text, path
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            seen += 1
            help_text = parser._get_formatter()._get_help_string(action)
            assert action.help and len(action.help) > 8, (path, action.option_strings)
            assert "default:" in help_text or "required" in help_text or "(switch)" in help_text, (path, help_text)
    assert seen > 100


@pytest.mark.skipif(not (DATA / "wikitext-2").is_dir(), reason="shared data absent")
def test_console_script_prints_no_traceback(folders):
    from .conftest import run_cli

    proc = run_cli("eval", "ppl", str(folders["no_tok"]), "--data", str(folders["text"]))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
