"""SmolLM2-135M to CLA, end to end: the experiment of docs/uptraining-smollm2.md, resumable, step by step.

    python scripts/smollm2_experiment.py setup    --lock /tmp/crosslayer-cpu.lock
    python scripts/smollm2_experiment.py search   --lock ...   # crosslayer convert --plan search, per budget
    python scripts/smollm2_experiment.py matrix   --lock ...   # plans x inits, WikiText-2 ppl before recovery
    python scripts/smollm2_experiment.py recover  --lock ... [--methods full,attention] [--minutes 30]
    python scripts/smollm2_experiment.py frontier --lock ... --producers 26,20,15   # crosslayer frontier, then
        # each count converted with its plan and fit (runs/smollm2/fit-P), the start of a recovery per count
    python scripts/smollm2_experiment.py final    --lock ...   # full evaluations of the best models
    python scripts/smollm2_experiment.py report                # the tables, from runs/smollm2/results.json

Perplexity "ppl" below is the issue's protocol: the first 2,048 tokens of WikiText-2 test (raw) as two
windows of 1,024 tokens, no BOS, 2 x 1,023 tokens scored. Calibration text
is the Gutenberg train books (never WikiText-2 test). Every command run is recorded with its wall
time in results.json; `--lock FILE` holds an exclusive flock around each step (never more than one
conversion, one training run or one evaluation), so other jobs interleave on a shared CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOT = Path("runs/smollm2")
GGUF = "../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_TEST = "../shared/data/wikitext-2/wiki.test.raw"
CALIBRATION = "runs/gutenberg/train/*.txt"
BUDGETS = {"50%": 15, "33%": 10}  # producers of 30 layers
FACTORS = {"50%": 2, "33%": 3}
INITS = ("fit", "mean", "mean-folded", "first")
METHODS = ("full", "kv", "logits", "attention")
FINAL_TOKENS = 16384  # final scoring: tokens of the Gutenberg validation books
WIKI_HEAD = ROOT / "wiki-test-head.txt"  # final scoring: WikiText-2 test up to the first line end after
WIKI_HEAD_CHARS = 60000  # this many characters (scored whole, so bits per byte are defined)
TASK_LIMIT = 10  # final scoring: examples per lm-eval task
CHAT_PROMPTS = ["What is the capital of France?", "Give me three tips for sleeping better.",
                "Write a haiku about the sea.", "Explain what a cache is in one sentence.",
                "If I have 3 apples and eat one, how many are left?"]


# ----------------------------------------------------------------------------------------------
# Book-keeping


def results() -> dict:
    path = REPO / ROOT / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save(data: dict) -> None:
    (REPO / ROOT).mkdir(parents=True, exist_ok=True)
    (REPO / ROOT / "results.json").write_text(json.dumps(data, indent=2))


@contextlib.contextmanager
def locked(path: str | None):
    from crosslayer.sweep import locked as flock

    with flock(path):
        yield


def sh(cmd: list[str], lock: str | None, log: Path | None = None) -> float:
    """Run a command (under the lock); returns its wall seconds and records it."""
    print("$", " ".join(cmd), flush=True)
    with locked(lock):
        t = time.time()
        if log is None:
            subprocess.run(cmd, cwd=REPO, check=True)
        else:
            with open(REPO / log, "w") as f:
                subprocess.run(cmd, cwd=REPO, check=True, stdout=f, stderr=subprocess.STDOUT)
        seconds = time.time() - t
    data = results()
    data.setdefault("commands", []).append({"cmd": " ".join(cmd), "seconds": round(seconds, 1),
                                            "date": time.strftime("%Y-%m-%d %H:%M")})
    save(data)
    return seconds


def wikitext_ids(tokenizer):
    """The issue's protocol: the first 2,048 tokens of WikiText-2 test as two windows of 1,024, no BOS."""
    import torch

    text = (REPO / WIKI_TEST).read_text(encoding="utf-8")[:40000]
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:2048]).view(2, 1024)


def ppl(model, ids) -> float:
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    return math.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item())


# ----------------------------------------------------------------------------------------------
# Steps


