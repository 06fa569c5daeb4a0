"""`max_minutes`: a training launch that stops on time ends like a run at its last step."""

import json

import pytest

from crosslayer import CrossLayerError
from crosslayer.checkpoint import list_checkpoints
from crosslayer.train import load_train_config, loop, train

from .test_train import ptb, recipe  # noqa: F401  (the module's prepared Penn Treebank)


def test_max_minutes_stops_the_launch_saved_and_validated_and_a_resume_finishes(tmp_path, ptb, monkeypatch):  # noqa: F811
    clock = iter(range(0, 10_000, 30))  # every perf_counter call advances 30 s: each step takes >= 30 s
    monkeypatch.setattr(loop.time, "perf_counter", lambda: float(next(clock)))
    cfg = load_train_config(recipe(tmp_path, ptb, max_steps=8, eval_every=100, checkpoint_every=100,
                                   max_minutes=1.5))
    summary = train(cfg)
    run = tmp_path / "run"
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    steps = sorted({r["step"] for r in rows})
    assert 1 <= steps[-1] < 8  # stopped early, on time
    assert summary["step"] == steps[-1] and "val_loss" in summary  # validated at the step it stopped
    assert [c.name for c in list_checkpoints(run)] == [f"step_{steps[-1]:08d}"]  # and checkpointed there
    assert (run / "model.safetensors").exists() and (run / "config.json").exists()  # the model is saved
    monkeypatch.undo()
    # a later launch without the limit resumes and finishes the planned steps
    train(load_train_config(recipe(tmp_path, ptb, max_steps=8, eval_every=100, checkpoint_every=100)))
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 8


def test_max_minutes_must_be_positive(tmp_path):
    path = recipe(tmp_path, "d", max_minutes=0)
    with pytest.raises(CrossLayerError, match="max_minutes must be > 0"):
        load_train_config(path)
