import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import crosslayer  # noqa: F401
from crosslayer import CrossLayerError
from crosslayer import train as train_mod
from crosslayer.checkpoint import list_checkpoints, load_step_checkpoint_model
from crosslayer.data import prepare
from crosslayer.train import TrainConfig, load_train_config, lr_at, train
from crosslayer.train import objective as objective_mod

from .conftest import REPO

MODEL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=1, head_dim=16, cla_factor=2, initializer_range=0.02)


@pytest.fixture(scope="module")
def ptb(tmp_path_factory, request):
    """Penn Treebank (real text), BPE 512, prepared once for the module."""
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "ptb"
    if not data.is_dir():
        pytest.skip(f"{data} absent")
    out = tmp_path_factory.mktemp("ptb") / "data"
    prepare(f"text:{data}/ptb.train.txt", out, tokenizer="bpe:512", val=f"{data}/ptb.valid.txt", progress=False)
    return out


def recipe(tmp_path, data, **kw):
    cfg = dict(model=MODEL, data=str(data), out=str(tmp_path / "run"), seq_len=32, batch_tokens=1024,
               micro_batch=8, max_steps=8, lr=3e-3, eval_every=4, eval_tokens=2048, log_every=1,
               checkpoint_every=3, keep_checkpoints=2, progress=False,
               dtype="fp32")  # auto is bf16 on CPUs with bf16 matrix units: the exactness checks here are fp32's
    cfg.update(kw)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(run: Path) -> list:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r] + [(r["step"], r["val_loss"]) for r in rows
                                                                     if "val_loss" in r]


def run_group(cmd, timeout=300):
    """Run a command in its own process group; on timeout kill the whole group (torchrun's workers too)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def cli(*args, **popen):
    cmd = [sys.executable, "-m", "crosslayer", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, **popen)


def test_schedule_warmup_then_cosine_to_ten_percent():
    cfg = TrainConfig(model="tiny-H32-MQA", data="d", out="o", max_steps=100, lr=1.0)
    assert lr_at(0, cfg, 100) == pytest.approx(1 / 5)  # 5 warmup steps
    assert lr_at(4, cfg, 100) == pytest.approx(1.0)
    assert lr_at(99, cfg, 100) == pytest.approx(0.1)
    mid = lr_at(5 + 47, cfg, 100)
    assert 0.5 < mid < 0.6


def test_loss_decreases_on_real_text_and_output_loads(tmp_path, ptb):
    cfg = load_train_config(recipe(tmp_path, ptb, max_steps=30, eval_every=10, checkpoint_every=30))
    summary = train(cfg)
    run = Path(cfg.out)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    train_loss = [r["loss"] for r in rows if "loss" in r]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert train_loss[0] > math.log(512) - 0.5  # starts near uniform over the vocabulary
    assert sum(train_loss[-5:]) / 5 < train_loss[0] - 1.0
    assert val[-1] < val[0] and summary["val_loss"] == val[-1]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run)
    tok = AutoTokenizer.from_pretrained(run)
    assert type(model).__name__ == "CLAForCausalLM" and model.config.num_producer_layers == 2
    ids = tok("the company said", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def _run_until(args, run: Path, step: int, **kw):
    """Start a training subprocess and SIGKILL it (whole group) once checkpoint `step` exists."""
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, **kw)
    target = run / "checkpoints" / f"step_{step:08d}"
    deadline = time.time() + 300
    while not target.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.stderr.read().decode()[-2000:]}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("timed out")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_sigkill_then_resume_reproduces_uninterrupted_losses_bit_for_bit(tmp_path, ptb):
    path = recipe(tmp_path, ptb)
    whole = tmp_path / "whole"
    assert cli("train", str(path), "--out", str(whole)).returncode == 0
    killed = tmp_path / "killed"
    _run_until([sys.executable, "-m", "crosslayer", "train", str(path), "--out", str(killed)], killed, 3)
    assert not (killed / "model.safetensors").exists()
    proc = cli("train", str(path), "--out", str(killed))
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stderr
    assert losses(killed) == losses(whole)  # exact float equality, every step and every eval
    assert [p.name for p in list_checkpoints(killed)] == ["step_00000006", "step_00000008"]  # keep 2


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path, ptb):
    path = recipe(tmp_path, ptb)
    run = tmp_path / "run"
    # die (SIGKILL, no cleanup) in the middle of writing step 6: after the sharded state, before the trainer state
    script = f"""
import os, signal, torch, crosslayer.checkpoint as ck
real = torch.save
def dying_save(obj, f, *a, **k):
    if "step_00000006" in str(f):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, f, *a, **k)
