"""`crosslayer plot`: the paper's Figure 1 for any sweep results, LR curves, and a Table-1-like table.

Input: `results.jsonl` or `results.csv` written by `crosslayer sweep` (or the folder holding them).
Each config is shown at its best learning rate (lowest mean perplexity over seeds); its error bar
spans the lowest to the highest seed at that rate. The Pareto frontier is the set of configs no
other config beats on both KV bytes per token and perplexity.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

from .errors import CrossLayerError

METRICS = ("final_val_ppl", "best_val_ppl", "wikitext_ppl")


# ----------------------------------------------------------------------------------------------
# Reading and aggregating


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a results.jsonl / results.csv (or of the one inside a sweep folder)."""
    path = Path(path)
    if path.is_dir():
        for name in ("results.jsonl", "results.csv"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise CrossLayerError(f"{path} holds no results.jsonl or results.csv (made by `crosslayer sweep`)")
    if not path.exists():
        raise CrossLayerError(f"results file not found: {path}")
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = [{k: _parse_cell(v) for k, v in row.items()} for row in csv.DictReader(f)]
    else:
        try:
            rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
        except json.JSONDecodeError as e:
            raise CrossLayerError(f"{path} is not JSON lines: {e}") from None
    if not rows:
        raise CrossLayerError(f"{path} holds no runs yet")
    for i, r in enumerate(rows):
        missing = {"config", "kv_bytes_per_token", "lr"} - set(r)
        if missing:
            raise CrossLayerError(f"{path} row {i + 1} lacks {', '.join(sorted(missing))}: not a sweep results file")
    return rows


def _parse_cell(value: str) -> Any:
    if value == "":
        return None
    if value in ("True", "False"):
        return value == "True"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def aggregate(rows: list[dict[str, Any]], metric: str = "final_val_ppl") -> list[dict[str, Any]]:
    """One entry per config: every LR's mean/std/min/max over seeds, and the best LR's figures.

    A diverged or unfinished seed (non-finite metric) makes its LR's mean infinite, so an LR that
    diverges for any seed is never chosen as best."""
    if metric not in METRICS:
        raise CrossLayerError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    configs: dict[str, dict[str, Any]] = {}
    for r in rows:
        c = configs.setdefault(r["config"], {"config": r["config"], "kv_bytes_per_token": r["kv_bytes_per_token"],
                                             "parameters": r.get("parameters"), "cla": bool(r.get("cla")),
                                             "tokens": r.get("tokens"), "by_lr": {}})
        c["by_lr"].setdefault(float(r["lr"]), []).append(r)
    out = []
    for c in configs.values():
        curve = []
        for lr, runs in sorted(c["by_lr"].items()):
            values = [r.get(metric) for r in runs]
            ok = [v for v in values if _finite(v)]
            mean = statistics.fmean(ok) if ok and len(ok) == len(values) else math.inf
            curve.append({"lr": lr, "mean": mean, "std": statistics.stdev(ok) if len(ok) > 1 else 0.0,
                          "min": min(ok) if ok else math.inf, "max": max(ok) if ok else math.inf,
                          "n": len(values), "seeds": sorted(r.get("seed") for r in runs), "runs": runs})
        scores = lr_scores([r for point in curve for r in point["runs"]], metric)
        for point in curve:
            point["sweep"] = scores[point["lr"]]  # the mean over the seeds every LR has: what the LR is chosen on
        best = curve[[p["lr"] for p in curve].index(best_lr_of(scores) or curve[0]["lr"])]
        extra = {}
        for key in ("wikitext_ppl", "wikitext_bits_per_byte"):
            vals = [r.get(key) for r in best["runs"] if _finite(r.get(key))]
            extra[key] = statistics.fmean(vals) if vals else None
        out.append({k: v for k, v in c.items() if k != "by_lr"} | {
            "metric": metric, "curve": curve, "best_lr": best["lr"], "mean": best["mean"], "std": best["std"],
            "min": best["min"], "max": best["max"], "n": best["n"], "seeds": best["seeds"], **extra})
    flags = pareto_front([(p["kv_bytes_per_token"], p["mean"]) for p in out])
    for i, p in enumerate(out):
        p["pareto"] = i in flags
    return out


def lr_scores(runs: list[dict[str, Any]], metric: str = "final_val_ppl") -> dict[float, float]:
    """Per learning rate, the mean `metric` over the seeds every LR has (the LR sweep's seeds).

    The paper tuned on one run per LR; seeds added later at the chosen LR then only sharpen its mean
    and cannot move the choice. A diverged or missing seed makes its LR's score infinite."""
    by_lr: dict[float, dict[Any, Any]] = {}
    for r in runs:
        by_lr.setdefault(float(r["lr"]), {})[r.get("seed")] = r.get(metric)
    common = set.intersection(*(set(seeds) for seeds in by_lr.values())) if by_lr else set()
    scores = {}
    for lr, seeds in by_lr.items():
        vals = [v for s, v in seeds.items() if s in common] or list(seeds.values())
        scores[lr] = statistics.fmean(vals) if all(_finite(v) for v in vals) else math.inf
    return scores


def best_lr_of(scores: dict[float, float]) -> float | None:
    """The learning rate with the lowest finite score; None when every LR diverged."""
    finite = {lr: s for lr, s in scores.items() if math.isfinite(s)}
    return min(finite, key=finite.get) if finite else None


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (lower-or-equal x and y, one strictly), by x.

    x is a cost (KV bytes), y a loss (perplexity); both are better low. Non-finite y never counts."""
    front = []
    for i, (x, y) in enumerate(points):
        if not math.isfinite(y):
            continue
        dominated = any(math.isfinite(y2) and x2 <= x and y2 <= y and (x2 < x or y2 < y)
                        for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], points[i][1]))


# ----------------------------------------------------------------------------------------------
# Figures and the table


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(points: list[dict[str, Any]], path: str | Path, title: str = "", ylabel: str = "validation perplexity"):
    """KV bytes per token (log x) against perplexity; CLA models as circles, the others as squares."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
    shown = [p for p in points if _finite(p["mean"])]
    for cla, marker, color, label in ((False, "s", "tab:blue", "no CLA"), (True, "o", "tab:red", "CLA")):
        group = [p for p in shown if p["cla"] == cla]
        if not group:
            continue
        xs = [p["kv_bytes_per_token"] for p in group]
        ys = [p["mean"] for p in group]
        err = [[p["mean"] - p.get("min", p["mean"]) for p in group], [p.get("max", p["mean"]) - p["mean"] for p in group]]
        ax.errorbar(xs, ys, yerr=err, fmt=marker, color=color, label=label, capsize=3, markersize=7, zorder=3)
        for p in group:
            ax.annotate(p["config"], (p["kv_bytes_per_token"], p["mean"]), textcoords="offset points",
                        xytext=(5, 4), fontsize=7)
    front = [p for p in shown if p.get("pareto")]
    front.sort(key=lambda p: p["kv_bytes_per_token"])
    if front:
        ax.plot([p["kv_bytes_per_token"] for p in front], [p["mean"] for p in front], "--", color="gray",
                marker="o", markersize=14, markerfacecolor="none", zorder=2, label="Pareto frontier")
    ax.set_xscale("log", base=2)
    ticks = sorted({p["kv_bytes_per_token"] for p in shown})
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks], rotation=45 if len(ticks) > 5 else 0)
    ax.minorticks_off()
    ax.set_xlabel("KV bytes per token (16-bit), log scale")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "Perplexity vs KV cache size (best LR per config; bars: lowest to highest seed)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_lr_curves(points: list[dict[str, Any]], path: str | Path, ylabel: str = "validation perplexity") -> None:
    """Perplexity against learning rate (log x), one line per config tried at more than one LR.

    The line joins the means over the seeds every LR has (what the best LR is chosen on); small dots
    are every run, so seeds added at the best LR show as a spread there without bending the line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
    for p in points:
        curve = [c for c in p["curve"] if _finite(c.get("sweep", c["mean"]))]
        if len(p["curve"]) < 2 or not curve:
            continue
        (line,) = ax.plot([c["lr"] for c in curve], [c.get("sweep", c["mean"]) for c in curve],
                          marker="o" if p["cla"] else "s", label=p["config"])
        runs = [(c["lr"], r.get(p["metric"])) for c in p["curve"] for r in c["runs"] if _finite(r.get(p["metric"]))]
        ax.scatter([x for x, _ in runs], [y for _, y in runs], s=12, color=line.get_color(), alpha=0.6, zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate, log scale")
    ax.set_ylabel(ylabel)
    ax.set_title("Learning-rate sweeps: lines join the seeds every LR has, dots are single runs", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown_table(points: list[dict[str, Any]]) -> str:
    """The paper's Table 1 layout, with our seeds, best LR, spread and the frontier marked."""
    has_wiki = any(p.get("wikitext_ppl") is not None for p in points)
    head = "| config | KV bytes/token | params | best LR | val ppl (mean ± std) | seeds |"
    rule = "|---|---:|---:|---:|---:|---:|"
    if has_wiki:
        head += " WikiText ppl | bits/byte |"
        rule += "---:|---:|"
    lines = [head + " Pareto |", rule + ":---:|"]
    for p in sorted(points, key=lambda p: (-p["kv_bytes_per_token"], p["config"])):
        params = f"{p['parameters'] / 1e6:.2f}M" if _finite(p.get("parameters")) else "?"
        ppl = f"{p['mean']:.2f} ± {p['std']:.2f}" if p["n"] > 1 else f"{p['mean']:.2f}"
        if not _finite(p["mean"]):
            ppl = "diverged"
        line = f"| {p['config']} | {p['kv_bytes_per_token']:,} | {params} | {p['best_lr']:g} | {ppl} | {p['n']} |"
        if has_wiki:
            wiki, bpb = p.get("wikitext_ppl"), p.get("wikitext_bits_per_byte")
            line += f" {wiki:.2f} |" if wiki is not None else " |"
            line += f" {bpb:.4f} |" if bpb is not None else " |"
        lines.append(line + (" ✓ |" if p["pareto"] else " |"))
    return "\n".join(lines)


def plot_results(results: str | Path, out: str | Path | None = None, metric: str = "final_val_ppl") -> dict[str, Path]:
    """Write pareto.png, lr_curves.png and table.md for a results file; returns their paths."""
    rows = read_results(results)
    points = aggregate(rows, metric)
    results = Path(results)
    out = Path(out) if out else (results if results.is_dir() else results.parent)
    out.mkdir(parents=True, exist_ok=True)
    label = {"final_val_ppl": "validation perplexity (final)", "best_val_ppl": "validation perplexity (best)",
             "wikitext_ppl": "WikiText-2 perplexity"}[metric]
    paths = {"pareto": out / "pareto.png", "lr_curves": out / "lr_curves.png", "table": out / "table.md"}
    plot_pareto(points, paths["pareto"], ylabel=label)
    plot_lr_curves(points, paths["lr_curves"], ylabel=label)
    paths["table"].write_text(f"Metric: {label}; {len(rows)} runs.\n\n" + markdown_table(points) + "\n")
    return paths
