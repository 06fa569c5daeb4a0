"""Where a run reports: metrics.jsonl, tensorboard and the progress bar, written by rank 0 only."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..errors import CrossLayerError

METRICS = "metrics.jsonl"
TRAIN_SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s")


class RunLog:
    """The lines of metrics.jsonl, their tensorboard scalars and the bar of one launch; silent off rank 0.

    Train lines carry the throughput since the previous line (`tokens_per_s`)."""

    def __init__(self, out: Path, rank0: bool, tensorboard: bool, progress: bool, step: int, total: int) -> None:
        self.path, self.rank0 = out / METRICS, rank0
        self.tb = _tensorboard(out) if tensorboard and rank0 else None
        self.bar = None
        if rank0 and progress:
            self.bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)
        self._since, self._tokens = time.perf_counter(), 0

    def train_step(self, record: dict[str, Any], tokens: int, write: bool) -> None:
        """One optimizer step's `record` (step, tokens, loss, lr, grad_norm) after `tokens` more; a line if `write`."""
        self._tokens += tokens
        now = time.perf_counter()
        if write:
            record["tokens_per_s"] = self._tokens / max(now - self._since, 1e-9)
            self._since, self._tokens = now, 0
            if self.rank0:
                _append(self.path, record)
            if self.tb:
                for k in TRAIN_SCALARS:
                    self.tb.add_scalar(f"train/{k}", record[k], record["step"])
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", **({"tok/s": f"{record['tokens_per_s']:.0f}"}
                                                                   if "tokens_per_s" in record else {}))

    def validation(self, record: dict[str, Any]) -> None:
        """A validation pass's `record` (step, tokens, val_loss, val_ppl, val_tokens)."""
        step = record["step"]
        if self.rank0:
            _append(self.path, record)
            if self.bar:
                self.bar.write(f"step {step}: val loss {record['val_loss']:.4f}, ppl {record['val_ppl']:.2f}")
        if self.tb:
            self.tb.add_scalar("val/loss", record["val_loss"], step)
            self.tb.add_scalar("val/ppl", record["val_ppl"], step)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.tb:
            self.tb.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def truncate_metrics(out: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from: they will be logged again."""
    path = out / METRICS
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in lines))


def last_validation(out: Path) -> dict:
    """The last validation line of metrics.jsonl ({} if there is none)."""
    path = out / METRICS
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    evals = [r for r in rows if "val_loss" in r]
    return evals[-1] if evals else {}


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise CrossLayerError("tensorboard: true needs `pip install tensorboard` (or crosslayer[tensorboard])") from None
    return SummaryWriter(str(out / "tensorboard"))
