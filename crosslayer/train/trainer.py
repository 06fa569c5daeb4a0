"""One optimizer step, and what it needs: this process's device and precision, the model, the data order.

The model is written for one device; the loss's output layer (`crosslayer.losses.HeadLoss`, which
computes vocabulary-wide losses a chunk of rows at a time), data parallelism (DDP or FSDP2
`fully_shard`), mixed precision and `torch.compile` are applied here, from outside, in that order.
A distillation teacher (frozen, forward only) is cast to bf16 when the run trains in bf16, sharded
like the student under FSDP2 (`ShardedTeacher`; whole on every process under DDP), then compiled.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import checkpoint as ckpt
from ..config import CLAConfig, load_config
from ..data import load_tokens, read_meta
from ..device import compute_dtype, pick_device
from ..errors import CrossLayerError
from ..loading import copy_tokenizer_files, load_init_model, load_teacher
from ..losses import HeadLoss
from ..modeling import CLADecoderLayer, CLAForCausalLM
from ..recover import OfflineLogitDistillation, select_trainable
from ..teacher_cache import TopKStore, model_fingerprint
from .config import TrainConfig
from .objective import training_objective

logger = logging.getLogger(__name__)
# objectives that call the model's layers one by one instead of its forward (crosslayer.recover)
LAYERWISE_OBJECTIVES = ("attention",)


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

    def windows(self, indices: range) -> list[int]:
        """The windows (window w starts at token w * seq_len) of global sequence numbers `indices`."""
        found = []
        for g in indices:
            epoch, pos = divmod(g, self.chunks)
            if epoch != self._epoch:
                self._epoch = epoch
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.chunks)
            found.append(int(self._perm[pos]))
        return found

    def batch(self, indices: range) -> torch.Tensor:
        rows = [np.asarray(self.tokens[w * self.seq_len : (w + 1) * self.seq_len + 1], dtype=np.int64)
                for w in self.windows(indices)]
        return torch.from_numpy(np.stack(rows))  # (B, T+1)


def _dist_env() -> tuple[int, int, int]:
    """(rank, local rank, world size) of this process, as torchrun sets them (0, 0, 1 without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


def _process_device(name: str, local_rank: int) -> torch.device:
    """`pick_device`'s device, where a bare `cuda` (auto included) means this process's own GPU, LOCAL_RANK."""
    device = pick_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


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


class ShardedTeacher(nn.Module):
    """A frozen teacher sharded by FSDP2 as the student is (`shard`: `fully_shard` per decoder layer, then the
    rest, the embeddings, final norm and output layer, as the root), forward only.

    To the objectives it is the teacher itself: they call `model(input_ids=...)` (its base model; hooks on
    `model.layers[i]` see the real layers) and read `lm_head.weight` after that call. Each call of `model`
    runs through this module's forward, FSDP's root, so every process takes part in it (a collective: each
    process runs the teacher as often as the others); the layers are gathered one at a time and the root's
    parameters for the call, after which the output layer's weight stays whole, a copy, until `release()`.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self._head: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor, **kwargs):
        out = self.lm.model(input_ids=input_ids, **kwargs)
        self._head = self.lm.lm_head.weight.detach().clone()  # whole now; resharded (freed) when this returns
        return out

    @classmethod
    def shard(cls, lm: nn.Module) -> ShardedTeacher:
        from torch.distributed.fsdp import fully_shard

        teacher = cls(lm).eval()
        for layer in lm.model.layers:
            fully_shard(layer)
        fully_shard(teacher, reshard_after_forward=True)
        return teacher

    @property
    def model(self) -> _TeacherBase:
        return _TeacherBase(self)

    @property
    def lm_head(self) -> SimpleNamespace:
        if self._head is None:
            raise RuntimeError("a sharded teacher's output weight is whole only from a call of its model to release()")
        return SimpleNamespace(weight=self._head)

    def release(self) -> None:
        """Free the output layer's weight kept whole since the last call."""
        self._head = None


class _TeacherBase:
    """A sharded teacher's base model as the objectives use it: called, it runs through the FSDP root."""

    def __init__(self, teacher: ShardedTeacher) -> None:
        self._teacher = teacher

    def __call__(self, input_ids: torch.Tensor, **kwargs):
        try:
            return self._teacher(input_ids, **kwargs)
        finally:  # FSDP may keep a root's parameters gathered after forward, for a backward a teacher never has
            self._teacher.reshard()

    def __getattr__(self, name: str):
        return getattr(self._teacher.lm.model, name)


class Trainer:
    """Owns the model, optimizer and data order of one run; `step()` is one optimizer step."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.rank, self.local_rank, self.world = _dist_env()
        self.distributed = self.world > 1
        self.device = _process_device(cfg.device, self.local_rank)
        # an objective that runs the model's layers one by one, outside its forward, bypasses a DDP or FSDP wrapper
        self.layerwise = cfg.objective in LAYERWISE_OBJECTIVES
        if self.distributed and self.layerwise and cfg.parallel == "fsdp":
            raise CrossLayerError(f"objective {cfg.objective} runs the model's layers one by one, outside FSDP's forward, "
                                  "which gathers their weights: use parallel: ddp with it")
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        elif self.distributed:  # share the cores instead of oversubscribing them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", self.world))))
        use_bf16 = compute_dtype(cfg.dtype, self.device) == torch.bfloat16
        auto_cpu_bf16 = use_bf16 and cfg.dtype == "auto" and self.device.type == "cpu"
        self.autocast: AbstractContextManager = (torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16
                                                 else nullcontext())
        self.precision = "bf16-autocast" if use_bf16 else "fp32"
        self._load_data()
        if auto_cpu_bf16 and self.rank == 0:  # said once the inputs are known good (a bad one gets one line)
            logger.info("dtype auto: bf16 autocast (this CPU has bf16 matrix units: AMX or AVX512-BF16)")
        self._build_model()
        self.objective = training_objective(cfg, self.teacher)  # loss(model, batch), what step() minimises
        if cfg.teacher_topk:
            self.objective = OfflineLogitDistillation(self._teacher_store(), self.teacher, self.autocast)
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused)
        self.step_idx = 0

    def _load_data(self) -> None:
        """The token splits, and how each global batch splits into processes and micro-batches."""
        cfg = self.cfg
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

    def _build_model(self) -> None:
        """The model (new, or an init model's weights) on this device, wrapped; the teacher, if any."""
        cfg = self.cfg
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
        self.teacher = load_teacher(cfg.teacher, self.model_config, self.device) if cfg.teacher else None
        # as loaded (before a cast, shard or compile renames or rounds anything): names the offline teacher's store
        self.teacher_fingerprint = model_fingerprint(self.teacher) if self.teacher is not None else None
        if self.teacher is not None:
            self.teacher = self._wrap_teacher(self.teacher)
        self.model = self._wrap(HeadLoss(self.raw_model))

    def _wrap_teacher(self, teacher: nn.Module) -> nn.Module:
        """The frozen teacher in this run's precision, sharded under FSDP2, compiled if the run compiles."""
        if self.precision != "fp32":
            teacher.to(torch.bfloat16)  # frozen: no fp32 master copy needed, and no cast per forward
        base = teacher
        if self.distributed and self.cfg.parallel == "fsdp":
            teacher = ShardedTeacher.shard(teacher)  # as the student: no process holds all of it between uses
        if self.cfg.compile:
            base.model = torch.compile(base.model)  # its forward's elementwise work fused too
        return teacher

    def _teacher_store(self) -> TopKStore:
        """The offline teacher's top-k store of this run's training tokens, beside the data unless named; one
        per teacher, data, seq_len, k and precision. Rank 0 creates it, the other processes open it after."""
        cfg = self.cfg
        name = f"{self.teacher_fingerprint}-s{cfg.seq_len}-k{cfg.teacher_topk}-{self.precision}"
        folder = cfg.teacher_cache or Path(cfg.data) / "teacher-topk" / name
        identity = {"teacher": self.teacher_fingerprint, "data": self.meta.get("fingerprint"), "precision": self.precision}

        def open_store() -> TopKStore:
            return TopKStore(folder, self.train_tokens, cfg.seq_len, cfg.teacher_topk, identity)
        if self.distributed and self.rank != 0:
            dist.barrier()  # rank 0 has created it
            return open_store()
        store = open_store()
        if self.distributed:
            dist.barrier()
        return store

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.distributed and self.cfg.parallel == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if self.precision != "fp32" else MixedPrecisionPolicy())
            for layer in model.lm.model.layers:
                if isinstance(layer, CLADecoderLayer):
                    fully_shard(layer, mp_policy=mp)
            fully_shard(model, mp_policy=mp)
        elif self.distributed and self.layerwise:
            pass  # DDP would not see its forward: step() averages the gradients itself
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
        if isinstance(self.objective, OfflineLogitDistillation) and isinstance(self.teacher, ShardedTeacher):
            self._fill_store_together(range(first, first + self.per_rank))
        loss_sum = torch.zeros((), device=self.device)
        for k in range(self.accum):
            sequences = range(first + k * self.micro, first + (k + 1) * self.micro)
            batch = self.order.batch(sequences).to(self.device)
            if isinstance(self.objective, OfflineLogitDistillation):
                self.objective.windows = self.order.windows(sequences)
            last = k == self.accum - 1
            with self._no_sync(last), self.autocast:
                loss = self.objective(self.model, batch)
            (loss / self.accum).backward()
            loss_sum += loss.detach()
            if isinstance(self.teacher, ShardedTeacher):
                self.teacher.release()
        if self.distributed and self.layerwise:
            for p in self.raw_model.parameters():
                if p.grad is not None:  # the same parameters on every process
                    dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
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

    def _fill_store_together(self, sequences: range, windows_per_forward: int = 4) -> None:
        """The offline teacher's store holds this step's windows of every process after this. A sharded
        teacher's forward is a collective, so each process computes the windows it lacks of its own
        sequences in as many forwards as the process with the most to compute; a process out of windows,
        or finding a group computed meanwhile by another, runs the teacher on one token instead."""
        store = self.objective.store
        todo = sorted({w for w in self.order.windows(sequences) if not store.done[w]})
        groups = [todo[i:i + windows_per_forward] for i in range(0, len(todo), windows_per_forward)]
        forwards = torch.tensor([len(groups)], device=self.device)
        dist.all_reduce(forwards, op=dist.ReduceOp.MAX)
        for i in range(int(forwards.item())):
            computed = (store.fill(groups[i], self.teacher, self.device, self.autocast, batch=windows_per_forward)
                        if i < len(groups) else 0)
            if not computed:
                with torch.no_grad(), self.autocast:
                    self.teacher.model(torch.zeros((1, 1), dtype=torch.long, device=self.device), use_cache=False)
            self.teacher.release()

    def _no_sync(self, last: bool) -> AbstractContextManager:
        if self.distributed and self.cfg.parallel == "ddp" and not last and not self.layerwise:
            return self.model.no_sync()
        if self.distributed and self.cfg.parallel == "fsdp":
            self.model.set_requires_gradient_sync(last)
        return nullcontext()

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
