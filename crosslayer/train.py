"""Pretraining and uptraining: one code path for one CPU process and `torchrun` on many GPUs.

The model is written for one device; data parallelism (DDP or FSDP2 `fully_shard`), mixed
precision and `torch.compile` are applied here, from outside, in that order. Defaults follow the
paper: AdamW (0.9, 0.95), weight decay 0.1 on matrices, clip 1.0, 5% linear warmup then cosine to
10% of peak, bf16 autocast on CUDA (fp32 master weights and gradient all-reduce), fp32 on CPU.

Data order is a pure function of (seed, step): sequence g of the run is chunk
`permutation(epoch)[g % chunks]` of the token stream. Resuming needs only the step, and N
processes see exactly the sequences one process would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from . import checkpoint as ckpt
from .config import CLAConfig, load_config
from .data import load_tokens, read_meta
from .errors import CrossLayerError, TrainingDiverged
from .loading import copy_tokenizer_files, load_init_model, load_teacher, quiet_transformers
from .modeling import CLADecoderLayer, CLAForCausalLM
from .recipe import apply_sets, read_yaml, settings_from
from .recover import build_objective, select_trainable

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    model: Any = None  # preset name, or a mapping of CLAConfig fields (may hold `preset:`)
    data: str = ""  # a folder made by `crosslayer prepare`
    out: str = ""  # the run folder: checkpoints/, metrics.jsonl, and at the end the model itself
    init: str | None = None  # start from the weights of this saved model folder (uptraining)
    seq_len: int = 256  # tokens per training sequence
    batch_tokens: int = 16384  # global tokens per optimizer step (gradient accumulation reaches it)
    micro_batch: int = 16  # sequences per forward pass, per process
    max_steps: int | None = None  # optimizer steps; or give `tokens`
    tokens: int | None = None  # total training tokens; max_steps = tokens // batch_tokens
    max_minutes: float | None = None  # stop this launch once its steps took this many minutes (saved as at the end)
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    warmup_frac: float = 0.05  # linear warmup over this fraction of the steps
    weight_decay: float = 0.1  # on weight matrices and embeddings, not on norms or biases
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    eval_every: int = 100  # steps between validation passes (and always at the last step)
    eval_tokens: int = 262144  # validation tokens per pass (fewer if the split is smaller)
    log_every: int = 10  # steps between metrics.jsonl lines
    checkpoint_every: int = 200  # steps between checkpoints (and always at the last step)
    keep_checkpoints: int = 2  # newest checkpoints kept
    seed: int = 0  # model init and data order
    parallel: str = "ddp"  # under torchrun: ddp or fsdp
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: bf16 autocast on cuda, fp32 on cpu; or fp32 / bf16
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each layer in backward: less memory, ~1/3 more compute
    attn_implementation: str = "sdpa"
    tensorboard: bool = False  # also log to out/tensorboard
    progress: bool = True  # progress bar on stderr
    # recovering a converted model (crosslayer.recover): what trains, and against what
    trainable: str = "all"  # all, or a subset such as kv (what conversion changed); see recover.TRAINABLE
    objective: str = "lm"  # lm: next-token loss; a distillation objective needs `teacher`; see recover.OBJECTIVES
    teacher: str | None = None  # the original model (folder, hub id, .gguf) that distillation imitates
    distill_temperature: float = 1.0  # softmax temperature of logit distillation

    # keys that must match when a run folder is resumed (the others may change between launches)
    RESUME_KEYS = ("model", "data", "init", "seq_len", "batch_tokens", "max_steps", "tokens", "lr", "min_lr_ratio",
                   "warmup_frac", "weight_decay", "beta1", "beta2", "adam_eps", "grad_clip", "seed", "trainable",
                   "objective", "teacher", "distill_temperature")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        cfg = settings_from(cls, raw, "training")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not self.data:
            raise CrossLayerError("data: give the folder made by `crosslayer prepare`")
        if not self.out:
            raise CrossLayerError("out: give a run folder")
        if self.model is None and self.init is None:
            raise CrossLayerError("model: give a preset name or config fields (or init: a saved model folder)")
        if self.model is not None and self.init is not None:
            raise CrossLayerError("give model or init, not both: init takes its architecture from the saved model")
        if (self.max_steps is None) == (self.tokens is None):
            raise CrossLayerError("give exactly one of max_steps or tokens")
        for key in ("seq_len", "batch_tokens", "micro_batch", "eval_every", "log_every", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise CrossLayerError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise CrossLayerError(f"max_minutes must be > 0, got {self.max_minutes}")
        if self.batch_tokens % self.seq_len:
            raise CrossLayerError(f"batch_tokens ({self.batch_tokens}) must be a multiple of seq_len ({self.seq_len})")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.warmup_frac < 1:
            raise CrossLayerError("need lr > 0, 0 <= min_lr_ratio <= 1 and 0 <= warmup_frac < 1")
        if self.parallel not in ("ddp", "fsdp"):
            raise CrossLayerError(f"parallel must be ddp or fsdp, got {self.parallel!r}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise CrossLayerError(f"dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        if self.keep_checkpoints < 1:
            raise CrossLayerError("keep_checkpoints must be >= 1")
        from .recover import OBJECTIVES, TRAINABLE

        if self.trainable not in TRAINABLE:
            raise CrossLayerError(f"trainable must be one of {', '.join(TRAINABLE)}; got {self.trainable!r}")
        if self.objective not in OBJECTIVES:
            raise CrossLayerError(f"objective must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}")
        if (self.objective != "lm") != (self.teacher is not None):
            raise CrossLayerError(f"objective {self.objective!r} " + ("needs a teacher (the original model)"
                                  if self.teacher is None else "takes no teacher; use a distillation objective"))
        if not self.distill_temperature > 0:
            raise CrossLayerError(f"distill_temperature must be > 0, got {self.distill_temperature}")

    @property
    def total_steps(self) -> int:
        steps = self.max_steps if self.max_steps is not None else self.tokens // self.batch_tokens
        if steps < 1:
            raise CrossLayerError(f"tokens ({self.tokens}) is less than one batch ({self.batch_tokens})")
        return steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_train_config(path: str | Path | None, sets: list[str] = (), **overrides: Any) -> TrainConfig:
    """A YAML recipe plus `key=value` overrides (values parsed as YAML) and keyword overrides (None: unset)."""
    raw = read_yaml(path, "training recipe") if path is not None else {}
    raw = apply_sets(raw, sets)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    if overrides.get("init"):  # --init replaces the recipe's architecture with the saved model's
        raw.pop("model", None)
    return TrainConfig.from_dict(raw)


# ----------------------------------------------------------------------------------------------
# Schedule, data, evaluation


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warmup to the peak, then cosine to min_lr_ratio x peak at the last step."""
    warmup = int(cfg.warmup_frac * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup - 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


class SequenceOrder:
    """Non-overlapping windows of seq_len+1 tokens, shuffled anew each epoch, indexed globally."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int) -> None:
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.chunks = (len(tokens) - 1) // seq_len
        if self.chunks < 1:
            raise CrossLayerError(f"the training split ({len(tokens)} tokens) is shorter than one sequence")
        self._epoch, self._perm = -1, None

    def batch(self, indices: range) -> torch.Tensor:
        rows = []
        for g in indices:
            epoch, pos = divmod(g, self.chunks)
            if epoch != self._epoch:
                self._epoch = epoch
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.chunks)
            start = int(self._perm[pos]) * self.seq_len
            rows.append(np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64))
        return torch.from_numpy(np.stack(rows))  # (B, T+1)


def causal_lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a (B, T+1) batch."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(input_ids=inputs, use_cache=False).logits  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, cfg: TrainConfig, device, autocast, rank: int, world: int) -> dict:
    """Loss over the first eval_tokens of the validation split, in non-overlapping windows."""
    windows = min((len(tokens) - 1) // cfg.seq_len, max(1, cfg.eval_tokens // cfg.seq_len))
    windows -= windows % world  # every rank runs the same number of forwards (FSDP needs it)
    if windows < 1:
        raise CrossLayerError(f"validation split has {len(tokens)} tokens: too few for one window per process")
    mine = list(range(rank * windows // world, (rank + 1) * windows // world))
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(0, len(mine), cfg.micro_batch):
        rows = [np.asarray(tokens[w * cfg.seq_len : w * cfg.seq_len + cfg.seq_len + 1], dtype=np.int64)
                for w in mine[i : i + cfg.micro_batch]]
        batch = torch.from_numpy(np.stack(rows)).to(device)
        with autocast:
            loss = causal_lm_loss(model, batch)
        total += torch.tensor([loss.item() * batch[:, 1:].numel(), batch[:, 1:].numel()], device=device,
                              dtype=torch.float64)
    if world > 1:
        dist.all_reduce(total)
    model.train()
    val_loss = (total[0] / total[1]).item()
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700)), "val_tokens": int(total[1].item())}


# ----------------------------------------------------------------------------------------------
# The run


def _dist_env() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_model_config(cfg: TrainConfig, meta: dict) -> CLAConfig:
    """The model's config from the recipe, sized to the dataset's vocabulary."""
    spec = cfg.model
    explicit_vocab = isinstance(spec, dict) and "vocab_size" in spec
    config = load_config(spec, attn_implementation=cfg.attn_implementation)
    if not explicit_vocab:
        config.vocab_size = -(-meta["vocab_size"] // 64) * 64  # round up: friendlier matmul shapes
    if config.vocab_size < meta["vocab_size"]:
        raise CrossLayerError(f"model vocab_size {config.vocab_size} < the dataset's vocabulary {meta['vocab_size']}")
    config.max_position_embeddings = max(config.max_position_embeddings, cfg.seq_len)
    config.eos_token_id = meta.get("eos_token_id")
    config.bos_token_id = meta.get("bos_token_id", meta.get("eos_token_id"))
    return config


class Trainer:
    """Owns the model, optimizer and data order of one run; `step()` is one optimizer step."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.rank, self.local_rank, self.world = _dist_env()
        self.distributed = self.world > 1
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
        if cfg.device == "auto":
            self.device = torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", self.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        elif self.distributed:  # share the cores instead of oversubscribing them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", self.world))))
        use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and self.device.type == "cuda")
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext())
        self.precision = "bf16-autocast" if use_bf16 else "fp32"

        self.meta = read_meta(cfg.data)
        self.train_tokens = load_tokens(cfg.data, "train")
        self.val_tokens = load_tokens(cfg.data, "val")
        self.total_steps = cfg.total_steps
        global_seqs = cfg.batch_tokens // cfg.seq_len
        if global_seqs % self.world:
            raise CrossLayerError(f"batch of {global_seqs} sequences does not split over {self.world} processes")
        self.per_rank = global_seqs // self.world
        self.micro = min(cfg.micro_batch, self.per_rank)
        if self.per_rank % self.micro:
            raise CrossLayerError(
                f"{self.per_rank} sequences per process is not a multiple of micro_batch {self.micro}"
            )
        self.accum = self.per_rank // self.micro
        self.order = SequenceOrder(self.train_tokens, cfg.seq_len, cfg.seed)

        torch.manual_seed(cfg.seed)
        if cfg.init:
            model = load_init_model(cfg.init, cfg.data, self.meta, cfg.attn_implementation)
            self.model_config = model.config
        else:
            self.model_config = build_model_config(cfg, self.meta)
            model = CLAForCausalLM(self.model_config)
        select_trainable(model, cfg.trainable)
        if cfg.activation_checkpointing:
            model.gradient_checkpointing_enable()  # the name transformers 5.16+ all have
        self.raw_model = model.to(self.device).train()
        self.teacher = None
        if cfg.teacher:
            self.teacher = load_teacher(cfg.teacher, self.model_config, self.device)
        self.model = self._wrap(self.raw_model)
        self.objective = build_objective(cfg.objective, self.teacher, cfg) if cfg.objective != "lm" else None
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused)
        self.step_idx = 0

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.distributed and self.cfg.parallel == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if self.precision != "fp32" else MixedPrecisionPolicy())
            for layer in model.model.layers:
                if isinstance(layer, CLADecoderLayer):
                    fully_shard(layer, mp_policy=mp)
            fully_shard(model, mp_policy=mp)
        elif self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.compile:
            model = torch.compile(model)
        return model

    # -- one optimizer step ------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        cfg, step = self.cfg, self.step_idx
        lr = lr_at(step, cfg, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        first = step * self.per_rank * self.world + self.rank * self.per_rank
        loss_sum = torch.zeros((), device=self.device)
        for k in range(self.accum):
            batch = self.order.batch(range(first + k * self.micro, first + (k + 1) * self.micro)).to(self.device)
            last = k == self.accum - 1
            with self._no_sync(last), self.autocast:
                loss = self.loss(batch)
            (loss / self.accum).backward()
            loss_sum += loss.detach()
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                     if cfg.grad_clip > 0 else torch.zeros(()))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_sum / self.accum
        if self.distributed:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        self.step_idx += 1
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        return {"loss": loss.item(), "lr": lr, "grad_norm": float(grad_norm)}

    def _no_sync(self, last: bool):
        if self.distributed and self.cfg.parallel == "ddp" and not last:
            return self.model.no_sync()
        if self.distributed and self.cfg.parallel == "fsdp":
            self.model.set_requires_gradient_sync(last)
        return nullcontext()

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        """The training objective on a (B, T+1) batch: next-token loss, or the recipe's distillation."""
        if self.objective is None:
            return causal_lm_loss(self.model, batch)
        return self.objective(self.model, batch)

    # -- files -------------------------------------------------------------------------------

    def write_model_files(self, folder: Path) -> None:
        """What makes a folder a model folder beside its weights: config, generation config, tokenizer."""
        self.model_config.save_pretrained(folder)
        source = Path(self.cfg.init) if self.cfg.init else Path(self.cfg.data)
        if not copy_tokenizer_files(source, folder):  # an init model's own, chat template included; else the data's
            copy_tokenizer_files(Path(self.cfg.data), folder)
        if self.cfg.init and (Path(self.cfg.init) / "generation_config.json").is_file():
            shutil.copyfile(Path(self.cfg.init) / "generation_config.json", folder / "generation_config.json")

    def save_checkpoint(self, out: Path, step: int) -> Path:
        """A sharded checkpoint of this step (every process takes part)."""
        return ckpt.save_checkpoint(out, step, self.raw_model, self.optimizer,
                                    {"train_config": self.cfg.to_dict(), "world_size": self.world},
                                    self.write_model_files, keep=self.cfg.keep_checkpoints)

    def resume(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path, self.raw_model, self.optimizer)
        ckpt.set_rng_state(state["rng"])
        self.step_idx = int(state["step"])






