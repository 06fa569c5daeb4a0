"""The KV / quality frontier of a pretrained model: what every KV budget costs, measured before choosing one.

One plan search (crosslayer.plan) runs from the dense model down to a floor of producers. Greedy merging
removes one group per step, so it passes through every producer count on the way, each budget continuing
the last; the plan of a count is the one the search had there, improved by one pass of boundary moves
(`plan.search`'s step 2, run from that plan: the plan `crosslayer convert --plan search --producers P` would
choose). The floor's plan is the search's own result.

Each plan's model, its K/V maps fitted on all the calibration tokens (convert.share_kv `fit`, as `crosslayer
convert --plan FILE` fits them), is scored twice: its KL to the original model on the calibration tokens the
search scored plans on (the search's own measurement), and its perplexity on held-out text the user names.
Held-out perplexity is the docs' WikiText-2 protocol: the text's first `heldout_tokens` tokens (no BOS) as
disjoint windows of `heldout_window`, each scored alone on every position but its first (crosslayer.eval's
strided_nll of one window), with the weights in fp32 as loaded.

`frontier()` writes OUT, atomically (a staging folder beside it renamed at the end): frontier.json (every row
and how it was measured), frontier.md (the table), frontier.png (KV fraction against held-out perplexity)
and plans/producers-P.json per budget, each a plan file `crosslayer convert --plan FILE` reads.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .calibration import CALIBRATION_SEQ_LEN, CALIBRATION_TOKENS, Calibration, read_calibration, resolve_compute_dtype
from .config import describe
from .convert import dense_copy, load_source, share_kv, sharing_config, target_config
from .device import device_name, dtype_name, pick_device, sync
from .errors import CrossLayerError
from .eval.perplexity import read_text, strided_nll
from .loading import load_tokenizer, read_source_config, split_model_spec
from .plan import SEARCH_TOKENS, Reference, search, search_reference
from .plot import pareto_front

log = logging.getLogger(__name__)

HELDOUT_TOKENS = 2048  # held-out tokens scored (the docs' WikiText-2 protocol: the first 2,048 test tokens)
HELDOUT_WINDOW = 1024  # in disjoint windows of this many tokens
CHARS_PER_TOKEN = 16  # held-out text tokenised: this many characters per token needed first (all of it if short)


def floor_for_fraction(min_kv_fraction: float, num_layers: int) -> int:
    """The fewest producers whose KV bytes are at least `min_kv_fraction` x the dense model's."""
    if not 0 < min_kv_fraction <= 1:
        raise CrossLayerError(f"min_kv_fraction must be in (0, 1], a fraction of the original KV bytes; got "
                              f"{min_kv_fraction}")
    return max(1, math.ceil(min_kv_fraction * num_layers - 1e-9))


# ----------------------------------------------------------------------------------------------
# Held-out perplexity


def heldout_windows(data: str, tokenizer, tokens: int = HELDOUT_TOKENS, window: int = HELDOUT_WINDOW) -> torch.Tensor:
    """(tokens // window, window) token ids: the first `tokens` tokens of the text `data` (a file, glob or
    hf:NAME[:CONFIG[:SPLIT]], as `crosslayer eval ppl` reads it), without special tokens, in disjoint windows."""
    if window < 2 or tokens < window or tokens % window:
        raise CrossLayerError(f"held-out tokens must be a multiple of a window of at least 2 tokens; got {tokens} "
                              f"tokens in windows of {window}")
    text, _ = read_text(data)
    head = text[: tokens * CHARS_PER_TOKEN]
    ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    if len(ids) < tokens and len(head) < len(text):  # many characters per token: all of the text
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < tokens:
        raise CrossLayerError(f"held-out text {data} gives {len(ids):,} tokens; {tokens:,} are scored (give more text "
                              "or fewer held-out tokens)")
    return torch.tensor(ids[:tokens], dtype=torch.long).view(-1, window)  # (n, window)