def setup(lock: str | None) -> None:
    """Gutenberg split links; the original model's exact CLA1 copy (control, teacher); the training data."""
    if not (REPO / "runs/gutenberg/train").is_dir():
        subprocess.run([sys.executable, "scripts/gutenberg_split.py", "../shared/data/gutenberg", "runs/gutenberg"],
                       cwd=REPO, check=True)
    if not (REPO / ROOT / "cla1" / "config.json").exists():
        sh(["crosslayer", "convert", GGUF, "--out", str(ROOT / "cla1"), "--cla-factor", "1", "--no-progress"], lock)
    if not (REPO / ROOT / "data" / "meta.json").exists():
        sh(["crosslayer", "prepare", "text:runs/gutenberg/train/*.txt", "--val", "runs/gutenberg/valid/*.txt",
            "--max-train-docs", "12", "--tokenizer", f"hf:{ROOT / 'cla1'}", "--out", str(ROOT / "data"),
            "--no-progress"], lock)
    data = results()
    data["machine"] = {"cpu": _cpu(), "python": platform.python_version()}
    save(data)


def _cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    cores = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("CPU(s)")), "?")
    return f"{name}, {cores} CPUs"


def search(lock: str | None, budgets: list[str]) -> None:
    """`crosslayer convert --plan search` per budget, with the defaults (the recipe): timed."""
    for budget in budgets:
        out = ROOT / f"search-{BUDGETS[budget]}"
        if not (REPO / out / "plan.json").exists():
            seconds = sh(["crosslayer", "convert", GGUF, "--out", str(out), "--plan", "search", "--producers",
                          str(BUDGETS[budget]), "--calibration", CALIBRATION, "--no-progress", "--json-out",
                          str(out) + ".json"], lock, log=Path(str(out) + ".log"))
            data = results()
            data.setdefault("search", {})[budget] = {"seconds": round(seconds, 1)}
            save(data)


