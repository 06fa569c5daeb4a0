"""The recovery recipe at scale: a converted model distilled from its teacher under torchrun (2 gloo processes on
the CPU) gives the losses of 1 process, the teacher sharded like the model under FSDP2 and whole under DDP, with
the online teacher and with the offline top-k store.

Tolerance: every run is fp32 and computes the same thing; 2 processes only sum in another order (each averages
half the batch's gradients, then the processes average theirs; each process runs on 1 thread, 1 process on 2).
Those roundings are ~1e-7 relative (measured: the losses of 4 steps agree to <= 3e-8 relative); rel 1e-5 leaves
room for other CPUs' kernels while a wrong teacher, window or gradient moves the losses by 1e-3 and more.
"""

import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from crosslayer import CLAForCausalLM, CrossLayerError
from crosslayer.convert import convert
from crosslayer.data import load_tokens, read_meta
from crosslayer.loading import copy_tokenizer_files
from crosslayer.train import SequenceOrder, TrainConfig, Trainer, build_model_config, load_train_config, train

from .test_train import MODEL, losses, ptb, recipe, run_group  # noqa: F401  (ptb: the fixture, prepared once here)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "crosslayer", "train"]
TEACHER_HELD = re.compile(r"teacher ([\d.]+)M parameters, ([\d.]+)M on this process \(([^)]*)\)")


@pytest.fixture(scope="module")
def models(tmp_path_factory, ptb):  # noqa: F811
    """A tiny dense crosslayer model of the data's tokenizer (the teacher; weights spread enough that its
    distribution is far from uniform) and its CLA2 conversion with mean-pooled K/V (the model recovered)."""
    root = tmp_path_factory.mktemp("recovery")
    dense = TrainConfig(model={**MODEL, "cla_factor": 1, "initializer_range": 0.1}, data=str(ptb), out="-", max_steps=1)
    config = build_model_config(dense, read_meta(ptb))
    torch.manual_seed(0)
    CLAForCausalLM(config).save_pretrained(root / "teacher")
    copy_tokenizer_files(ptb, root / "teacher")
    convert(root / "teacher", root / "cla2", cla_factor=2, kv_init="mean")
    return root


def recovery(tmp_path, data, models, **kw):
    keys = dict(model=None, init=str(models / "cla2"), teacher=str(models / "teacher"), objective="logits",
                max_steps=4, eval_every=4, checkpoint_every=4)
    return recipe(tmp_path, data, **{**keys, **kw})


def same_losses(one: Path, two: Path) -> None:
    for (s1, a), (s2, b) in zip(losses(one), losses(two), strict=True):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-5, abs=1e-6)


def launch(path: Path, out: Path, *sets: str) -> str:
    proc = run_group(TORCHRUN + [str(path), "--out", str(out), *[a for s in sets for a in ("--set", s)]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def teacher_held(stderr: str) -> tuple[float, float, str]:
    total, held, how = TEACHER_HELD.search(stderr).groups()
    return float(total), float(held), how


@pytest.mark.slow
def test_logit_distillation_on_two_processes_matches_one(tmp_path, ptb, models):  # noqa: F811
    path = recovery(tmp_path, ptb, models)
    one = tmp_path / "one"
    train(load_train_config(path, out=str(one)))
    fsdp = launch(path, tmp_path / "fsdp", "parallel=fsdp")
    same_losses(one, tmp_path / "fsdp")
    total, held, how = teacher_held(fsdp)
    assert how == "sharded like the model, FSDP2" and held <= 0.55 * total  # each process holds half of it
    ddp = launch(path, tmp_path / "ddp", "parallel=ddp")
    same_losses(one, tmp_path / "ddp")
    total, held, how = teacher_held(ddp)
    assert how == "whole" and held == total


@pytest.mark.slow
def test_offline_teacher_store_filled_by_two_sharded_processes(tmp_path, ptb, models):  # noqa: F811
    """The store is filled by both processes, each its own windows; a sharded teacher's forward takes both, so the
    process with fewer windows to compute (here none at all in a step) runs the teacher as often as the other."""
    path = recovery(tmp_path, ptb, models, teacher_topk=16)
    one = tmp_path / "one"
    train(load_train_config(path, out=str(one), teacher_cache=str(tmp_path / "store1")))
    shutil.copytree(tmp_path / "store1", tmp_path / "store2")
    order = SequenceOrder(load_tokens(ptb, "train"), 32, 0)  # 16 sequences per process and step
    done = np.load(tmp_path / "store2" / "done.npy", mmap_mode="r+")
    done[order.windows(range(16, 32))] = False  # step 1: process 1 computes 16 windows (4 forwards), process 0 none
    done[order.windows(range(32, 37))] = False  # step 2: process 0 computes 5 (2 forwards), process 1 none
    done.flush()
    del done
    two = tmp_path / "two"
    _, held, how = teacher_held(launch(path, two, "parallel=fsdp", f"teacher_cache={tmp_path / 'store2'}"))
    assert how == "sharded like the model, FSDP2"
    same_losses(one, two)
    assert np.load(tmp_path / "store2" / "done.npy").sum() == np.load(tmp_path / "store1" / "done.npy").sum() == 4 * 32
    for name in ("logprobs", "log_rest"):
        np.testing.assert_allclose(np.load(tmp_path / "store2" / f"{name}.npy"),
                                   np.load(tmp_path / "store1" / f"{name}.npy"), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_attention_distillation_on_two_ddp_processes_matches_one(tmp_path, ptb, models):  # noqa: F811
    """The attention objective runs the model's layers itself, past DDP's forward: the trainer averages the
    gradients (without that each process trained on its own half of the batch)."""
    path = recovery(tmp_path, ptb, models, objective="attention", trainable="kv")
    one = tmp_path / "one"
    train(load_train_config(path, out=str(one)))
    launch(path, tmp_path / "ddp", "parallel=ddp")
    same_losses(one, tmp_path / "ddp")


def test_attention_distillation_under_fsdp_is_refused_before_anything_starts(tmp_path, ptb, models, monkeypatch):  # noqa: F811
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: the check comes before the process group
    cfg = load_train_config(recovery(tmp_path, ptb, models, objective="attention", trainable="kv", parallel="fsdp"))
    with pytest.raises(CrossLayerError, match="outside FSDP's forward.*use parallel: ddp"):
        Trainer(cfg)
    assert not dist.is_initialized()
