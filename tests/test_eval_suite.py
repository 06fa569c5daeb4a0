import json

from crosslayer import CLAConfig, CLAForCausalLM
from crosslayer.__main__ import main


def test_eval_all_writes_one_report(tmp_path, wiki_tokenizer, shared_data, capsys):
    model = CLAForCausalLM(CLAConfig.from_preset("tiny-H32-MQA-CLA2", vocab_size=400, max_position_embeddings=256))
    model.save_pretrained(tmp_path / "m")
    wiki_tokenizer.save_pretrained(tmp_path / "m")
    (tmp_path / "suite.yaml").write_text("tasks: piqa,lambada_openai\nlimit: 3\npasskey_trials: 1\n")
    code = main(["eval", "all", str(tmp_path / "m"), "--out", str(tmp_path / "r"),
                 "--config", str(tmp_path / "suite.yaml"), "--data-dir", str(shared_data), "--context", "128",
                 "--ppl-max-tokens", "5000", "--passkey-depths", "0,1", "--no-progress"])
    assert code == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    wt = report["perplexity"]["wikitext2_test"]
    assert wt["tokens_scored"] == wt["tokens"] == 5000 and wt["context"] == 128 and wt["perplexity"] > 1
    assert set(report["tasks"]["tasks"]) == {"piqa", "lambada_openai"}
    assert all(t["n"] == 3 for t in report["tasks"]["tasks"].values())
    assert [c["length"] for c in report["passkey"]["cells"]] == [256, 256]  # capped at the model's 256 positions
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Perplexity" in md and "## Zero-shot tasks" in md and "## Passkey" in md and "piqa" in md
    assert (tmp_path / "r" / "passkey.png").exists()
    assert md.strip() in capsys.readouterr().out
    (tmp_path / "bad.yaml").write_text("taks: piqa\n")
    bad = ["eval", "all", str(tmp_path / "m"), "--out", str(tmp_path / "r2"), "--config", str(tmp_path / "bad.yaml")]
    assert main(bad) == 2
