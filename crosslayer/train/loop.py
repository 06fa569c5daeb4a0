"""The run: open (or resume) a run folder, step until the end or the time limit, validate and checkpoint
on schedule and at the last step, save the model. Only rank 0 logs and writes files."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from .. import checkpoint as ckpt
from ..errors import CrossLayerError, TrainingDiverged
from ..loading import quiet_transformers
from ..model_card import read_plan_record, training_record, write_model_card
from .config import TrainConfig
from .objective import evaluate
from .runlog import RunLog, last_validation, truncate_metrics
from .trainer import ShardedTeacher, Trainer

log = logging.getLogger(__name__)
SUMMARY = "summary.json"  # written last, whole: the run's output (model folder) is finished


def diverged_marker(out: Path) -> Path:
    """The file a run writes when its loss diverges (so a launcher can tell divergence from a crash)."""
    return Path(out) / "diverged.json"


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; returns the last metrics. Only rank 0 logs and writes files."""
    out = Path(cfg.out)
    trainer = open_run(cfg, out)
    if trainer.step_idx >= trainer.total_steps:
        summary = finished_summary(out, trainer.total_steps)
        if summary is not None:
            _log(trainer, f"{out} is already trained to step {trainer.total_steps}")
            return summary
        # killed after its last checkpoint, before its output was whole: write that from the checkpoint
        _log(trainer, f"{out} is trained to step {trainer.total_steps}; writing its model from the last checkpoint")
        return _finish(trainer, out)
    _log(trainer, _plan(trainer))
    with RunLog(out, trainer.rank == 0, cfg.tensorboard, cfg.progress, trainer.step_idx, trainer.total_steps) as run_log:
        last = run_steps(trainer, out, run_log)
    return _write_summary(trainer, out, last)


