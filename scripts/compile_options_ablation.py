"""What each of the CPU compile options buys: decode tokens/s of `fast_generate(compile=True)` on a preset's
random-weight CLA1 copy with `crosslayer.cpu_decode.CPU_COMPILE_OPTIONS` switched on one at a time.

    python scripts/compile_options_ablation.py --preset small-H64-MQA-CLA2 --batch 1 --repeats 3

Prints one line per setting (median of `repeats` decodes after one that compiles) and a JSON line last.
"""

import argparse
import json
import statistics

import torch

from crosslayer.bench.decode import build_models
from crosslayer.cpu_decode import CPU_COMPILE_OPTIONS, CPUDecoding
from crosslayer.decode import fast_generate

STEPS = [("none", {}), ("freezing", {"freezing": True}),
         ("freezing + autotuned GEMMs", {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}),
         ("all (+ C++ wrapper)", CPU_COMPILE_OPTIONS)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small-H64-MQA-CLA2")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    _, cla1, _ = build_models(args.preset, torch.device("cpu"), torch.float32, args.prompt_len + args.new_tokens)
    ids = torch.randint(0, cla1.config.vocab_size, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    reference = fast_generate(cla1, ids, max_new_tokens=args.new_tokens).sequences
    results = []
    for name, options in STEPS:
        cpu = CPUDecoding(options)  # its first compiled step starts from an empty compiler cache
        fast_generate(cla1, ids, max_new_tokens=args.new_tokens, compile=True, cpu=cpu)  # compiles
        rates, equal = [], True
        for _ in range(args.repeats):
            out = fast_generate(cla1, ids, max_new_tokens=args.new_tokens, compile=True, cpu=cpu)
            rates.append(args.batch * (args.new_tokens - 1) / out.decode_seconds)
            equal &= torch.equal(out.sequences, reference)
        results.append({"options": name, "decode_tokens_per_s": statistics.median(rates), "all": rates,
                        "greedy_equal_to_eager": equal})
        print(f"{name:28s} {statistics.median(rates):8.1f} tok/s  rounds {[round(r) for r in rates]}  "
              f"greedy = eager: {equal}", flush=True)
    print(json.dumps({"preset": args.preset, "batch": args.batch, "torch": torch.__version__, "results": results}))


if __name__ == "__main__":
    main()
