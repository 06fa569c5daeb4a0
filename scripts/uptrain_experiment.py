"""The uptraining experiment of docs/uptraining.md, end to end and resumable.

    python scripts/uptrain_experiment.py --lock /tmp/crosslayer-cpu.lock

For each seed s: pretrain an MQA model (tiny-H32-MQA) on N tokens; convert it to CLA2 with
`--kv-init mean` and `--kv-init first` (and with `--cla-factor 1`, a check that must change
nothing) and measure the converted models before any training; uptrain both, and the unconverted
MQA model as a control, on 0.2N more tokens, once per uptraining seed; train tiny-H32-MQA-CLA2 from
scratch on 1.2N tokens. Every perplexity is the trainer's validation loss over the same
`eval_tokens` of the validation split. Runs go under runs/uptrain/ (finished ones are reused); the
table is printed and written to runs/uptrain/results.json.

`--lock FILE` holds an exclusive flock on FILE around each pretraining run and around each group of
short steps (conversions and evaluations of one seed; the three continuations of one seed pair),
never around the whole script, for a machine shared with other jobs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from crosslayer.sweep import locked

REPO = Path(__file__).resolve().parents[1]
DATA = "runs/data/gutenberg"
ROOT = Path("runs/uptrain")
PRETRAIN = "configs/tiny-gutenberg.yaml"
UPTRAIN = "configs/uptrain-tiny-gutenberg.yaml"
COMMON = ["--set", "batch_tokens=8192", "--set", "micro_batch=32", "--set", "seq_len=256", "--set", "eval_every=100000",
          "--set", "checkpoint_every=100000", "--set", "eval_tokens=131072", "--set", "progress=false"]
COMMANDS: list[str] = []  # every command run, for the report
BUSY = [0.0]  # seconds spent running (not waiting for the lock)
ORIGINAL = "MQA (original, N tokens)"


def sh(cmd: list[str], lock: str | None) -> None:
    COMMANDS.append(" ".join(cmd))
    print("$", " ".join(cmd), flush=True)
    with locked(lock):
        t = time.time()
        subprocess.run(cmd, cwd=REPO, check=True)
        BUSY[0] += time.time() - t


def train(recipe: str, out: Path, sets: list[str], lock: str | None, init: Path | None = None) -> dict:
    if not (REPO / out / "summary.json").exists():
        cmd = ["crosslayer", "train", recipe, "--out", str(out), *COMMON, *sets]
        sh(cmd + (["--init", str(init)] if init else []), lock)
    return json.loads((REPO / out / "summary.json").read_text())


def convert(src: Path, out: Path, kv_init: str, lock: str | None, factor: int = 2) -> None:
    if not (REPO / out / "config.json").exists():
        sh(["crosslayer", "convert", str(src), "--out", str(out), "--cla-factor", str(factor), "--kv-init", kv_init], lock)


def val_ppl(folder: Path, lock: str | None) -> float:
    """The trainer's validation perplexity (same windows, same token count) of a saved model; cached."""
    cache_path = REPO / ROOT / "evals.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    if str(folder) not in cache:
        cache[str(folder)] = _val_ppl(folder, lock)
        cache_path.write_text(json.dumps(cache, indent=2))
    return cache[str(folder)]