def plans_for(budget: str) -> dict[str, list[int]]:
    """The plans compared at a budget: uniform, KeepEnds, the issue's hand plan (50%), greedy merging alone
    and the searched plan (50%: `crosslayer convert --plan search`; 33%: that search continued)."""
    from crosslayer.config import kv_sources_for

    f = FACTORS[budget]
    out = {"uniform": kv_sources_for(30, f), "keep_ends": kv_sources_for(30, f, "keep_ends")}
    if budget == "50%":
        searched = json.loads((REPO / ROOT / "search-15" / "plan.json").read_text())
        out["front2"] = [0, 1] + [2 + 2 * (i // 2) for i in range(28)]
        merges = [s for s in searched["search"]["steps"] if s["step"].startswith("merge")]
        out["greedy"] = _sources(merges[-1]["plan"])
        out["searched"] = searched["kv_sources"]
    else:
        out["searched"] = results()["search"][budget]["kv_sources"]
    return out


def _sources(plan: str) -> list[int]:
    """kv_sources of a plan written like `[0] [1-3] [4]`."""
    from crosslayer.config import from_groups

    sizes = []
    for part in plan.split():
        a, _, b = part.strip("[]").partition("-")
        sizes.append(int(b or a) - int(a) + 1)
    return from_groups(sizes)


def matrix(lock: str | None, budgets: list[str]) -> None:
    """The 33% search (the 50% search continued, on the same scoring tokens), then WikiText-2 ppl of every
    plan x init before any training, in one process (the GGUF loaded once)."""
    import torch

    from crosslayer.calibration import Calibration, read_calibration
    from crosslayer.convert import dense_copy, share_kv, sharing_config
    from crosslayer.loading import load_model
    from crosslayer.plan import SEARCH_TOKENS, Reference, search

    data = results()
    rows = data.setdefault("matrix", {})
    with locked(lock):
        t0 = time.time()
        torch.set_num_threads(2)
        source, tokenizer = load_model(REPO / GGUF, "cpu", "fp32")
        dense = dense_copy(source)
        ids = wikitext_ids(tokenizer)
        tokens = read_calibration(str(REPO / CALIBRATION), tokenizer)  # the defaults of crosslayer convert
        if "33%" in budgets and "33%" not in data.get("search", {}):
            t1 = time.time()
            reference = Reference(dense, tokens[: SEARCH_TOKENS // tokens.shape[1]])
            start = json.loads((REPO / ROOT / "search-15" / "plan.json").read_text())["kv_sources"]
            result = search(reference, BUDGETS["33%"], start=start)
            result["wall_seconds"] = round(time.time() - t1, 1)
            data.setdefault("search", {})["33%"] = result
            save(data)
            print(f"search 33%: {result['plan']} cost {result['cost']:.4f} in {result['wall_seconds']} s", flush=True)
            del reference
        todo = [(b, name, init) for b in budgets for name in plans_for(b) for init in INITS
                if f"{b}|{name}|{init}" not in rows]
        if "original|-|-" not in rows:
            rows["original|-|-"] = {"ppl": ppl(source, ids), "producers": 30}
        calibration = Calibration(dense, tokens)
        for budget, name, init in todo:
            kv_sources = plans_for(budget)[name]
            config = sharing_config(dense.config, kv_sources)
            value = ppl(share_kv(dense, config, init, calibration), ids)
            rows[f"{budget}|{name}|{init}"] = {"ppl": value, "kv_sources": kv_sources,
                                               "producers": config.num_producer_layers,
                                               "kv_bytes": config.kv_bytes_per_token()}
            print(f"{budget:4s} {name:10s} {init:12s} producers {config.num_producer_layers:2d}  ppl {value:12.2f}",
                  flush=True)
            save(data)
        data.setdefault("commands", []).append({"cmd": f"python scripts/smollm2_experiment.py matrix ({len(todo)} models)",
                                                "seconds": round(time.time() - t0, 1),
                                                "date": time.strftime("%Y-%m-%d %H:%M")})
        save(data)


def frontier(lock: str | None, producers: list[int]) -> None:
    """`crosslayer frontier` from 30 producers down to the fewest asked for (WikiText-2 test is only scored,
    never searched on), then each count converted with the frontier's plan file and `fit`."""
    out = ROOT / "frontier"
    if not (REPO / out / "frontier.json").exists():
        sh(["crosslayer", "frontier", GGUF, "--out", str(out), "--calibration", CALIBRATION, "--heldout", WIKI_TEST,
            "--floor", str(min(producers)), "--no-progress"], lock, log=Path(str(out) + ".log"))
    for count in producers:
        model = ROOT / f"fit-{count}"
        if not (REPO / model / "config.json").exists():
            sh(["crosslayer", "convert", GGUF, "--out", str(model), "--plan", str(out / "plans" / f"producers-{count}.json"),
                "--kv-init", "fit", "--calibration", CALIBRATION, "--no-progress"], lock)


# checkpoints per recovery run (for the curves): every this many steps, by method (their step times differ)
CHECKPOINT_EVERY = {"full": 2, "control": 2, "kv": 2, "logits": 2, "attention": 4}


def recover(lock: str | None, methods: list[str], init: str, minutes: float, tag: str,
            checkpoint_every: int | None = None, extra: dict[str, str] | None = None) -> None:
    """Each recovery method for `minutes` of training wall time (`max_minutes`; constant learning rate
    after no warm-up, so a cut by time ends no schedule early), from the converted model `init`, and the
    control: the original's CLA1 copy uptrained the same way. WikiText-2 ppl of every checkpoint."""
    data = results()
    runs = data.setdefault("recover", {})
    for method in methods:
        # control: the CLA1 copy uptrained (recover-full); control-M: the CLA1 copy trained by recipe M
        start = ROOT / "cla1" if method.startswith("control") else Path(init)
        name = "full" if method == "control" else method.removeprefix("control-")
        recipe = f"configs/recover-{name}.yaml"
        out = ROOT / f"recover-{tag}-{method}"
        key = f"{tag}|{method}"
        if key in runs and runs[key].get("curve"):
            continue
        sets = {"max_steps": 10000, "max_minutes": minutes, "warmup_frac": 0.0, "min_lr_ratio": 1.0,
                "batch_tokens": 2048, "micro_batch": 4, "checkpoint_every": checkpoint_every or CHECKPOINT_EVERY[name],
                "keep_checkpoints": 50, "eval_tokens": 4096, **(extra or {})}
        cmd = ["crosslayer", "train", recipe, "--init", str(start), "--out", str(out), "--no-progress"]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        sh(cmd, lock, log=Path(str(out) + ".log"))
        runs[key] = {"recipe": recipe, "init": str(start), "settings": sets, "curve": _curve(out, start, lock)}
        data = {**results(), "recover": runs}
        save(data)


def _curve(out: Path, init: Path, lock: str | None) -> list[dict]:
    """(step, tokens, minutes, WikiText-2 ppl) at the start and at each checkpoint; the checkpoints' state is
    removed after (the run folder keeps the final model)."""
    import torch

    from crosslayer.checkpoint import list_checkpoints, load_step_checkpoint_model
    from crosslayer.loading import load_tokenizer
    from crosslayer.modeling import CLAForCausalLM

    rows = [json.loads(ln) for ln in (REPO / out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tokens_per_s" in r]  # one per step (log_every 1): the wall time since the last
    batch = steps[0]["tokens"] // steps[0]["step"]
    tokenizer = load_tokenizer(REPO / out)
    ids = wikitext_ids(tokenizer)
    with locked(lock):
        torch.set_num_threads(2)
        curve = [{"step": 0, "tokens": 0, "minutes": 0.0,
                  "ppl": ppl(CLAForCausalLM.from_pretrained(REPO / init, dtype=torch.float32), ids)}]
        for ckpt in list_checkpoints(REPO / out):
            step = int(ckpt.name.split("_")[1])
            seconds = sum(batch / r["tokens_per_s"] for r in steps if r["step"] <= step)
            curve.append({"step": step, "tokens": step * batch, "minutes": round(seconds / 60, 2),
                          "ppl": ppl(load_step_checkpoint_model(ckpt), ids)})
            print(f"{out.name} step {step}: {curve[-1]}", flush=True)
    for ckpt in list_checkpoints(REPO / out)[:-1]:
        shutil.rmtree(ckpt)
    return curve


def final(lock: str | None, models: dict[str, str], limit: int = TASK_LIMIT, tasks: str | None = None,
          dtype: str = "auto") -> None:
    """WikiText-2 test (its first WIKI_HEAD_CHARS characters, to a line end: ppl and bits per byte) and the
    Gutenberg validation books (the first FINAL_TOKENS tokens); lm-eval tasks (`tasks`, default all eight; the
    first `limit` items of each, in `dtype`) and greedy chat answers, per model, through the crosslayer CLI
    (cut to fit a 2-core CPU's time)."""
    text = (REPO / WIKI_TEST).read_text(encoding="utf-8")
    (REPO / WIKI_HEAD).write_text(text[: text.index("\n", WIKI_HEAD_CHARS) + 1], encoding="utf-8")
    prompts = REPO / ROOT / "chat-prompts.txt"
    prompts.write_text("\n".join(CHAT_PROMPTS) + "\n")
    for name, model in models.items():
        folder = ROOT / "final" / name
        (REPO / folder).mkdir(parents=True, exist_ok=True)
        evals = {
            "wikitext": ["crosslayer", "eval", "ppl", model, "--data", str(WIKI_HEAD), "--context", "1024", "--stride",
                         "1024"],
            "gutenberg": ["crosslayer", "eval", "ppl", model, "--data", "runs/gutenberg/valid/*.txt", "--context",
                          "1024", "--stride", "1024", "--max-tokens", str(FINAL_TOKENS)],
            "tasks": ["crosslayer", "eval", "tasks", model, "--data-dir", "../shared/data", "--limit", str(limit),
                      "--dtype", dtype, *(["--tasks", tasks] if tasks else [])],
            "chat": ["crosslayer", "generate", model, "--chat", "--prompts-file", str(ROOT / "chat-prompts.txt"),
                     "--temperature", "0", "--max-new-tokens", "48"],
        }
        for what, cmd in evals.items():
            out = folder / f"{what}.json"
            if not (REPO / out).exists():
                sh(cmd + ["--no-progress", "--json-out", str(out)] if what != "chat" else cmd + ["--json-out", str(out)],
                   lock, log=folder / f"{what}.log")
        data = results()
        data.setdefault("final", {})[name] = {what: json.loads((REPO / folder / f"{what}.json").read_text())
                                              for what in evals}
        save(data)


def report(plot: str = "docs/uptraining-smollm2/curves.png") -> None:
    """Markdown tables of everything measured, and the recovery curves (docs/uptraining-smollm2/curves.png)."""
    data = results()
    matrix_rows = data.get("matrix", {})
    if matrix_rows:
        print("| budget | plan | producers | KV bytes/token | " + " | ".join(INITS) + " |")
        print("|---|---|---:|---:|" + "---:|" * len(INITS))
        original = matrix_rows.get("original|-|-")
        if original:
            print(f"| 100% | original | 30 | 23,040 | {original['ppl']:.2f} (as loaded) |" + " |" * (len(INITS) - 1))
        keys = sorted({tuple(k.split("|")[:2]) for k in matrix_rows if not k.startswith("original")},
                      key=lambda k: (k[0], ["uniform", "keep_ends", "front2", "greedy", "searched"].index(k[1])))
        for budget, name in keys:
            cells = [matrix_rows.get(f"{budget}|{name}|{init}") for init in INITS]
            first = next(c for c in cells if c)
            print(f"| {budget} | {name} | {first['producers']} | {first['kv_bytes']:,} | "
                  + " | ".join(f"{c['ppl']:,.1f}" if c else "" for c in cells) + " |")
    for budget, s in data.get("search", {}).items():
        path = REPO / ROOT / f"search-{BUDGETS[budget]}" / "plan.json"
        if path.exists():
            plan = json.loads(path.read_text())
            r = plan["search"]
            print(f"\nsearch {budget}: {plan['plan']}; cost {r['cost']:.4f} nats/token KL; {r['evaluations']} plans "
                  f"measured in {r['seconds']:.0f} s ({s['seconds']:.0f} s for the whole `crosslayer convert`)")
    runs = data.get("recover", {})
    if runs:
        print("\n| run | steps | tokens | minutes | WikiText-2 ppl: start -> end |")
        print("|---|---:|---:|---:|---|")
        for key, run in runs.items():
            c = run["curve"]
            print(f"| {key} | {c[-1]['step']} | {c[-1]['tokens']:,} | {c[-1]['minutes']:.1f} | "
                  + " -> ".join(f"{p['ppl']:.2f}" for p in c) + " |")
        _plot(runs, REPO / plot)
    for name, evals in data.get("final", {}).items():
        w, g, tasks = evals["wikitext"], evals["gutenberg"], evals["tasks"]
        scores = {task: round(r["metrics"].get("acc_norm", r["metrics"].get("acc", float("nan"))), 4)
                  for task, r in tasks.get("tasks", {}).items()}
        print(f"\n{name}: WikiText-2 ppl {w['perplexity']:.3f}, {w.get('bits_per_byte', float('nan')):.4f} bits/byte; "
              f"Gutenberg valid ppl {g['perplexity']:.3f}; tasks {json.dumps(scores)}")
        for prompt, text in zip(evals["chat"]["prompts"], evals["chat"]["texts"], strict=True):
            print(f"  {prompt!r} -> {text!r}")


def _plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, run in runs.items():
        c = run["curve"]
        for ax, x in zip(axes, ("minutes", "tokens"), strict=True):
            ax.plot([p[x] for p in c], [p["ppl"] for p in c], marker="o", label=key)
    for ax, x in zip(axes, ("CPU minutes (2 cores, wall clock)", "training tokens"), strict=True):
        ax.set_xlabel(x)
        ax.set_ylabel("WikiText-2 ppl (first 2,048 tokens)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=("setup", "search", "matrix", "frontier", "recover", "final", "report"))
    p.add_argument("--lock", default=None, help="flock this file around each heavy step")
    p.add_argument("--budgets", default="50%,33%", help="comma-separated, of: " + ", ".join(BUDGETS))
    p.add_argument("--methods", default="control," + ",".join(METHODS), help="recovery methods (control: the original)")
    p.add_argument("--init", default=str(ROOT / "search-15"), help="the converted model recovery starts from")
    p.add_argument("--tag", default="50", help="names the recovery runs (recover-TAG-METHOD)")
    p.add_argument("--minutes", type=float, default=30, help="CPU minutes per recovery method")
    p.add_argument("--checkpoint-every", type=int, default=None, help="recover: steps between scored checkpoints")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="recover: a training setting on top of the script's (dtype=bf16, compile=true, data=DIR)")
    p.add_argument("--producers", default="26,20,15", help="frontier: the producer counts converted with their plans")
    p.add_argument("--plot", default="docs/uptraining-smollm2/curves.png", help="report: where the curves go")
    p.add_argument("--task-limit", type=int, default=TASK_LIMIT, help="final: items per lm-eval task")
    p.add_argument("--tasks", default=None, help="final: comma-separated lm-eval tasks (default: all eight)")
    p.add_argument("--eval-dtype", default="auto", help="final: the dtype lm-eval runs the models in")
    p.add_argument("--models", default=f"original={GGUF}",
                   help="final: comma-separated NAME=MODEL (folder or .gguf) to evaluate; auto: the original, --init "
                        "and the recovery run that ended lowest")
    args = p.parse_args()
    budgets = args.budgets.split(",")
    if args.step == "setup":
        setup(args.lock)
    elif args.step == "search":
        search(args.lock, budgets)
    elif args.step == "matrix":
        matrix(args.lock, budgets)
    elif args.step == "recover":
        recover(args.lock, args.methods.split(","), args.init, args.minutes, args.tag, args.checkpoint_every,
                dict(item.split("=", 1) for item in args.set))
    elif args.step == "frontier":
        frontier(args.lock, [int(p) for p in args.producers.split(",")])
    elif args.step == "final":
        models = args.models
        if models == "auto":  # the original, the converted model recovery started from, the best recovered one
            runs = {k: v for k, v in results().get("recover", {}).items() if not k.endswith("|control")}
            best = min(runs, key=lambda k: runs[k]["curve"][-1]["ppl"])
            models = (f"original={GGUF},converted={args.init},"
                      f"recovered={ROOT / ('recover-' + best.replace('|', '-'))}")
        final(args.lock, dict(item.split("=", 1) for item in models.split(",")), args.task_limit, args.tasks,
              args.eval_dtype)
    elif args.step == "report":
        report(args.plot)


if __name__ == "__main__":
    main()