def open_run(cfg: TrainConfig, out: Path) -> Trainer:
    """The trainer of the run folder `out`, made (rank 0) or resumed from its newest checkpoint."""
    _check_resume_compatible(out, cfg)
    trainer = Trainer(cfg)
    rank0 = trainer.rank == 0
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.clean_partial(out)
        (out / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    _barrier(trainer)  # the folder exists (rank 0 made it) before anyone reads or writes in it
    existing = ckpt.list_checkpoints(out)
    if existing:
        trainer.resume(existing[-1])
        _log(trainer, f"resuming {out} from step {trainer.step_idx} ({existing[-1].name}, written by "
                      f"{torch.load(existing[-1] / ckpt.TRAINER, weights_only=True)['world_size']} process(es))")
    if rank0:
        diverged_marker(out).unlink(missing_ok=True)
        truncate_metrics(out, trainer.step_idx)
    return trainer


def run_steps(trainer: Trainer, out: Path, run_log: RunLog) -> dict[str, Any]:
    """Optimizer steps to the last one (or the time limit); returns the last validation record."""
    cfg, total = trainer.cfg, trainer.total_steps
    deadline = Deadline(cfg.max_minutes, trainer)
    last: dict[str, Any] = {}
    while trainer.step_idx < total:
        result = trainer.step()
        step = trainer.step_idx
        # a time limit ends the run at this step: validated, checkpointed and saved like the last step
        timed_out = deadline.passed()
        final = step == total or timed_out
        _stop_if_diverged(trainer, out, result["loss"], step)
        record = {"step": step, "tokens": step * cfg.batch_tokens, **result}
        run_log.train_step(record, cfg.batch_tokens, write=step % cfg.log_every == 0 or final)
        if step % cfg.eval_every == 0 or final:
            last = validate(trainer, step, run_log)
        if step % cfg.checkpoint_every == 0 or final:
            save(trainer, out, step, final, last)
        if timed_out:
            _log(trainer, f"max_minutes {cfg.max_minutes}: stopped at step {step} of {total}")
            break
    return last


class Deadline:
    """`max_minutes` of this launch, counted from now; under torchrun every process stops at the same step."""

    def __init__(self, minutes: float | None, trainer: Trainer) -> None:
        self.minutes, self.trainer = minutes, trainer
        self.start = time.perf_counter()

    def passed(self) -> bool:
        if self.minutes is None:
            return False
        passed = (time.perf_counter() - self.start) / 60 >= self.minutes
        if self.trainer.world > 1:  # one process past it stops them all
            flag = torch.tensor([float(passed)], device=self.trainer.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            passed = bool(flag.item())
        return passed


def validate(trainer: Trainer, step: int, run_log: RunLog) -> dict[str, Any]:
    """The validation loss at this step (every process takes part), logged; returns its record."""
    ev = evaluate(trainer.model, trainer.val_tokens, trainer.cfg, trainer.device, trainer.autocast, trainer.rank,
                  trainer.world)
    record = {"step": step, "tokens": step * trainer.cfg.batch_tokens, **ev}
    run_log.validation(record)
    return record


def save(trainer: Trainer, out: Path, step: int, final: bool, validation: dict[str, Any] | None = None) -> None:
    """A checkpoint of this step; at the last step also the run's output (`write_output`)."""
    saved = trainer.save_checkpoint(out, step)
    if final:
        write_output(trainer, out, saved, step, validation)


def write_output(trainer: Trainer, out: Path, saved: Path, step: int, validation: dict[str, Any] | None) -> None:
    """The run's output in `out`: the model consolidated from the checkpoint `saved` of `step`, its config and
    tokenizer, and a model card (README.md: the recipe, the sharing plan, `validation`, the last validation
    record). summary.json, written after it (`_write_summary`), marks it whole."""
    if trainer.rank == 0:
        (out / SUMMARY).unlink(missing_ok=True)  # a time limit's earlier output is being replaced
        with quiet_transformers():
            ckpt.load_step_checkpoint_model(saved).save_pretrained(out)
        trainer.write_model_files(out)
        cfg = trainer.cfg
        write_model_card(out, trainer.model_config, plan=read_plan_record(cfg.init) if cfg.init else None,
                         training=training_record(cfg.to_dict(), step, validation))
    _barrier(trainer)


def finished_summary(out: Path, total: int) -> dict[str, Any] | None:
    """summary.json of a run whose output is whole at step `total`, or None (absent, cut short by a kill, or
    left by an earlier launch stopped by its time limit)."""
    try:
        summary = json.loads((out / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("step") == total else None


def _finish(trainer: Trainer, out: Path) -> dict[str, Any]:
    """The output of a run trained to its last step whose output was not finished: written from the last
    checkpoint (the state `trainer` resumed), validated again only if that step's validation was not logged."""
    step = trainer.step_idx
    last = last_validation(out)
    logged = torch.tensor([float(last.get("step") == step)], device=trainer.device)
    if trainer.distributed:  # rank 0's log decides: validation is a collective
        dist.broadcast(logged, 0)
    if not logged.item():
        cfg = trainer.cfg
        with RunLog(out, trainer.rank == 0, cfg.tensorboard, False, step, trainer.total_steps) as run_log:
            last = validate(trainer, step, run_log)
    write_output(trainer, out, ckpt.list_checkpoints(out)[-1], step, last)
    return _write_summary(trainer, out, last)


def _stop_if_diverged(trainer: Trainer, out: Path, loss: float, step: int) -> None:
    """A non-finite loss (the same on every process) ends the run: diverged.json on rank 0, then TrainingDiverged."""
    if math.isfinite(loss):
        return
    good = ckpt.list_checkpoints(out)
    message = (f"loss is {loss} at step {step}: training diverged. The last good checkpoint "
               f"{'is ' + str(good[-1]) if good else 'does not exist (none was written yet)'}; lower lr "
               f"(now {trainer.cfg.lr}) or raise warmup_frac and start again")
    if trainer.rank == 0:
        diverged_marker(out).write_text(json.dumps({"step": step, "loss": loss, "message": message}))
    raise TrainingDiverged(message)


def _plan(trainer: Trainer) -> str:
    cfg, config = trainer.cfg, trainer.model_config
    n_params = sum(p.numel() for p in trainer.raw_model.parameters())
    plan = (f"training {n_params / 1e6:.2f}M parameters, KV {config.kv_bytes_per_token()} B/token (16-bit), "
            f"{trainer.total_steps} steps x {cfg.batch_tokens} tokens, {trainer.world} process(es), "
            f"{trainer.accum} micro-batch(es) of {trainer.micro}, {trainer.device}, {trainer.precision}")
    if trainer.teacher is not None:
        params = list(trainer.teacher.parameters())
        held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
        plan += (f"; teacher {sum(p.numel() for p in params) / 1e6:.2f}M parameters, {held / 1e6:.2f}M on this "
                 f"process ({'sharded like the model, FSDP2' if isinstance(trainer.teacher, ShardedTeacher) else 'whole'})")
    return plan


def _write_summary(trainer: Trainer, out: Path, last: dict[str, Any]) -> dict[str, Any]:
    summary = {**last, "parameters": sum(p.numel() for p in trainer.raw_model.parameters()),
               "kv_bytes_per_token": trainer.model_config.kv_bytes_per_token()}
    if trainer.rank == 0:
        tmp = out / f".{SUMMARY}.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, out / SUMMARY)  # whole or absent: it marks the output finished
        _log(trainer, f"done: val loss {last.get('val_loss', float('nan')):.4f}, "
                      f"ppl {last.get('val_ppl', float('nan')):.2f}; model saved to {out}")
    return summary


def _check_resume_compatible(out: Path, cfg: TrainConfig) -> None:
    saved = out / "train_config.yaml"
    if not saved.exists():
        if out.exists() and any(out.iterdir()) and not (out / "checkpoints").exists():
            raise CrossLayerError(f"{out} exists and is not a crosslayer run folder; choose another out")
        return
    before = yaml.safe_load(saved.read_text()) or {}
    now = cfg.to_dict()
    diffs = [k for k in TrainConfig.RESUME_KEYS if before.get(k) != now.get(k)]
    if diffs:
        raise CrossLayerError(
            f"{out} holds a run with different {', '.join(diffs)}; resume with the same settings or choose another out"
        )


def _barrier(trainer: Trainer) -> None:
    if trainer.distributed:
        dist.barrier()


def _log(trainer: Trainer, message: str) -> None:
    if trainer.rank == 0:
        log.info(message)