def heldout_perplexity(model, windows: torch.Tensor) -> dict[str, Any]:
    """`model`'s perplexity on disjoint windows (n, W) of token ids, each scored alone on every position but its
    first: {nll (nats, summed), tokens_scored, perplexity}."""
    nll, count = 0.0, 0
    for window in windows:
        total, scored = strided_nll(model, window, len(window), len(window), batch_size=1, first=1, progress=False)
        nll, count = nll + total, count + scored
    return {"nll": nll, "tokens_scored": count, "perplexity": math.exp(nll / count)}


# ----------------------------------------------------------------------------------------------
# One plan per producer count


def frontier_plans(reference: Reference, floor: int, refine: bool = True, progress: bool = False) -> dict[str, Any]:
    """The plan of every producer count from the dense model's down to `floor`, from one search (module
    docstring): {plans: {producers: {kv_sources, merge_kl, kl}}, search: the search's result, evaluations}.
    `merge_kl` is the cost of the greedy merge that reached the count (what `--max-kl` compares), `kl` the
    plan's cost after the boundary moves (`refine`; without it, every count keeps its merged plan)."""
    n = reference.config.num_hidden_layers
    result = search(reference, floor, refine_rounds=1 if refine else 0, progress=progress)
    plans = {n: {"kv_sources": list(range(n)), "merge_kl": 0.0, "kl": 0.0}}
    for step in result["steps"]:
        if step["step"].startswith("merge"):
            plans[step["producers"]] = {"kv_sources": step["kv_sources"], "merge_kl": step["cost"], "kl": step["cost"]}
    plans[floor].update(kv_sources=result["kv_sources"], kl=round(result["cost"], 5))
    evaluations = result["evaluations"]
    for producers in range(n - 1, floor, -1) if refine else ():
        moved = search(reference, producers, start=plans[producers]["kv_sources"], refine_rounds=1)
        plans[producers].update(kv_sources=moved["kv_sources"], kl=round(moved["cost"], 5))
        evaluations += moved["evaluations"]
        log.info(f"[frontier] {producers} producers: {moved['plan']}: cost {moved['cost']:.4f}")
    return {"plans": plans, "search": result, "evaluations": evaluations}


# ----------------------------------------------------------------------------------------------
# The frontier, end to end


