"""Pretraining and uptraining: one code path for one CPU process and `torchrun` on many GPUs.

  config.py     TrainConfig: the recipe's keys, read from YAML and checked once; defaults follow the paper
  objective.py  what a run minimises (next-token loss, or a distillation from crosslayer.recover) and
                the validation loss
  trainer.py    Trainer: this process's device and precision, the model wrapped from outside (DDP or
                FSDP2, then compile), a distillation teacher (sharded like the model under FSDP2, whole
                under DDP), the data order, and `step()`, one optimizer step
  runlog.py     metrics.jsonl, tensorboard and the progress bar
  loop.py       train(): open or resume a run folder, step, validate, checkpoint, stop on divergence or
                the time limit, save the model (summary.json, written last, marks it whole: a run killed
                while saving it and resumed writes it from its last checkpoint)

Data order is a pure function of (seed, step): sequence g of the run is chunk
`permutation(epoch)[g % chunks]` of the token stream. Resuming needs only the step, and N
processes see exactly the sequences one process would.
"""

from .config import TRAIN_DTYPES, TrainConfig, load_train_config
from .loop import diverged_marker, train
from .objective import causal_lm_loss, evaluate, training_objective
from .trainer import SequenceOrder, Trainer, build_model_config, lr_at, param_groups

__all__ = ["TRAIN_DTYPES", "SequenceOrder", "TrainConfig", "Trainer", "build_model_config", "causal_lm_loss",
           "diverged_marker", "evaluate", "load_train_config", "lr_at", "param_groups", "train", "training_objective"]
