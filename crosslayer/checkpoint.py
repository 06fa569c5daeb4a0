"""Training checkpoints: sharded, atomic, resumable on any number of processes, loadable as a model.

A checkpoint is a folder `checkpoints/step_00000100/` holding
  state/             model and optimizer state through torch.distributed.checkpoint: every process
                     writes its own shard (FSDP2) or its share of the replicated tensors (DDP), so no
                     process ever gathers the full state; on load it is resharded to however many
                     processes resume the run
  trainer.pt         step, RNG states, the run's settings, the world size (torch.load weights_only)
  config.json        the model's config, and the dataset's tokenizer files: the folder is a model
                     folder that `crosslayer eval` / `generate` load directly (`load_step_checkpoint_model`)
It is written into `.tmp-step_*`, every file fsynced, then renamed into place: a kill at any moment
leaves either the old set of checkpoints or the new one, never a half-written `step_*` folder.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .config import load_config
from .errors import CrossLayerError
from .modeling import CLAForCausalLM

_STEP_RE = re.compile(r"^step_(\d{8})$")
STATE = "state"  # the torch.distributed.checkpoint folder inside a step folder
TRAINER = "trainer.pt"


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(Path(root) / name, "rb+") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it assumes one process whenever no process group exists: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


# ----------------------------------------------------------------------------------------------
# RNG state


def rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from, as tensors and plain types."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[2] or 0],
        "python_version": random.getstate()[0],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((state["python_version"], tuple(py[:-1]), py[-1] or None))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Saving and resuming


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _STEP_RE.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_RE.match(p.name)[1]))


def _train_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Model and optimizer state keyed by parameter name; DTensor shards under FSDP2, nothing gathered."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    extra: dict[str, Any], model_files: callable, keep: int = 2) -> Path:
    """Write one checkpoint (a collective: every process calls it) and delete all but the newest `keep`.

    `model_files(folder)` writes the config and tokenizer files (rank 0 only)."""
    import torch.distributed.checkpoint as dcp

    folder = Path(run_dir) / "checkpoints"
    final = folder / f"step_{step:08d}"
    tmp = folder / f".tmp-step_{step:08d}"
    if _rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    with _single_process_quiet():
        dcp.save(_train_state(model, optimizer), checkpoint_id=str(tmp / STATE), no_dist=not _distributed())
    if _rank() == 0:
        model_files(tmp)
        torch.save({"step": step, "rng": rng_state(), **extra}, tmp / TRAINER)
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step (e.g. after resume): replace the older copy
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(folder)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load a checkpoint into `model` and `optimizer` (resharded to this run's processes); returns
    the trainer state (step, rng, settings)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    try:
        trainer = torch.load(path / TRAINER, weights_only=True, map_location="cpu")
        state = _train_state(model, optimizer)
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(path / STATE), no_dist=not _distributed())
    except (OSError, RuntimeError, ValueError) as e:
        raise CrossLayerError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}); "
                              "delete it to resume from an older one") from None
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    return trainer


def clean_partial(run_dir: Path) -> None:
    """Remove temporaries a killed checkpoint write left behind."""
    folder = Path(run_dir) / "checkpoints"
    if folder.is_dir():
        for p in folder.glob(".tmp-step_*"):
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# A step checkpoint as a model


def is_step_checkpoint(folder: Path) -> bool:
    return (Path(folder) / STATE / ".metadata").is_file() and (Path(folder) / "config.json").is_file()


def load_step_checkpoint_model(folder: Path, dtype: torch.dtype = torch.float32):
    """The model a step checkpoint holds, consolidated from its shards in this one process."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    config = load_config(folder)
    with torch.device("meta"):
        model = CLAForCausalLM(config)
    model = model.to_empty(device="cpu")
    state = {"model": model.state_dict()}
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(folder / STATE), no_dist=True)  # this process alone, whatever wrote it
    except (OSError, RuntimeError, ValueError) as e:
        raise CrossLayerError(f"checkpoint {folder} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]})") \
            from None
    model.load_state_dict(state["model"])
    if config.tie_word_embeddings:
        model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # buffers, not weights: rebuilt on the CPU
    return model.to(dtype).eval()