def _val_ppl(folder: Path, lock: str | None) -> float:
    import torch

    from crosslayer.data import load_tokens
    from crosslayer.modeling import CLAForCausalLM
    from crosslayer.train import TrainConfig, evaluate

    cfg = TrainConfig(data=DATA, out="-", init=str(folder), max_steps=1, seq_len=256, micro_batch=32,
                      eval_tokens=131072)
    with locked(lock):
        t = time.time()
        model = CLAForCausalLM.from_pretrained(REPO / folder, dtype=torch.float32)
        ev = evaluate(model, load_tokens(REPO / DATA, "val"), cfg, torch.device("cpu"), contextlib.nullcontext(), 0, 1)
        BUSY[0] += time.time() - t
    return ev["val_ppl"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="pretraining steps N (x 8192 tokens)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="pretraining (and from-scratch) seeds")
    p.add_argument("--up-seeds", type=int, nargs="+", default=[100, 200],
                   help="uptraining data-order seeds (+ the pretraining seed): each continuation runs once per value")
    p.add_argument("--lock", default=None, help="flock this file around each heavy step")
    args = p.parse_args()
    up_steps, scratch_steps = round(0.2 * args.steps), args.steps + round(0.2 * args.steps)
    t0 = time.time()
    # row -> pretraining seed -> the values (one per uptraining seed for continued runs)
    rows: dict[str, dict[int, list[float]]] = {}

    def record(name: str, seed: int, ppl: float) -> None:
        rows.setdefault(name, {}).setdefault(seed, []).append(ppl)

    for s in args.seeds:  # the from-scratch runs first: they need nothing else
        record(ORIGINAL, s, train(PRETRAIN, ROOT / f"mqa-s{s}", ["--set", "model=tiny-H32-MQA", "--set", f"seed={s}",
                                                                 "--set", f"max_steps={args.steps}"], args.lock)["val_ppl"])
        record("CLA2 from scratch (1.2N tokens)", s,
               train(PRETRAIN, ROOT / f"cla2-scratch-s{s}", ["--set", "model=tiny-H32-MQA-CLA2", "--set", f"seed={s}",
                                                              "--set", f"max_steps={scratch_steps}"], args.lock)["val_ppl"])
    for s in args.seeds:
        mqa = ROOT / f"mqa-s{s}"
        with locked(args.lock):  # short steps share one turn at the lock
            convert(mqa, ROOT / f"cla1-s{s}", "mean", None, factor=1)  # a check: must equal the original
            record("MQA, convert --cla-factor 1 (check)", s, val_ppl(ROOT / f"cla1-s{s}", None))
            for kv_init in ("mean", "first"):
                conv = ROOT / f"cla2-{kv_init}-s{s}"
                convert(mqa, conv, kv_init, None)
                record(f"CLA2 {kv_init}, converted (0 tokens)", s, val_ppl(conv, None))
        for u in args.up_seeds:  # a new data-order seed: mostly sequences the pretraining did not see
            up = ["--set", f"max_steps={up_steps}", "--set", f"seed={u + s}"]
            with locked(args.lock):  # three 0.2N runs: about one pretraining run's time
                control = train(UPTRAIN, ROOT / f"mqa-s{s}-up{u}", up, None, init=mqa)
                record("MQA continued (+0.2N, control)", s, control["val_ppl"])
                for kv_init in ("mean", "first"):
                    record(f"CLA2 {kv_init}, uptrained (+0.2N)", s,
                           train(UPTRAIN, ROOT / f"cla2-{kv_init}-s{s}-up{u}", up, None,
                                 init=ROOT / f"cla2-{kv_init}-s{s}")["val_ppl"])

    base = {s: rows[ORIGINAL][s][0] for s in args.seeds}
    print(f"\nN = {args.steps} x 8192 = {args.steps * 8192:,} tokens; seeds {args.seeds}, uptraining seeds "
          f"{args.up_seeds}; {time.time() - t0:.0f} s wall, {BUSY[0]:.0f} s running (the rest: waiting for the lock)\n")
    seeds = " | ".join(f"seed {s}" for s in args.seeds)
    print(f"| model | {seeds} | mean | vs original (mean of per-seed %) |")
    print("|---|" + "---:|" * (len(args.seeds) + 2))
    for name, by_seed in rows.items():
        means = {s: math.fsum(by_seed[s]) / len(by_seed[s]) for s in args.seeds}
        rel = [100 * (means[s] / base[s] - 1) for s in args.seeds]
        cells = []
        for s, r in zip(args.seeds, rel, strict=True):
            each = f" [{' / '.join(f'{v:.1f}' for v in by_seed[s])}]" if len(by_seed[s]) > 1 else ""
            cells.append(f"{means[s]:.2f}{each} ({r:+.1f}%)")
        print(f"| {name} | {' | '.join(cells)} | {math.fsum(means.values()) / len(means):.2f} | "
              f"{math.fsum(rel) / len(rel):+.1f}% |")
    out = REPO / ROOT / "results.json"
    out.write_text(json.dumps({"steps": args.steps, "tokens": args.steps * 8192, "seeds": args.seeds,
                               "up_seeds": args.up_seeds, "val_ppl": rows, "commands": COMMANDS,
                               "wall_s": time.time() - t0, "busy_s": BUSY[0]}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    sys.exit(main())
