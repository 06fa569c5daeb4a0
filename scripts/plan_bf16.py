"""Plan search in fp32 vs bf16 on a real model: wall time of the search, the plan chosen and its cost.

    flock /tmp/crosslayer-cpu.lock python scripts/plan_bf16.py \
        --out docs/benchmarks/plan-bf16-smollm2-$(date +%F).json

Runs `crosslayer convert SRC --plan search --producers P --compute-dtype D` for each P and D, one after
another, and keeps each run's search (seconds, kv_sources, cost) in the JSON file, which is written after
every run: run the command again to resume where it stopped. Afterwards every chosen plan is scored once
more in fp32 (plan.Reference on the same search tokens), so plans found in bf16 are compared with the
fp32 ones on one scale. Prints a table, and one JSON line last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

GGUF = "/work/shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
CALIBRATION = "runs/gutenberg/train/*.txt"


def convert_command(src: str, out: str, producers: int, dtype: str, calibration: str) -> list[str]:
    return ["crosslayer", "convert", src, "--out", out, "--plan", "search", "--producers", str(producers),
            "--calibration", calibration, "--compute-dtype", dtype, "--no-progress", "--json"]


def search_once(src: str, producers: int, dtype: str, calibration: str) -> dict:
    """One conversion with a plan search, in a fresh process; its search's record."""
    with tempfile.TemporaryDirectory(prefix="plan-bf16-") as tmp:
        cmd = convert_command(src, f"{tmp}/out", producers, dtype, calibration)
        done = subprocess.run([sys.executable, "-m", "crosslayer", *cmd[1:]], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{shlex.join(cmd)} failed:\n{done.stderr[-2000:]}")
        summary = json.loads(done.stdout.strip().splitlines()[-1])
    search = summary["search"]
    return {"producers": producers, "compute_dtype": dtype,
            "command": shlex.join(cmd).replace(f"{tmp}/out", "OUT"),
            "search_seconds": search["seconds"], "evaluations": search["evaluations"],
            "search_tokens": search["search_tokens"], "kv_sources": search["kv_sources"], "plan": search["plan"],
            "cost": search["cost"], "steps": search["steps"]}


def fp32_costs(src: str, runs: list[dict], calibration: str) -> dict[str, float]:
    """The fp32 cost (KL, nats/token) of every plan found, on the first search tokens of the calibration."""
    import torch

    from crosslayer.calibration import CALIBRATION_SEQ_LEN, CALIBRATION_TOKENS, read_calibration
    from crosslayer.convert import dense_copy, load_source
    from crosslayer.loading import load_tokenizer, split_model_spec
    from crosslayer.plan import Reference

    location, gguf_file = split_model_spec(src, None)
    tokens = read_calibration(calibration, load_tokenizer(location, gguf_file), CALIBRATION_TOKENS, CALIBRATION_SEQ_LEN)
    rows = max(1, runs[0]["search_tokens"] // tokens.shape[1])  # as plan.Searcher takes them
    reference = Reference(dense_copy(load_source(location, gguf_file)), tokens[:rows], compute_dtype=torch.float32)
    return {r["plan"]: reference.cost(r["kv_sources"])[0] for r in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file (resumed when it exists)")
    parser.add_argument("--src", default=GGUF)
    parser.add_argument("--calibration", default=CALIBRATION)
    parser.add_argument("--producers", type=int, nargs="+", default=[26, 15])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    args = parser.parse_args()

    from crosslayer.device import cpu_capabilities

    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {
        "date": datetime.date.today().isoformat(), "src": args.src, "calibration": args.calibration,
        "cpu": cpu_capabilities(), "note": "shared 2-core machine; runs one after another under a CPU lock",
        "runs": []}
    done = {(r["producers"], r["compute_dtype"]) for r in result["runs"]}
    for producers in args.producers:
        for dtype in args.dtypes:
            if (producers, dtype) in done:
                continue
            print(f"searching {producers} producers in {dtype} ...", flush=True)
            result["runs"].append(search_once(args.src, producers, dtype, args.calibration))
            out.write_text(json.dumps(result, indent=1) + "\n")  # partial results survive an interruption
    if "fp32_cost" not in result:
        result["fp32_cost"] = fp32_costs(args.src, result["runs"], args.calibration)
        out.write_text(json.dumps(result, indent=1) + "\n")

    print(f"{'producers':>9s} {'dtype':>5s} {'search s':>9s} {'cost':>8s} {'fp32 cost':>9s}  plan")
    for r in result["runs"]:
        print(f"{r['producers']:>9d} {r['compute_dtype']:>5s} {r['search_seconds']:>9.1f} {r['cost']:>8.4f} "
              f"{result['fp32_cost'][r['plan']]:>9.4f}  {r['plan']}")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"} | {
        "runs": [{k: v for k, v in r.items() if k != "steps"} for r in result["runs"]]}))


if __name__ == "__main__":
    main()
