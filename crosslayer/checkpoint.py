"""Training checkpoints: atomic writes, the last k kept, exact resume.

A checkpoint is a folder `checkpoints/step_00000100/` holding
  model.safetensors  full (unsharded) weights, so N processes can resume on M
  optimizer.pt       full optimizer state keyed by parameter name (torch.load(weights_only=True))
  state.pt           step, RNG states of every generator, the run's config (weights_only too)
It is written into `.tmp-step_*`, every file fsynced, then renamed into place: a kill at any moment
leaves either the old set of checkpoints or the new one, never a half-written `step_*` folder.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import CrossLayerError

_STEP_RE = re.compile(r"^step_(\d{8})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


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
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _STEP_RE.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_RE.match(p.name)[1]))


def save_checkpoint(
    run_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    extra: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write one checkpoint atomically and delete all but the newest `keep`."""
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:08d}"
    tmp = folder / f".tmp-step_{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    save_file(tensors, tmp / "model.safetensors")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save({"step": step, "rng": rng_state(), **extra}, tmp / "state.pt")
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. after resume): replace the older copy
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(folder)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model tensors, optimizer state, extra state incl. step and rng) of one checkpoint folder."""
    path = Path(path)
    try:
        model_state = load_file(path / "model.safetensors")
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    except (OSError, RuntimeError) as e:
        raise CrossLayerError(f"checkpoint {path} cannot be read ({e}); delete it to resume from an older one") from None
    return model_state, optimizer_state, state


def clean_partial(run_dir: Path) -> None:
    """Remove temporaries a killed checkpoint write left behind."""
    folder = Path(run_dir) / "checkpoints"
    if folder.is_dir():
        for p in folder.glob(".tmp-step_*"):
            shutil.rmtree(p, ignore_errors=True)