def frontier(model: str | Path, calibration: str, heldout: str, out: str | Path, floor: int | None = None,
             min_kv_fraction: float | None = None, gguf_file: str | None = None, compute_dtype: str = "auto",
             calibration_tokens: int | None = None, calibration_seq_len: int | None = None,
             search_tokens: int = SEARCH_TOKENS, heldout_tokens: int = HELDOUT_TOKENS,
             heldout_window: int = HELDOUT_WINDOW, refine: bool = True, progress: bool = False,
             device: str | torch.device = "cpu") -> dict[str, Any]:
    """Measure every KV budget of `model` (a folder, hub id or GGUF file of a Llama / Mistral / Qwen2 or dense
    crosslayer model) from the dense model down to `floor` producers (or the fewest keeping `min_kv_fraction` of
    the KV bytes), and write OUT (module docstring). `calibration` (text files / glob / prepared folder, as for
    `crosslayer convert`) is what the search and the K/V fits read; `heldout` the text every budget is scored on.
    The model, its calibration, the search and the scoring run on `device` (auto: a GPU where there is one); the
    model is read whole, in fp32. Returns frontier.json's record. Every check runs before the weights are read;
    `out` must not exist."""
    t0 = time.perf_counter()
    device = pick_device(device)
    out = Path(out)
    if out.exists():
        raise CrossLayerError(f"{out} already exists; choose a new folder (nothing is overwritten)")
    if (floor is None) == (min_kv_fraction is None):
        raise CrossLayerError("frontier: give exactly one of floor (the fewest K/V-producing layers to measure) or "
                              "min_kv_fraction (the smallest fraction of the original KV bytes, e.g. 0.5)")
    location, gguf_file = split_model_spec(model, gguf_file)
    raw = read_source_config(location, gguf_file)
    dense_config = target_config(raw)
    n = dense_config.num_hidden_layers
    floor = floor if floor is not None else floor_for_fraction(min_kv_fraction, n)
    if not 1 <= floor <= n:
        raise CrossLayerError(f"floor must be between 1 and the model's {n} layers; got {floor}")
    if heldout_window > dense_config.max_position_embeddings:
        raise CrossLayerError(f"held-out windows of {heldout_window} tokens are longer than the model's "
                              f"{dense_config.max_position_embeddings} positions")
    work_dtype = resolve_compute_dtype(compute_dtype, device)
    tokenizer = load_tokenizer(location, gguf_file)
    seq_len = min(calibration_seq_len or CALIBRATION_SEQ_LEN, dense_config.max_position_embeddings)
    tokens = read_calibration(calibration, tokenizer, calibration_tokens or CALIBRATION_TOKENS, seq_len)
    windows = heldout_windows(heldout, tokenizer, heldout_tokens, heldout_window)
    if int(windows.max()) >= dense_config.vocab_size:
        raise CrossLayerError(f"the tokenizer gives id {int(windows.max())}, past the model's vocabulary of "
                              f"{dense_config.vocab_size}: the tokenizer and the model do not belong together")

    dense = dense_copy(load_source(location, gguf_file, torch.float32), raw).to(device)
    sync(device)
    t_calibration = time.perf_counter()
    activations = Calibration(dense, tokens, progress=progress, compute_dtype=work_dtype)
    t_search = time.perf_counter()
    reference = search_reference(activations, search_tokens, progress)
    found = frontier_plans(reference, floor, refine, progress)
    search_tokens_used = reference.num_tokens
    del reference
    t_score = time.perf_counter()
    dense_bytes = dense.config.kv_bytes_per_token()
    rows = []
    for producers, plan in sorted(found["plans"].items(), reverse=True):
        config = sharing_config(dense.config, plan["kv_sources"])
        scored = heldout_perplexity(dense if producers == n else share_kv(dense, config, "fit", activations), windows)
        rows.append({"producers": producers, "kv_fraction": config.kv_bytes_per_token() / dense_bytes,
                     "kv_bytes_per_token": config.kv_bytes_per_token(), "plan": describe(plan["kv_sources"]),
                     "kv_sources": plan["kv_sources"], "calibration_kl": plan["kl"], "merge_kl": plan["merge_kl"],
                     "heldout_ppl": scored["perplexity"], "heldout_nll": scored["nll"]})
        log.info(f"[frontier] {producers} producers: held-out ppl {scored['perplexity']:.2f}")
    sync(device)
    front = set(pareto_front([(r["kv_fraction"], r["heldout_ppl"]) for r in rows]))
    for i, row in enumerate(rows):
        row["pareto"] = i in front
    t_end = time.perf_counter()

    record = {
        "source": str(model), "layers": n, "floor": floor, "kv_bytes_per_token_dense": dense_bytes,
        "calibration": {"data": calibration, "tokens": tokens.numel(), "seq_len": tokens.shape[1],
                        "compute_dtype": dtype_name(work_dtype), "search_tokens": search_tokens_used},
        "heldout": {"data": heldout, "tokens": windows.numel(), "windows": windows.shape[0], "window": windows.shape[1],
                    "tokens_scored": scored["tokens_scored"], "dtype": "fp32"},
        "plans": "one search from the dense model down to the floor; each count's merged plan"
                 + (" after one pass of boundary moves" if refine else ""),
        "search": {"evaluations": found["evaluations"], "steps": found["search"]["steps"]},
        "rows": rows,
        "seconds": {"load": round(t_calibration - t0, 1), "calibration": round(t_search - t_calibration, 1),
                    "search": round(t_score - t_search, 1), "scoring": round(t_end - t_score, 1),
                    "total": round(t_end - t0, 1)},
        "device": device_name(device),
    }
    _write_atomically(out, record)
    record["out"] = str(out)
    return record


# ----------------------------------------------------------------------------------------------
# OUT: json, table, plot, plan files