ck.torch.save = dying_save
from crosslayer.__main__ import main
main(["train", {str(path)!r}, "--out", {str(run)!r}])
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(run)] == ["step_00000003"]
    assert (run / "checkpoints" / ".tmp-step_00000006" / "state" / ".metadata").exists()  # the half-written one
    step3 = list_checkpoints(run)[0]
    assert torch.load(step3 / "trainer.pt", weights_only=True)["step"] == 3
    assert load_step_checkpoint_model(step3).config.kv_sources == [0, 0, 2, 2]  # a complete, loadable model
    proc = cli("train", str(path), "--out", str(run))
    assert proc.returncode == 0, proc.stderr
    assert not (run / "checkpoints" / ".tmp-step_00000006").exists()
    whole = tmp_path / "whole"
    assert cli("train", str(path), "--out", str(whole)).returncode == 0
    assert losses(run) == losses(whole)


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, ptb, monkeypatch):
    cfg = load_train_config(recipe(tmp_path, ptb))
    real = objective_mod.causal_lm_loss
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        return loss * float("nan") if calls["n"] > 4 * 4 else loss  # 4 micro-batches a step: NaN at step 5

    monkeypatch.setattr(objective_mod, "causal_lm_loss", poisoned)  # the training objective and validation
    with pytest.raises(CrossLayerError, match=r"loss is nan at step 5.*step_00000003"):
        train(cfg)
    run = Path(cfg.out)
    assert [p.name for p in list_checkpoints(run)] == ["step_00000003"]
    step3 = list_checkpoints(run)[0]
    weights = load_step_checkpoint_model(step3).state_dict()
    assert torch.load(step3 / "trainer.pt", weights_only=True)["step"] == 3
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (run / "model.safetensors").exists()
    assert json.loads((run / "diverged.json").read_text())["step"] == 5  # what a launcher reads


class _Killed(BaseException):
    """Stands for a SIGKILL: nothing catches it, nothing cleans up after it."""


def test_resume_after_a_kill_while_the_output_is_written_finishes_it(tmp_path, ptb, monkeypatch):
    cfg = load_train_config(recipe(tmp_path, ptb, max_steps=2, eval_every=2, checkpoint_every=2))
    run = Path(cfg.out)
    real = train_mod.Trainer.write_model_files

    def dying(self, folder):  # the checkpoint's own model files pass; the run's output dies half-written
        if Path(folder) == run:
            (run / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes()[:1000])
            raise _Killed
        return real(self, folder)

    monkeypatch.setattr(train_mod.Trainer, "write_model_files", dying)
    with pytest.raises(_Killed):
        train(cfg)
    monkeypatch.setattr(train_mod.Trainer, "write_model_files", real)
    last = list_checkpoints(run)[-1]
    assert last.name == "step_00000002" and not (run / "summary.json").exists()
    summary = train(cfg)  # resumed at its last step: writes the output from that checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run)
    expected = load_step_checkpoint_model(last).state_dict()
    assert all(torch.equal(t, expected[name]) for name, t in model.state_dict().items())
    assert AutoTokenizer.from_pretrained(run) is not None and (run / "README.md").is_file()
    assert summary == json.loads((run / "summary.json").read_text()) and summary["step"] == 2
    assert summary["val_loss"] == losses(run)[-1][1]  # the last step's validation, logged before the kill
    # a summary of an earlier launch stopped by its time limit does not mark the output finished either; and
    # were the last step's validation not logged, it is run again on the checkpoint's weights
    (run / "summary.json").write_text(json.dumps({**summary, "step": 1}))
    (run / "README.md").unlink()
    metrics = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(ln + "\n" for ln in metrics if "val_loss" not in ln))
    again = train(cfg)
    assert again["step"] == 2 and again["val_loss"] == summary["val_loss"] and (run / "README.md").is_file()
    assert (run / "metrics.jsonl").read_text().splitlines() == metrics
    assert len(list_checkpoints(run)) == 1  # no step was trained again


def test_init_starts_from_saved_weights(tmp_path, ptb):
    first = load_train_config(recipe(tmp_path, ptb, max_steps=2, eval_every=2, checkpoint_every=2))
    train(first)
    cfg = load_train_config(recipe(tmp_path, ptb, max_steps=2), init=first.out, out=str(tmp_path / "up"))
    assert cfg.model is None
    trainer = train_mod.Trainer(cfg)
    from safetensors.torch import load_file

    saved = load_file(Path(first.out) / "model.safetensors")
    for name, tensor in trainer.raw_model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


