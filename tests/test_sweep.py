import json
import math
import shutil
import struct
import sys
from pathlib import Path

import pytest
import yaml

from crosslayer import CrossLayerError
from crosslayer import sweep as sweep_mod
from crosslayer import train as train_mod
from crosslayer.__main__ import main
from crosslayer.config import CLAConfig
from crosslayer.data import prepare, read_meta
from crosslayer.plot import aggregate, pareto_front, read_results
from crosslayer.sweep import load_sweep, run_sweep

from .conftest import DATA

SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=1, head_dim=16, initializer_range=0.02)
WIKI = DATA / "wikitext-2" / "wiki.test.raw"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Penn Treebank validation text (real English) as a tiny prepared dataset, BPE 320."""
    ptb = DATA / "ptb"
    if not ptb.is_dir() or not WIKI.exists():
        pytest.skip(f"{ptb} or {WIKI} absent")
    out = tmp_path_factory.mktemp("ptb") / "data"
    prepare(f"text:{ptb}/ptb.valid.txt", out, tokenizer="bpe:320", val=f"{ptb}/ptb.test.txt", progress=False)
    return out


def write_sweep(path: Path, data_dir: Path, out: Path, **overrides) -> Path:
    spec = dict(
        data=str(data_dir), out=str(out), model_defaults=SHAPE, lrs=[3e-3, 1e-2], seeds=[0],
        models=[{"name": "mqa", "best_lr_seeds": [1]}, {"name": "mqa-cla2", "cla_factor": 2}],
        train=dict(seq_len=32, batch_tokens=256, micro_batch=8, max_steps=4, eval_every=2, eval_tokens=1024,
                   log_every=1, checkpoint_every=2, progress=False, dtype="fp32"),  # not the CPU's choice
        wikitext=dict(path=str(WIKI), context=32, stride=16, max_bytes=4000),
    )
    spec.update(overrides)
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def clean(data, tmp_path_factory):
    """The tiny grid run once, uninterrupted: 2 configs x 2 LRs x seed 0, plus seed 1 at mqa's best LR."""
    root = tmp_path_factory.mktemp("clean")
    sweep = load_sweep(write_sweep(root / "sweep.yaml", data, root / "out"))
    run_sweep(sweep)
    return root / "out"