def markdown_table(record: dict[str, Any]) -> str:
    """frontier.md: what was measured, then one row per budget (✓: on the Pareto frontier, no budget with fewer
    KV bytes scores better)."""
    c, h = record["calibration"], record["heldout"]
    lines = [f"# KV frontier of {record['source']}", "",
             f"{record['layers']} layers down to {record['floor']} producers. Calibration: {c['tokens']:,} tokens of "
             f"{c['data']} ({c['compute_dtype']}); plans scored on the first {c['search_tokens']:,}. Held-out: the first "
             f"{h['tokens']:,} tokens of {h['data']} as {h['windows']} x {h['window']:,} ({h['tokens_scored']:,} scored, "
             f"{h['dtype']}). Plans: {record['plans']}. {record['seconds']['total']:.0f} s on {record['device']}.", "",
             "| producers | KV fraction | KV bytes/token | calibration KL | held-out ppl | Pareto | plan |",
             "|---:|---:|---:|---:|---:|:---:|---|"]
    for r in record["rows"]:
        lines.append(f"| {r['producers']} | {r['kv_fraction']:.3f} | {r['kv_bytes_per_token']:,} | "
                     f"{r['calibration_kl']:.4f} | {r['heldout_ppl']:.2f} | {'✓' if r['pareto'] else ''} | {r['plan']} |")
    lines += ["", f"`crosslayer convert {record['source']} --plan plans/producers-P.json --calibration ...` (the same "
                  "calibration) builds a row's model; `--plan search --max-kl X` stops before the first merge whose KL "
                  "(`merge_kl` in frontier.json) is over X."]
    return "\n".join(lines) + "\n"


def plot_frontier(record: dict[str, Any], path: str | Path) -> None:
    """KV fraction against held-out perplexity (log y), each budget labelled with its producers, the dense
    model's perplexity as a line, the Pareto frontier joined."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    rows = record["rows"]
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
    ax.scatter([r["kv_fraction"] for r in rows], [r["heldout_ppl"] for r in rows], color="tab:red", zorder=3,
               label="searched plan (fitted K/V)")
    for r in rows:
        ax.annotate(str(r["producers"]), (r["kv_fraction"], r["heldout_ppl"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["kv_fraction"])
    ax.plot([r["kv_fraction"] for r in front], [r["heldout_ppl"] for r in front], "--", color="gray", zorder=2,
            label="Pareto frontier")
    dense = rows[0]
    ax.axhline(dense["heldout_ppl"], color="tab:blue", linewidth=0.8, label=f"original: {dense['heldout_ppl']:.2f}")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda y, _: f"{y:g}")  # 200, not 2 x 10^2
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("KV bytes per token, fraction of the original's")
    ax.set_ylabel(f"held-out perplexity ({record['heldout']['tokens']:,} tokens)")
    ax.set_title(f"KV frontier of {Path(record['source']).name}, before recovery (labels: producers)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plan_file(record: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """plans/producers-P.json: a plan `crosslayer convert --plan FILE` reads (its kv_sources), with what it scored."""
    keys = ("kv_sources", "plan", "producers", "kv_bytes_per_token", "kv_fraction", "calibration_kl", "heldout_ppl")
    return {**{k: row[k] for k in keys}, "layers": record["layers"], "source": record["source"],
            "chosen_by": f"crosslayer frontier (calibration {record['calibration']['data']}, held-out "
                         f"{record['heldout']['data']})"}


def _write_atomically(out: Path, record: dict[str, Any]) -> None:
    """OUT's files written into a staging folder beside it (`.OUT.*.partial`), renamed to OUT at the end; removed
    on any error (a full disk, an unwritable folder: one CrossLayerError)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as e:
        raise CrossLayerError(f"cannot write {out}: {e.strerror or e}") from None
    try:
        (tmp / "plans").mkdir()
        for row in record["rows"]:
            (tmp / "plans" / f"producers-{row['producers']}.json").write_text(json.dumps(plan_file(record, row),
                                                                                       indent=2) + "\n")
        (tmp / "frontier.json").write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "frontier.md").write_text(markdown_table(record), encoding="utf-8")
        plot_frontier(record, tmp / "frontier.png")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes a private folder; OUT looks like any folder
        os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CrossLayerError(f"cannot write {out}: {e.strerror or e}; nothing was written there") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