@pytest.mark.parametrize("sets, message", [
    (["bogus=1"], "unknown training key"),
    (["seq_len=abc"], r"seq_len: expected int"),
    (["lr=-1"], "need lr > 0"),
    (["batch_tokens=1000"], "must be a multiple of seq_len"),
    (["parallel=zero3"], "parallel must be ddp or fsdp"),
    (["tokens=4096"], "exactly one of max_steps or tokens"),
    (["compile=maybe"], "compile: expected bool"),
    (["model.hidden_sise=3"], "unknown config field"),
    (["seq_len"], "--set expects key=value"),
])
def test_bad_recipe_keys_and_values_are_rejected(tmp_path, sets, message):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(dict(model=MODEL, data="d", out=str(tmp_path / "o"), seq_len=32,
                                        batch_tokens=1024, max_steps=2)))
    with pytest.raises(CrossLayerError, match=message):
        cfg = load_train_config(path, sets)
        train_mod.build_model_config(cfg, {"vocab_size": 100})


def test_resuming_with_other_settings_is_refused_and_the_run_kept(tmp_path, ptb, capsys):
    from crosslayer.__main__ import main

    path = recipe(tmp_path, ptb, max_steps=2, checkpoint_every=2)
    assert main(["train", str(path), "--no-progress"]) == 0
    kept = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train", str(path), "--set", "lr=1e-3", "--set", "seed=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds a run with different lr, seed" in err
    assert {p: p.read_bytes() for p in kept} == kept


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_and_resume_on_one(tmp_path, ptb, parallel):
    path = recipe(tmp_path, ptb, parallel=parallel, max_steps=6)
    one = tmp_path / "one"
    assert cli("train", str(path), "--out", str(one)).returncode == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "crosslayer", "train", str(path)]
    two = tmp_path / "two"
    proc = run_group(torchrun + ["--out", str(two)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (s1, a), (s2, b) in zip(losses(one), losses(two), strict=True):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-5, abs=1e-5)
    # sharded checkpoints written by 2 processes resume on 1 ...
    moved = tmp_path / "moved"
    _run_until(torchrun + ["--out", str(moved)], moved, 3)
    proc = cli("train", str(path), "--out", str(moved))
    assert proc.returncode == 0, proc.stderr
    assert "written by 2 process(es)" in proc.stderr
    for (s1, a), (s2, b) in zip(losses(one), losses(moved), strict=True):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-5, abs=1e-5)
    if parallel == "ddp":
        return
    # ... and those of 1 process on 2 (sharded on load)
    grown = tmp_path / "grown"
    _run_until([sys.executable, "-m", "crosslayer", "train", str(path), "--out", str(grown)], grown, 3)
    proc = run_group(torchrun + ["--out", str(grown)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "written by 1 process(es)" in proc.stderr
    for (s1, a), (s2, b) in zip(losses(one), losses(grown), strict=True):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-5, abs=1e-5)


def test_every_shipped_recipe_is_valid():
    from crosslayer.sweep import load_sweep

    sweeps = sorted((REPO / "configs").glob("sweep-*.yaml"))  # grids of runs, not one recipe
    for path in sweeps:
        assert load_sweep(path, check_data=False).models  # the data is prepared by the commands in its header
    recipes = sorted(set((REPO / "configs").glob("*.yaml")) - set(sweeps))
    assert len(recipes) >= 8 and len(sweeps) >= 1
    for path in recipes:
        cfg = load_train_config(path)
        config = train_mod.build_model_config(cfg, {"vocab_size": 50277, "eos_token_id": 0})
        assert cfg.total_steps >= 1 and config.vocab_size >= 50277
        if path.name.startswith("paper-"):
            assert cfg.batch_tokens == 2048 * 2048 and cfg.seq_len == 2048 and cfg.parallel == "fsdp"


def test_tensorboard_logs_train_and_val_scalars(tmp_path, ptb):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_train_config(recipe(tmp_path, ptb, max_steps=4, eval_every=2, checkpoint_every=4, tensorboard=True))
    train(cfg)
    events = EventAccumulator(str(Path(cfg.out) / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "val/loss", "val/ppl"} <= set(tags)
    assert [e.step for e in events.Scalars("val/loss")] == [2, 4]
    logged = [json.loads(ln) for ln in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert events.Scalars("train/loss")[-1].value == pytest.approx([r["loss"] for r in logged if "loss" in r][-1])


# ----------------------------------------------------------------------------------------------
# Precision, compile and activation checkpointing, applied from outside the model by the Trainer


def _trainer(tmp_path, data, name, **kw):
    cfg = load_train_config(recipe(tmp_path, data, out=str(tmp_path / name), seq_len=16, batch_tokens=128,
                                   micro_batch=4, max_steps=4, eval_every=2, eval_tokens=256, checkpoint_every=2,
                                   **kw))
    return cfg


def test_bf16_on_cpu_autocasts_the_matmuls_and_keeps_fp32_weights(tmp_path, ptb):
    trainer = train_mod.Trainer(_trainer(tmp_path, ptb, "bf16", dtype="bf16"))
    seen = []
    hook = trainer.raw_model.model.layers[0].mlp.up_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    bf16 = [trainer.step()["loss"] for _ in range(2)]
    hook.remove()
    assert trainer.precision == "bf16-autocast" and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in trainer.raw_model.parameters())
    fp32 = train_mod.Trainer(_trainer(tmp_path, ptb, "fp32", dtype="fp32"))
    reference = [fp32.step()["loss"] for _ in range(2)]
    assert bf16 != reference and bf16 == pytest.approx(reference, rel=2e-2)  # rounded, not another computation


def test_activation_checkpointing_through_the_trainer_changes_nothing(tmp_path, ptb):
    plain = train_mod.Trainer(_trainer(tmp_path, ptb, "plain"))
    recomputed = train_mod.Trainer(_trainer(tmp_path, ptb, "ckpt", activation_checkpointing=True))
    assert all(layer.gradient_checkpointing for layer in recomputed.raw_model.model.layers)
    for _ in range(2):
        assert recomputed.step() == plain.step()  # loss, lr and gradient norm, bit for bit
    for a, b in zip(plain.raw_model.parameters(), recomputed.raw_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_compiled_run_saves_and_resumes_like_an_uninterrupted_one(tmp_path, ptb):
    eager = _trainer(tmp_path, ptb, "eager")
    train(eager)
    half = _trainer(tmp_path, ptb, "half", compile=True)
    trainer = train_mod.Trainer(half)
    first = [trainer.step()["loss"] for _ in range(2)]
    trainer.save_checkpoint(Path(half.out), 2)  # a compiled model's state, saved under the model's own names
    assert "_orig_mod" not in (Path(half.out) / "checkpoints" / "step_00000002" / "state" / ".metadata").read_bytes().decode(
        "latin-1")
    train(half)  # as a new process would: resume from step 2, compile again, finish
    resumed = [loss for step, loss in losses(Path(half.out)) if step > 2]
    reference = [loss for step, loss in losses(Path(eager.out))]
    assert first + resumed[:2] == pytest.approx(reference[:4], rel=1e-4)  # steps 1-4, across the restart


def test_dtype_auto_is_bf16_where_the_cpu_has_bf16_matrix_units(tmp_path, ptb, monkeypatch):
    from crosslayer import device as device_mod

    for units, precision in ((True, "bf16-autocast"), (False, "fp32")):
        monkeypatch.setattr(device_mod, "has_bf16_matrix_units", lambda units=units: units)
        assert train_mod.Trainer(_trainer(tmp_path, ptb, f"auto-{units}", dtype="auto")).precision == precision


def test_offline_teacher_of_the_whole_vocabulary_trains_as_the_online_one(tmp_path, ptb):
    """top-k = the vocabulary: the stored teacher is the whole teacher, so the losses equal online distillation's."""
    from crosslayer import CLAForCausalLM
    from crosslayer.data import read_meta

    base = load_train_config(recipe(tmp_path, ptb, seq_len=16, batch_tokens=128, micro_batch=4, max_steps=3))
    config = train_mod.build_model_config(base, read_meta(ptb))
    torch.manual_seed(1)
    CLAForCausalLM(config).save_pretrained(tmp_path / "teacher")
    runs = {}
    for name, extra in (("online", {}), ("offline", {"teacher_topk": config.vocab_size,
                                                     "teacher_cache": str(tmp_path / "store")})):
        cfg = load_train_config(recipe(tmp_path, ptb, out=str(tmp_path / name), seq_len=16, batch_tokens=128,
                                       micro_batch=4, max_steps=3, objective="logits",
                                       teacher=str(tmp_path / "teacher"), **extra))
        trainer = train_mod.Trainer(cfg)
        runs[name] = [trainer.step()["loss"] for _ in range(3)]
    assert runs["offline"] == pytest.approx(runs["online"], rel=1e-4)
    done = np.load(tmp_path / "store" / "done.npy")
    assert done.sum() == 3 * 128 // 16  # every window the three steps read, computed once
