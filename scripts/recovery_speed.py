"""Recovery speed (issue 19's protocol): `configs/recover-logits.yaml` on SmolLM2-135M converted to 24 producers,
the teacher its CLA1 copy, 6 steps of 4,096 tokens; prints one JSON line (tokens/s of steps 2-6, the loss curve,
the CPU's capabilities). Runs the trainer through the library.

Set-up, once (folders under runs/, git-ignored):
  python scripts/gutenberg_split.py ../shared/data/gutenberg runs/gutenberg
  crosslayer convert ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
      --out runs/smollm2/cla1 --cla-factor 1
  crosslayer prepare "text:runs/gutenberg/train/*.txt" --val "runs/gutenberg/valid/*.txt" --max-train-docs 12 \\
      --tokenizer hf:runs/smollm2/cla1 --out runs/smollm2/data
  # 24 producers: layers 7, 11, 15, 19, 23, 27 read the K/V of 6, 10, 14, 18, 22, 26 (speed does not depend on which)
  python -c "import json; s = list(range(30)); [s.__setitem__(a + 1, a) for a in (6, 10, 14, 18, 22, 26)]; \
      json.dump({'kv_sources': s}, open('runs/smollm2/plan24.json', 'w'))"
  crosslayer convert runs/smollm2/cla1 --out runs/smollm2/p24 --plan runs/smollm2/plan24.json --kv-init mean
Then:  python scripts/recovery_speed.py TAG DTYPE [KEY=VALUE ...]    e.g.  ... bf16-compiled bf16 compile=true
"""

import json
import logging
import shutil
import sys
import time
from pathlib import Path

from crosslayer.device import cpu_capabilities
from crosslayer.train import load_train_config, train

RUNS = Path("runs")

if __name__ == "__main__":
    tag, dtype, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
    out = RUNS / "speed" / tag
    shutil.rmtree(out, ignore_errors=True)
    logging.basicConfig(level=logging.INFO)
    cfg = load_train_config("configs/recover-logits.yaml", [
        f"data={RUNS}/smollm2/data", f"teacher={RUNS}/smollm2/cla1", "max_steps=6", f"dtype={dtype}",
        "eval_tokens=1024", f"out={out}", "progress=false", *extra], init=f"{RUNS}/smollm2/p24")
    start = time.perf_counter()
    summary = train(cfg)
    wall = time.perf_counter() - start
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "tokens_per_s" in r]
    print(json.dumps({"tag": tag, "dtype": dtype, "extra": extra, "wall_s": round(wall, 1),
                      "tokens_per_s_steps2_6": round(sum(r["tokens_per_s"] for r in steps[1:]) / len(steps[1:]), 1),
                      "losses": [round(r["loss"], 4) for r in steps], "val_loss": summary.get("val_loss"),
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_capabilities()}))
