"""One recovery step under torch.profiler (the set-up of scripts/recovery_speed.py): the top ops by self time.
usage: python scripts/profile_recovery_step.py DTYPE [KEY=VALUE ...]     e.g.  bf16 compile=true teacher_topk=32"""

import sys
import time

from torch.profiler import ProfilerActivity, profile

from crosslayer.train import Trainer, load_train_config

RUNS = "runs"

if __name__ == "__main__":
    dtype, extra = sys.argv[1], sys.argv[2:]
    cfg = load_train_config("configs/recover-logits.yaml", [
        f"data={RUNS}/smollm2/data", f"teacher={RUNS}/smollm2/cla1", "max_steps=6", f"dtype={dtype}",
        "eval_tokens=1024", f"out={RUNS}/prof/run", *extra], init=f"{RUNS}/smollm2/p24")
    trainer = Trainer(cfg)
    trainer.step()  # warm-up (and compilation)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        trainer.step()
        elapsed = time.perf_counter() - start
    print(f"step {elapsed:.2f} s -> {cfg.batch_tokens / elapsed:.0f} tok/s (under the profiler)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