def _barrier(trainer: Trainer) -> None:
    if trainer.distributed:
        dist.barrier()


def diverged_marker(out: Path) -> Path:
    """The file a run writes when its loss diverges (so a launcher can tell divergence from a crash)."""
    return Path(out) / "diverged.json"


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; returns the last metrics. Only rank 0 logs and writes files."""
    out = Path(cfg.out)
    rank0 = _dist_env()[0] == 0
    _check_resume_compatible(out, cfg)
    trainer = Trainer(cfg)
    total = trainer.total_steps
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.clean_partial(out)
        (out / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    _barrier(trainer)  # the folder exists (rank 0 made it) before anyone reads or writes in it
    existing = ckpt.list_checkpoints(out)
    if existing:
        trainer.resume(existing[-1])
        _log(rank0, f"resuming {out} from step {trainer.step_idx} ({existing[-1].name}, written by "
                    f"{torch.load(existing[-1] / ckpt.TRAINER, weights_only=True)['world_size']} process(es))")
    if rank0:
        diverged_marker(out).unlink(missing_ok=True)
    metrics_path = out / "metrics.jsonl"
    if rank0:
        _truncate_metrics(metrics_path, trainer.step_idx)
    if trainer.step_idx >= total:
        _log(rank0, f"{out} is already trained to step {total}")
        if (out / "summary.json").exists():
            return json.loads((out / "summary.json").read_text())
        return _last_metrics(metrics_path)
    tb = _tensorboard(out) if cfg.tensorboard and rank0 else None
    n_params = sum(p.numel() for p in trainer.raw_model.parameters())
    _log(rank0, f"training {n_params / 1e6:.2f}M parameters, KV {trainer.model_config.kv_bytes_per_token()} B/token "
                f"(16-bit), {total} steps x {cfg.batch_tokens} tokens, {trainer.world} process(es), "
                f"{trainer.accum} micro-batch(es) of {trainer.micro}, {trainer.device}, {trainer.precision}")
    bar = None
    if rank0 and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=trainer.step_idx, desc="train", unit="step", dynamic_ncols=True)
    last: dict[str, Any] = {}
    t_window, tokens_window = time.perf_counter(), 0
    t_start = t_window
    while trainer.step_idx < total:
        result = trainer.step()
        step = trainer.step_idx
        # a time limit ends the run at this step: validated, checkpointed and saved like the last step
        timed_out = cfg.max_minutes is not None and (time.perf_counter() - t_start) / 60 >= cfg.max_minutes
        if trainer.world > 1 and cfg.max_minutes is not None:  # every process stops at the same step
            flag = torch.tensor([float(timed_out)], device=trainer.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            timed_out = bool(flag.item())
        final = step == total or timed_out
        tokens_window += cfg.batch_tokens
        if not math.isfinite(result["loss"]):
            if bar:
                bar.close()
            good = ckpt.list_checkpoints(out)
            message = (f"loss is {result['loss']} at step {step}: training diverged. The last good checkpoint "
                       f"{'is ' + str(good[-1]) if good else 'does not exist (none was written yet)'}; lower lr "
                       f"(now {cfg.lr}) or raise warmup_frac and start again")
            if rank0:
                diverged_marker(out).write_text(json.dumps({"step": step, "loss": result["loss"], "message": message}))
            raise TrainingDiverged(message)
        now = time.perf_counter()
        record = {"step": step, "tokens": step * cfg.batch_tokens, **result}
        if step % cfg.log_every == 0 or final:
            record["tokens_per_s"] = tokens_window / max(now - t_window, 1e-9)
            t_window, tokens_window = now, 0
            if rank0:
                _append(metrics_path, record)
            if tb:
                for k in ("loss", "lr", "grad_norm", "tokens_per_s"):
                    tb.add_scalar(f"train/{k}", record[k], step)
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{result['loss']:.3f}", **({"tok/s": f"{record['tokens_per_s']:.0f}"}
                                                             if "tokens_per_s" in record else {}))
        if step % cfg.eval_every == 0 or final:
            ev = evaluate(trainer.model, trainer.val_tokens, cfg, trainer.device, trainer.autocast, trainer.rank,
                          trainer.world)
            last = {"step": step, "tokens": step * cfg.batch_tokens, **ev}
            if rank0:
                _append(metrics_path, last)
                if bar:
                    bar.write(f"step {step}: val loss {ev['val_loss']:.4f}, ppl {ev['val_ppl']:.2f}")
            if tb:
                tb.add_scalar("val/loss", ev["val_loss"], step)
                tb.add_scalar("val/ppl", ev["val_ppl"], step)
        if step % cfg.checkpoint_every == 0 or final:
            saved = trainer.save_checkpoint(out, step)
            if final and rank0:  # the run's output: the final weights, consolidated from the shards
                with quiet_transformers():
                    ckpt.load_step_checkpoint_model(saved).save_pretrained(out)
                trainer.write_model_files(out)
            _barrier(trainer)
        if timed_out:
            _log(rank0, f"max_minutes {cfg.max_minutes}: stopped at step {step} of {total}")
            break
    if bar:
        bar.close()
    if tb:
        tb.close()
    summary = {**last, "parameters": n_params, "kv_bytes_per_token": trainer.model_config.kv_bytes_per_token()}
    if rank0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        _log(True, f"done: val loss {last.get('val_loss', float('nan')):.4f}, ppl {last.get('val_ppl', float('nan')):.2f}"
                   f"; model saved to {out}")
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


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from: they will be logged again."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in lines))


def _last_metrics(path: Path) -> dict:
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    evals = [r for r in rows if "val_loss" in r]
    return evals[-1] if evals else {}


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise CrossLayerError("tensorboard: true needs `pip install tensorboard` (or crosslayer[tensorboard])") from None
    return SummaryWriter(str(out / "tensorboard"))


def _log(rank0: bool, message: str) -> None:
    if rank0:
        log.info(message)
