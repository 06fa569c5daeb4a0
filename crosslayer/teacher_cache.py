"""An offline teacher: a teacher model's top-k next-token log-probabilities, computed once per training
window and kept on disk beside the prepared data, so every later step, epoch and run that meets the
same window distils from the file instead of running the teacher again.

The trainer reads the training split in windows of seq_len + 1 tokens starting at multiples of seq_len
(`SequenceOrder`); the teacher sees window w's first seq_len tokens, exactly as an online teacher
would, and for each position the store keeps the k most likely next tokens (int32 ids), their
log-probabilities and the log of the mass of all other tokens (float32), which is what the top-k
distillation loss needs (`crosslayer.losses.TeacherTopK`). Windows are filled on demand; a window is
marked done only after its rows are flushed, so an interrupted run leaves nothing half-written that
is later trusted. The folder is named by the teacher's fingerprint, seq_len and k, so a different
teacher or shape gets its own.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import CrossLayerError
from .losses import CHUNK_ROWS, TeacherTopK, final_hidden

FORMAT = "crosslayer-teacher-topk-1"


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's parameters (names, shapes and float64 sums): tells one teacher from another."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}{tuple(p.shape)}{p.double().sum().item():.12e}{p.double().abs().sum().item():.12e}".encode())
    return h.hexdigest()[:16]


class TopKStore:
    """The top-k of one teacher over the windows of one token stream (module docstring)."""

    def __init__(self, folder: str | Path, tokens: np.ndarray, seq_len: int, k: int, identity: dict | str) -> None:
        """`identity`: what must match for the store to be reused (the teacher's fingerprint, and the data's and
        the precision's where known); a string is the teacher's fingerprint alone."""
        self.folder, self.tokens, self.seq_len, self.k = Path(folder), tokens, seq_len, k
        self.windows = (len(tokens) - 1) // seq_len
        identity = {"teacher": identity} if isinstance(identity, str) else dict(identity)
        meta = {"format": FORMAT, **identity, "seq_len": seq_len, "k": k, "windows": self.windows,
                "tokens": len(tokens)}
        self.folder.mkdir(parents=True, exist_ok=True)
        meta_path = self.folder / "meta.json"
        if meta_path.is_file():
            found = json.loads(meta_path.read_text())
            if found != meta:
                raise CrossLayerError(f"{meta_path} is of another teacher or data ({found}); expected {meta}: "
                                      "remove the folder or name another teacher_cache")
            mode = "r+"
        else:
            mode = "w+"
        W, T = self.windows, seq_len
        self.ids = np.lib.format.open_memmap(self.folder / "ids.npy", mode, np.int32, (W, T, k))
        self.logprobs = np.lib.format.open_memmap(self.folder / "logprobs.npy", mode, np.float32, (W, T, k))
        self.log_rest = np.lib.format.open_memmap(self.folder / "log_rest.npy", mode, np.float32, (W, T))
        self.done = np.lib.format.open_memmap(self.folder / "done.npy", mode, np.bool_, (W,))
        if mode == "w+":
            self.done.flush()
            tmp = meta_path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tmp, meta_path)  # meta.json last and whole: a store without it is made anew

    @torch.no_grad()
    def fill(self, windows: list[int], teacher: nn.Module, device: torch.device,
             autocast: AbstractContextManager | None = None, batch: int = 4) -> int:
        """Compute the windows not yet stored; returns how many were computed."""
        todo = sorted({w for w in windows if not self.done[w]})
        T = self.seq_len
        for first in range(0, len(todo), batch):
            group = todo[first:first + batch]
            inputs = torch.from_numpy(np.stack([np.asarray(self.tokens[w * T:w * T + T], dtype=np.int64)
                                                for w in group])).to(device)  # (b, T)
            with autocast or nullcontext():
                hidden = final_hidden(teacher, inputs).flatten(0, 1)  # (b*T, d)
                weight = teacher.lm_head.weight
                dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else weight.dtype
            ids, logprobs, log_rest = self._top_k(hidden, weight.to(dtype), dtype)
            self.ids[group] = ids.view(len(group), T, self.k).cpu().numpy()
            self.logprobs[group] = logprobs.view(len(group), T, self.k).cpu().numpy()
            self.log_rest[group] = log_rest.view(len(group), T).cpu().numpy()
            for array in (self.ids, self.logprobs, self.log_rest):
                array.flush()
            self.done[group] = True
            self.done.flush()
        return len(todo)

    def _top_k(self, hidden: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype):
        out_ids, out_lp, out_rest = [], [], []
        for start in range(0, len(hidden), CHUNK_ROWS):
            z = (hidden[start:start + CHUNK_ROWS].to(dtype) @ weight.T).float()  # (n, V)
            lse = torch.logsumexp(z, dim=-1, keepdim=True)
            top = z.topk(self.k, dim=-1)
            out_ids.append(top.indices.to(torch.int32))
            out_lp.append(top.values - lse)
            out_rest.append(torch.logsumexp(z.scatter(1, top.indices, float("-inf")), dim=-1) - lse.squeeze(1))
        return torch.cat(out_ids), torch.cat(out_lp), torch.cat(out_rest)

    def target(self, windows: list[int], device: torch.device) -> TeacherTopK:
        """The stored top-k of `windows` (each filled), as a loss target over their (len(windows) * seq_len) rows."""
        missing = [w for w in windows if not self.done[w]]
        if missing:
            raise CrossLayerError(f"windows {missing[:5]} of {self.folder} are not computed yet (fill them first)")

        def rows(array: np.ndarray, *tail: int) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array[windows])).view(-1, *tail).to(device)

        return TeacherTopK(rows(self.ids, self.k).long(), rows(self.logprobs, self.k), rows(self.log_rest))
