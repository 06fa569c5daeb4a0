"""Saved crosslayer models load where crosslayer is not installed: their code travels beside the weights.

Every subprocess here blocks `import crosslayer` (sys.modules["crosslayer"] = None), so transformers
can only build the model from the files in the folder (`auto_map` + `trust_remote_code=True`).
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import crosslayer  # noqa: F401
from crosslayer import CLAForCausalLM

from .conftest import DATA, REPO, tiny_config

BLOCK = "import sys; sys.modules['crosslayer'] = None\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory, wiki_tokenizer):
    path = tmp_path_factory.mktemp("remote") / "cla"
    model = CLAForCausalLM(tiny_config(vocab_size=len(wiki_tokenizer), kv_sources=[0, 0, 2, 2, 2, 5],
                                       initializer_range=0.2)).eval()
    model.save_pretrained(path)
    wiki_tokenizer.save_pretrained(path)
    return path, model


def test_the_folder_names_its_own_code(folder):
    path, _ = folder
    auto_map = json.loads((path / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "config.CLAConfig", "AutoModelForCausalLM": "modeling.CLAForCausalLM"}
    for name in ("config.py", "modeling.py", "errors.py"):
        assert (path / name).read_text() == (REPO / "crosslayer" / name).read_text(), name


def test_loads_and_decodes_without_crosslayer(folder, tmp_path):
    path, model = folder
    ids = torch.randint(0, 400, (2, 12))
    torch.save(ids, tmp_path / "ids.pt")
    script = BLOCK + f"""
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True).eval()
assert type(m).__module__.startswith("transformers_modules."), type(m).__module__
ids = torch.load({str(tmp_path / 'ids.pt')!r})
with torch.no_grad():
    out = {{"logits": m(ids).logits, "tokens": m.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)}}
torch.save(out, {str(tmp_path / 'out.pt')!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], model(ids).logits, rtol=0, atol=0)
        assert torch.equal(out["tokens"], model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0))


@pytest.mark.skipif(not (DATA / "piqa").is_dir(), reason="shared data absent")
def test_lm_eval_cli_scores_it_like_our_own_task_runner(folder, tmp_path):
    """lm-eval's own command line (`--model hf --model_args pretrained=DIR,trust_remote_code=True`)."""
    from crosslayer.eval.tasks import render_configs, run_tasks
    from crosslayer.loading import load_model

    path, _ = folder
    configs = Path(tempfile.mkdtemp(dir=tmp_path))
    render_configs(["piqa"], DATA, configs)  # lm-eval's piqa task, reading the local copy
    argv = ["lm_eval", "--model", "hf", "--model_args", f"pretrained={path},trust_remote_code=True,dtype=float32",
            "--tasks", "piqa", "--include_path", str(configs / "tasks"), "--limit", "6", "--batch_size", "2",
            "--device", "cpu", "--output_path", str(tmp_path / "out")]
    script = BLOCK + f"sys.argv = {argv!r}\nfrom lm_eval.__main__ import cli_evaluate\ncli_evaluate()\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                               "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = (tmp_path / "out").rglob("results_*.json")
    theirs = json.loads(result_file.read_text())["results"]["piqa"]
    model, tokenizer = load_model(path)
    ours = run_tasks(model, tokenizer, ["piqa"], data_dir=DATA, limit=6, batch_size=2)["tasks"]["piqa"]["metrics"]
    assert theirs["acc,none"] == ours["acc"] and theirs["acc_norm,none"] == ours["acc_norm"]