def records(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# The frontier and the aggregation, on hand-made numbers


def test_pareto_front_on_hand_made_points():
    pts = [(1, 10.0), (2, 8.0), (2, 9.0), (4, 8.0), (4, 5.0), (8, 6.0), (3, math.inf), (16, 5.0)]
    # (2, 9) and (4, 8) lose to (2, 8); (8, 6) and (16, 5) to (4, 5); a diverged point is never on it
    assert pareto_front(pts) == [0, 1, 4]
    assert pareto_front([(1, 2.0), (1, 2.0)]) == [0, 1]  # ties dominate neither
    assert pareto_front([(4, 1.0), (2, 3.0), (1, 5.0)]) == [2, 1, 0]  # sorted by KV bytes
    assert pareto_front([]) == []


def test_aggregate_picks_the_lr_on_the_sweep_seeds_and_averages_seeds():
    row = dict(config="a", kv_bytes_per_token=512, parameters=1e6, cla=False)
    rows = [dict(row, lr=1e-3, seed=0, final_val_ppl=20.0), dict(row, lr=2e-3, seed=0, final_val_ppl=18.0),
            dict(row, lr=4e-3, seed=0, final_val_ppl=None),  # diverged
            dict(row, lr=2e-3, seed=1, final_val_ppl=24.0), dict(row, lr=2e-3, seed=2, final_val_ppl=21.0),
            dict(row, config="b", kv_bytes_per_token=256, cla=True, lr=1e-3, seed=0, final_val_ppl=30.0)]
    a, b = aggregate(rows)
    # 2e-3 wins on seed 0 (18 < 20), although its 3-seed mean (21) is worse than 1e-3's single run
    assert a["best_lr"] == 2e-3 and a["n"] == 3 and a["mean"] == pytest.approx(21.0)
    assert a["std"] == pytest.approx(3.0) and (a["min"], a["max"]) == (18.0, 24.0)
    assert [c["mean"] for c in a["curve"]] == [20.0, pytest.approx(21.0), math.inf]
    assert [c["sweep"] for c in a["curve"]] == [20.0, 18.0, math.inf]  # the LR curve: seed 0, the one all LRs have
    assert a["pareto"] and b["pareto"]  # b has fewer KV bytes, a lower perplexity
    with pytest.raises(CrossLayerError, match="metric"):
        aggregate(rows, "loss")


# ----------------------------------------------------------------------------------------------
# The sweep file


@pytest.mark.parametrize("change, message", [
    (dict(colour="red"), "unknown key"),
    (dict(data="/nope/data"), "does not exist; create it with `prepare`"),
    (dict(models=[]), "`models` is required"),
    (dict(lrs=[3e-3, -1]), "lrs: learning rates must be > 0"),
    (dict(lrs=[3e-3, 3e-3]), "repeats"),
    (dict(seeds=[0.5]), "not an integer"),
    (dict(models=["tiny-H32-XYZ"], model_defaults={}), r"models\[0\] \(tiny-H32-XYZ\): unknown preset"),
    (dict(models=[{"name": "a", "num_key_value_heads": 3}]), r"models\[0\] \(a\): num_attention_heads"),
    (dict(models=[{"name": "a"}, {"name": "a", "cla_factor": 2}]), "names must be unique"),
    (dict(train=dict(lr=1e-3)), "train: lr cannot be set here"),
    (dict(train=dict(max_steps=2, bogus=1)), "train: unknown training key"),
    (dict(train=dict(max_steps=2, seq_len=33, batch_tokens=256)), "batch_tokens"),
    (dict(wikitext=dict(path="/nope/wiki.txt")), "wikitext.path: no such file"),
    (dict(wikitext=dict(path=str(WIKI), stride=0)), "wikitext.stride"),
    (dict(launcher=""), "launcher"),
])
def test_bad_sweep_files_are_refused_with_one_clear_message(tmp_path, data, change, message, capsys):
    path = write_sweep(tmp_path / "s.yaml", data, tmp_path / "out", **change)
    with pytest.raises(CrossLayerError, match=message):
        load_sweep(path)
    assert main(["sweep", str(path)]) == 2
    assert "crosslayer sweep: error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_not_a_mapping_and_missing_file(tmp_path):
    (tmp_path / "s.yaml").write_text("- a\n- b\n")
    with pytest.raises(CrossLayerError, match="must hold a mapping"):
        load_sweep(tmp_path / "s.yaml")
    with pytest.raises(CrossLayerError, match="not found"):
        load_sweep(tmp_path / "none.yaml")


# ----------------------------------------------------------------------------------------------
# Running the grid


def test_grid_records_every_run(clean, data):
    rows = records(clean)
    names = [r["run"] for r in rows]
    s0 = {r["lr"]: r["final_val_ppl"] for r in rows if r["config"] == "mqa" and r["seed"] == 0}
    best = min(s0, key=s0.get)
    assert names == ["mqa_lr0.003_s0", "mqa_lr0.01_s0", f"mqa_lr{best:g}_s1", "mqa-cla2_lr0.003_s0",
                     "mqa-cla2_lr0.01_s0"]
    for r in rows:
        cla = r["config"] == "mqa-cla2"
        assert r["cla"] is cla and r["producer_layers"] == (2 if cla else 4)
        assert r["kv_bytes_per_token"] == 2 * 1 * 16 * r["producer_layers"] * 2
        assert r["tokens"] == 4 * 256 and r["resumed_from_step"] == 0 and not r["diverged"]
        metrics = [json.loads(ln) for ln in (clean / "runs" / r["run"] / "metrics.jsonl").read_text().splitlines()]
        vals = [m["val_ppl"] for m in metrics if "val_ppl" in m]
        assert len(vals) == 2 and r["final_val_ppl"] == vals[-1] and r["best_val_ppl"] == min(vals)
        assert 1 < r["final_val_ppl"] < 400 and 1 < r["wikitext_ppl"] and 0 < r["wikitext_bits_per_byte"] < 8
        config = CLAConfig(**SHAPE, cla_factor=2 if cla else 1, vocab_size=-(-read_meta(data)["vocab_size"] // 64) * 64)
        assert r["parameters"] == config.num_parameters()
    mqa, cla2 = rows[0], rows[3]
    assert mqa["parameters"] - cla2["parameters"] == 2 * (2 * 64 * 16 + 64)  # two layers' k, v and KV norm
    assert mqa["final_val_ppl"] != cla2["final_val_ppl"]
    # the CSV holds the same rows as the JSON lines
    assert [(r["run"], r["final_val_ppl"]) for r in read_results(clean / "results.csv")] == \
        [(r["run"], r["final_val_ppl"]) for r in rows]


def test_interrupted_sweep_resumes_only_what_is_unfinished(clean, data, tmp_path, monkeypatch):
    path = write_sweep(tmp_path / "sweep.yaml", data, tmp_path / "out")
    sweep = load_sweep(path)
    real_step = train_mod.Trainer.step

    def dying_step(self):  # the 4th run (mqa-cla2 at 3e-3) is killed after its step-2 checkpoint
        if "mqa-cla2_lr0.003" in self.cfg.out and self.step_idx == 3:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(train_mod.Trainer, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep)
    assert len(records(tmp_path / "out")) == 3  # the runs before it are recorded, no row for it
    monkeypatch.setattr(train_mod.Trainer, "step", real_step)

    trained = []
    real_train = sweep_mod.train
    monkeypatch.setattr(sweep_mod, "train", lambda cfg: trained.append(Path(cfg.out).name) or real_train(cfg))
    run_sweep(sweep)
    assert trained == ["mqa-cla2_lr0.003_s0", "mqa-cla2_lr0.01_s0"]  # finished runs were skipped
    rows = records(tmp_path / "out")
    assert [r["resumed_from_step"] for r in rows] == [0, 0, 0, 2, 0]
    keys = ("run", "final_val_ppl", "best_val_ppl", "wikitext_ppl", "wikitext_bits_per_byte", "parameters")
    assert [{k: r[k] for k in keys} for r in rows] == [{k: r[k] for k in keys} for r in records(clean)]

    # nothing left: a third call trains nothing and rewrites the same rows, no duplicates
    trained.clear()
    before = (tmp_path / "out" / "results.jsonl").read_text()
    assert main(["sweep", str(path)]) == 0
    assert trained == [] and (tmp_path / "out" / "results.jsonl").read_text() == before


def test_list_and_only(clean, data, tmp_path, capsys):
    path = write_sweep(tmp_path / "sweep.yaml", data, tmp_path / "out")
    assert main(["sweep", str(path), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "todo  mqa_lr?_s1 (best LR, not known yet)" and len(lines) == 5
    shutil.copytree(clean / "runs" / "mqa_lr0.003_s0", tmp_path / "out" / "runs" / "mqa_lr0.003_s0")
    assert main(["sweep", str(path), "--only", "mqa-cla2_lr0.01*"]) == 0
    assert [r["run"] for r in records(tmp_path / "out")] == ["mqa_lr0.003_s0", "mqa-cla2_lr0.01_s0"]


def test_launcher_runs_each_run_as_a_command_with_the_same_result(clean, data, tmp_path):
    path = write_sweep(tmp_path / "sweep.yaml", data, tmp_path / "out", launcher=sys.executable, lrs=[3e-3],
                       models=[{"name": "mqa-cla2", "cla_factor": 2}])
    run_sweep(load_sweep(path))
    (row,) = records(tmp_path / "out")
    assert (tmp_path / "out" / "runs" / "mqa-cla2_lr0.003_s0.yaml").exists()
    reference = next(r for r in records(clean) if r["run"] == row["run"])
    assert row["final_val_ppl"] == reference["final_val_ppl"] and row["wikitext_ppl"] == reference["wikitext_ppl"]


def test_a_launched_run_that_diverges_is_recorded_and_the_grid_goes_on(data, tmp_path):
    path = write_sweep(tmp_path / "sweep.yaml", data, tmp_path / "out", launcher=sys.executable, lrs=[1e30, 3e-3],
                       models=[{"name": "mqa"}], wikitext=None)
    rows = run_sweep(load_sweep(path))
    assert [(r["lr"], r["diverged"]) for r in rows] == [(1e30, True), (3e-3, False)]
    assert rows[0]["final_val_ppl"] is None and math.isfinite(rows[1]["final_val_ppl"])
    assert json.loads((tmp_path / "out" / "runs" / "mqa_lr1e+30_s0" / "diverged.json").read_text())["step"] >= 1


# ----------------------------------------------------------------------------------------------
# Plots and the table


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_plot_writes_figures_and_a_table(clean, tmp_path, capsys):
    assert main(["plot", str(clean), "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == (tmp_path / "table.md").read_text().strip()
    for name in ("pareto.png", "lr_curves.png"):
        w, h = png_size(tmp_path / name)
        assert w > 400 and h > 300
    points = {p["config"]: p for p in aggregate(read_results(clean / "results.jsonl"))}
    table = (tmp_path / "table.md").read_text().splitlines()
    rows = {ln.split("|")[1].strip(): ln for ln in table if ln.startswith("| mqa")}
    assert set(rows) == {"mqa", "mqa-cla2"}
    mqa, cla2 = points["mqa"], points["mqa-cla2"]
    assert mqa["n"] == 2 and f"{mqa['mean']:.2f} ± {mqa['std']:.2f}" in rows["mqa"]
    assert f"| {mqa['best_lr']:g} |" in rows["mqa"] and "| 256 |" in rows["mqa"] and "| 128 |" in rows["mqa-cla2"]
    # CLA2 has half the KV bytes, so it is on the frontier; MQA only if it has lower perplexity
    assert cla2["pareto"] and mqa["pareto"] == (mqa["mean"] < cla2["mean"])
    assert rows["mqa"].endswith("✓ |") == mqa["pareto"]
    with pytest.raises(CrossLayerError, match="no results"):
        read_results(tmp_path)
