"""The quickstart: the paper's three-way comparison, offline, in minutes on a CPU.

Prepares the built-in `stdlib` corpus (this Python's standard library), trains a tiny MQA model,
its CLA2 twin (half the KV cache) and the MQA model with half the head dimension (the other way to
halve the cache), on the same tokens, and prints KV bytes per token, parameters and validation
perplexity side by side, and ends with the paper's Figure 1 for these three: KV bytes per token
against validation perplexity with the Pareto frontier (out/pareto.png).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .config import CLAConfig
from .data import prepare
from .plot import pareto_front, plot_pareto
from .train import TrainConfig, train

MODELS = ("tiny-H32-MQA", "tiny-H32-MQA-CLA2", "tiny-H16-MQA")


def quickstart(out: str | Path = "runs/quickstart", steps: int = 120, seq_len: int = 128,
               batch_tokens: int = 8192, lr: float = 3e-3, progress: bool = True) -> list[dict]:
    """Run the comparison; returns one result row per model (also written to out/results.json)."""
    out = Path(out)
    data = out / "data"
    prepare("stdlib", data, tokenizer="bpe:4096", progress=progress)
    rows = []
    for name in MODELS:
        cfg = TrainConfig(model=name, data=str(data), out=str(out / name), seq_len=seq_len,
                          batch_tokens=batch_tokens, micro_batch=min(32, batch_tokens // seq_len), max_steps=steps,
                          lr=lr, eval_every=steps, eval_tokens=32768, log_every=10, checkpoint_every=steps,
                          progress=progress)
        start = time.perf_counter()
        summary = train(cfg)
        rows.append({"model": name, "kv_bytes_per_token": summary["kv_bytes_per_token"],
                     "parameters": summary["parameters"], "val_loss": summary.get("val_loss"),
                     "val_ppl": summary.get("val_ppl"), "tokens": steps * batch_tokens,
                     "seconds": round(time.perf_counter() - start, 1)})
    front = pareto_front([(r["kv_bytes_per_token"], r["val_ppl"]) for r in rows])
    points = []
    for i, r in enumerate(rows):
        r["pareto"] = i in front
        config = CLAConfig.from_preset(r["model"])
        points.append({"config": r["model"], "kv_bytes_per_token": r["kv_bytes_per_token"], "mean": r["val_ppl"],
                       "cla": config.num_producer_layers < config.num_hidden_layers, "pareto": r["pareto"]})
    plot_pareto(points, out / "pareto.png", title=f"quickstart: {rows[0]['tokens']:,} tokens each, one seed")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    return rows
