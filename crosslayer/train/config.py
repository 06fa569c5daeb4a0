"""A training recipe: the keys of one run, read from YAML plus overrides and checked once, up front."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..device import DTYPE_CHOICES
from ..errors import CrossLayerError
from ..recipe import apply_sets, read_yaml, settings_from
from ..recover import OBJECTIVES, TRAINABLE

# the compute dtypes a run may train in; not fp16: its narrow range would need a loss scaler (bf16 needs none)
TRAIN_DTYPES = tuple(name for name in DTYPE_CHOICES if name != "fp16")


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
    dtype: str = "auto"  # auto: bf16 autocast on cuda and on CPUs with bf16 matrix units, else fp32; or fp32 / bf16
    compile: bool = False  # torch.compile the model (and a teacher's base model)
    activation_checkpointing: bool = False  # recompute each layer's forward in backward: less memory, more compute
    attn_implementation: str = "sdpa"
    tensorboard: bool = False  # also log to out/tensorboard
    progress: bool = True  # progress bar on stderr
    # recovering a converted model (crosslayer.recover): what trains, and against what
    trainable: str = "all"  # all, or a subset such as kv (what conversion changed); see recover.TRAINABLE
    objective: str = "lm"  # lm: next-token loss; a distillation objective needs `teacher`; see recover.OBJECTIVES
    teacher: str | None = None  # the original model (folder, hub id, .gguf) that distillation imitates
    distill_temperature: float = 1.0  # softmax temperature of logit distillation
    teacher_topk: int | None = None  # objective logits offline: the teacher's top-k per token, computed once, stored
    teacher_cache: str | None = None  # where that store lives (default: DATA/teacher-topk/FINGERPRINT-sSEQ-kK)

    # keys that must match when a run folder is resumed (the others may change between launches)
    RESUME_KEYS = ("model", "data", "init", "seq_len", "batch_tokens", "max_steps", "tokens", "lr", "min_lr_ratio",
                   "warmup_frac", "weight_decay", "beta1", "beta2", "adam_eps", "grad_clip", "seed", "trainable",
                   "objective", "teacher", "distill_temperature", "teacher_topk")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        cfg = settings_from(cls, raw, "training")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise one CrossLayerError naming the first key that is missing, out of range or inconsistent."""
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
        if self.dtype not in TRAIN_DTYPES:
            raise CrossLayerError(f"dtype must be one of {', '.join(TRAIN_DTYPES)}; got {self.dtype!r}")
        if self.keep_checkpoints < 1:
            raise CrossLayerError("keep_checkpoints must be >= 1")
        if self.trainable not in TRAINABLE:
            raise CrossLayerError(f"trainable must be one of {', '.join(TRAINABLE)}; got {self.trainable!r}")
        if self.objective not in OBJECTIVES:
            raise CrossLayerError(f"objective must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}")
        if (self.objective != "lm") != (self.teacher is not None):
            raise CrossLayerError(f"objective {self.objective!r} " + ("needs a teacher (the original model)"
                                  if self.teacher is None else "takes no teacher; use a distillation objective"))
        if not self.distill_temperature > 0:
            raise CrossLayerError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        if self.teacher_topk is not None:
            if self.objective != "logits" or self.teacher_topk < 1:
                raise CrossLayerError(f"teacher_topk (got {self.teacher_topk}) is a positive k for objective logits")
            if self.distill_temperature != 1.0:
                raise CrossLayerError("teacher_topk stores the teacher's probabilities at temperature 1: set "
                                      "distill_temperature: 1.0 or distil online (no teacher_topk)")

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
