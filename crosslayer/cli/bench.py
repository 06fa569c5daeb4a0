"""`crosslayer bench memory|decode|train|serve`: benchmarks; each prints a table, then (with --json) one JSON line."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import add_device_flags, add_json_flags, add_progress_flag, emit, int_list, name_list, non_negative_int, positive_int

WEIGHTS_AND_CACHE = "weights and cache (auto: bf16 on CUDA, fp32 on CPU)"


def _print_machine(result: dict) -> None:
    """The table header's machine line: the CPU, its matrix features and GEMM peaks, or the GPU (bench.machine)."""
    from ..bench.machine import machine_line

    if line := machine_line(result):
        print(line)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: KV memory, decode speed, training throughput, vLLM serving",
                       description="Benchmarks that warm up, synchronise, repeat, and report medians.")
    benches = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True, parser_class=type(p))
    _register_memory(benches)
    _register_decode(benches)
    _register_train(benches)
    _register_serve(benches)


# ----------------------------------------------------------------------------------------------
# memory


def _register_memory(sub) -> None:
    from ..bench import memory
    from ..device import KV_DTYPES

    p = sub.add_parser("memory", help="KV bytes analytic vs measured; largest batch in a budget and its decode speed",
                       description=memory.__doc__)
    p.add_argument("--presets", type=name_list, default=["small-H64-MHA", "small-H64-GQA2", "small-H64-MQA",
                                                         "small-H64-MQA-CLA2"], help="models (random weights)")
    p.add_argument("--kv-dtypes", type=name_list, default=["auto"],
                   help=f"cache dtypes, of {', '.join(KV_DTYPES)} (auto: the weights' dtype)")
    p.add_argument("--batch-sizes", type=int_list, default=[1, 4], help="batches to fill the cache with")
    p.add_argument("--context-lengths", type=int_list, default=[128, 512], help="tokens per sequence")
    p.add_argument("--budget", default=None, metavar="SIZE", help="memory budget for the largest-batch search, e.g. 256MiB")
    p.add_argument("--decode-tokens", type=non_negative_int, default=0,
                   help="with --budget: decode this many tokens at each largest batch and report tokens/s (0: no)")
    p.add_argument("--compile", action="store_true", help="with --decode-tokens: torch.compile the decode step")
    add_device_flags(p, "bf16", WEIGHTS_AND_CACHE)
    p.add_argument("--plot", default=None, metavar="PNG", help="write the KV-vs-context plot here")
    add_json_flags(p)
    p.set_defaults(func=run_memory)


def run_memory(args: argparse.Namespace) -> int:
    from ..bench.memory import plot, run_memory
    from ..device import pick_device
    from ..errors import CrossLayerError
    from ..kv import parse_bytes

    budget = parse_bytes(args.budget) if args.budget else None
    if args.decode_tokens and budget is None:
        raise CrossLayerError("--decode-tokens decodes at the largest batch within --budget: give --budget too")
    result = run_memory(args.presets, args.batch_sizes, args.context_lengths, budget, args.dtype,
                        pick_device(args.device), args.kv_dtypes, args.decode_tokens, args.compile)
    _print_machine(result)
    print(f"{'preset':22s} {'KV dtype':>8s} {'batch':>5s} {'context':>7s} {'analytic KV':>13s} {'measured KV':>13s}")
    for r in result["rows"]:
        print(f"{r['preset']:22s} {r['kv_dtype']:>8s} {r['batch']:>5d} {r['context']:>7d} {r['analytic_bytes']:>13,} "
              f"{r['measured_bytes']:>13,}")
    if result["capacity"]:
        print(f"\nlargest batch within {args.budget} (weights, cache and one decode step, allocated):")
        print(f"{'preset':22s} {'KV dtype':>8s} {'context':>7s} {'found':>7s} {'analytic':>8s} {'allocated':>13s}"
              + (f" {'decode tok/s':>12s}" if args.decode_tokens else ""))
        for c in result["capacity"]:
            line = (f"{c['preset']:22s} {c['kv_dtype']:>8s} {c['context']:>7d} {c['largest_batch']:>7d} "
                    f"{c['analytic_largest_batch']:>8d} {c.get('allocated_bytes', 0):>13,}")
            if args.decode_tokens:
                line += f" {c.get('decode_tokens_per_s', 0):>12,.1f}"
            print(line)
    if args.plot:
        plot(result, args.presets, args.plot)
    return emit(result, args)


# ----------------------------------------------------------------------------------------------
# decode


def _register_decode(sub) -> None:
    from ..bench import decode
    from ..device import KV_DTYPES

    p = sub.add_parser("decode", help="prefill latency and decode tokens/s: ours (CLA, CLA1) vs transformers, vLLM",
                       description=decode.__doc__)
    p.add_argument("--preset", default="small-H64-MQA-CLA2", help="the CLA model (random weights); its CLA1 twin is derived")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="a real Llama-family checkpoint (folder or .gguf) instead of --preset's random weights")
    p.add_argument("--cla-factor", type=positive_int, default=2, help="with --model: its CLA model's sharing (uniform)")
    p.add_argument("--batch-sizes", type=int_list, default=[1, 4, 16], help="sequences decoded together")
    p.add_argument("--prompt-len", type=positive_int, default=128, help="prompt tokens")
    p.add_argument("--new-tokens", type=positive_int, default=128, help="tokens generated (at least 2)")
    p.add_argument("--modes", type=name_list, default=["eager", "compiled"], help="our decode paths: eager, compiled")
    p.add_argument("--kv-dtypes", type=name_list, default=["auto"],
                   help=f"our cache dtypes, of {', '.join(KV_DTYPES)} (auto: the weights' dtype)")
    p.add_argument("--baselines", type=name_list, default=list(decode.DEFAULT_BASELINES),
                   help="transformers paths: generate (eager, dynamic cache), static-compiled (its documented fast path), "
                        "static-compiled-tuned (that with our CPU compile options; a CPU only), or none")
    p.add_argument("--vllm-python", default=None, metavar="PYTHON",
                   help="a Python with vLLM installed: adds vLLM's offline engine as a reference row")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="untimed rounds first")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed rounds (runners interleaved); medians reported")
    add_device_flags(p, "auto", WEIGHTS_AND_CACHE)
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also write torch.profiler tables of one decode (transformers, ours) at the first batch size")
    add_json_flags(p)
    p.set_defaults(func=run_decode)


def run_decode(args: argparse.Namespace) -> int:
    from ..bench.decode import TRANSFORMERS_PATHS, build_models, profile_decode, run_decode
    from ..device import KV_DTYPES, pick_device, pick_dtype
    from ..errors import CrossLayerError

    device = pick_device(args.device)
    if set(args.modes) - {"eager", "compiled"}:
        raise CrossLayerError(f"--modes: eager and/or compiled, got {','.join(args.modes)!r}")
    if set(args.kv_dtypes) - set(KV_DTYPES):
        raise CrossLayerError(f"--kv-dtypes: of {', '.join(KV_DTYPES)}, got {','.join(args.kv_dtypes)!r}")
    baselines = [] if args.baselines == ["none"] else args.baselines
    if set(baselines) - set(TRANSFORMERS_PATHS):
        raise CrossLayerError(f"--baselines: of {', '.join(TRANSFORMERS_PATHS)} or none, got {','.join(args.baselines)!r}")
    if "static-compiled-tuned" in baselines and device.type != "cpu":
        raise CrossLayerError(f"--baselines static-compiled-tuned is a CPU baseline (our CPU compile options); "
                              f"on {device.type} use static-compiled")
    if args.new_tokens < 2:
        raise CrossLayerError(f"--new-tokens must be >= 2 (decode speed is measured after the first), got {args.new_tokens}")
    models = build_models(args.preset, device, pick_dtype(args.dtype, device), args.prompt_len + args.new_tokens,
                          model=args.model, cla_factor=args.cla_factor)
    name = args.preset if args.model is None else f"CLA{args.cla_factor}"
    result = run_decode(models, name, args.batch_sizes, args.prompt_len, args.new_tokens, args.modes,
                        args.warmup, args.repeats, device, baselines, args.kv_dtypes, args.vllm_python)
    result["model"] = args.model or args.preset
    if args.profile:
        result["profiles"] = [str(p) for p in profile_decode(models, args.batch_sizes[0], args.prompt_len,
                                                             args.new_tokens, device, Path(args.profile),
                                                             compile="compiled" in args.modes)]
    print(f"device: {result['device']}, {result['dtype']}, {result['model']}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, measured bandwidth {result['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s")
    _print_machine(result)
    print(f"{'model':22s} {'path':21s} {'KV':>5s} {'batch':>5s} {'KV B/tok':>9s} {'prefill ms':>10s} "
          f"{'decode tok/s':>12s} {'e2e tok/s':>9s} {'roofline':>9s} {'bw util':>7s}")
    for r in result["rows"]:
        if "decode_tokens_per_s" not in r:  # the vLLM reference: end to end only
            print(f"{r['model']:22s} {r['path']:21s} {r['kv_dtype']:>5s} {r['batch']:>5d} {'':>9s} {'':>10s} {'':>12s} "
                  f"{r['e2e_tokens_per_s']:>9,.1f}")
            continue
        print(f"{r['model']:22s} {r['path']:21s} {r['kv_dtype']:>5s} {r['batch']:>5d} {r['kv_bytes_per_token']:>9,} "
              f"{r['prefill_ms']:>10.1f} {r['decode_tokens_per_s']:>12,.1f} {r['e2e_tokens_per_s']:>9,.1f} "
              f"{r['roofline_tokens_per_s']:>9,.0f} {r['bw_util'] * 100:>6.1f}%")
    for e in result["ratios"]:
        line = (f"batch {e['batch']:>3d}, KV {e['kv_dtype']}: fastest paths CLA1 {e['fastest_path_cla1']}, "
                f"{name} {e['fastest_path']}; "
                f"{name} / CLA1 {e['cla_over_cla1']:.2f}x")
        for path in baselines:
            line += f"; CLA1 / transformers {path} {e[f'cla1_over_{path}']:.2f}x"
        print(line)
    if result["greedy_equal_to_transformers"]:
        print(f"greedy tokens == transformers generate's: {result['greedy_equal_to_transformers']}")
    if "vllm_error" in result:
        print(f"vLLM reference: {result['vllm_error']}")
    return emit(result, args)


# ----------------------------------------------------------------------------------------------
# train


def _register_train(sub) -> None:
    from ..bench import train

    p = sub.add_parser("train", help="training tokens/s: ours (CLA1, CLA2) vs transformers Llama",
                       description=train.__doc__)
    p.add_argument("--presets", type=name_list, default=["small-H64-MQA", "small-H64-MQA-CLA2"],
                   help="presets for our trainer; the first must be CLA1 (the baseline's shape)")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per sequence")
    p.add_argument("--micro-batch", type=positive_int, default=8, help="sequences per forward pass")
    p.add_argument("--accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=positive_int, default=5, help="timed steps per repeat")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps first")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed rounds (models interleaved); medians reported")
    add_device_flags(p, "auto", "auto: bf16 autocast on CUDA and on CPUs with bf16 matrix units (AMX, AVX512-BF16), "
                     "else fp32 (the trainer's rule); fp16 is not trained")
    p.add_argument("--compile", action="store_true", help="torch.compile both ours and the baseline")
    p.add_argument("--no-baseline", action="store_true", help="skip transformers' Llama")
    add_progress_flag(p)
    add_json_flags(p)
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from ..bench.train import TrainBench, run_train_bench
    from ..device import pick_device

    bench = TrainBench(presets=args.presets, seq_len=args.seq_len, micro_batch=args.micro_batch, accum=args.accum,
                       steps=args.steps, warmup=args.warmup, repeats=args.repeats, compile=args.compile,
                       baseline=not args.no_baseline, dtype=args.dtype)
    result = run_train_bench(bench, pick_device(args.device))
    print(f"device: {result['device']}, seq_len {args.seq_len}, {args.micro_batch} x {args.accum} sequences/step, "
          f"{result['precision']}")
    _print_machine(result)
    print(f"{'model':45s} {'params':>9s} {'KV B/tok':>9s} {'tokens/s':>11s} {'MFU':>6s}")
    for r in result["rows"]:
        mfu = f"{r['mfu'] * 100:.1f}%" if "mfu" in r else "-"
        print(f"{r['name']:45s} {r['parameters'] / 1e6:>8.1f}M {r['kv_bytes_per_token']:>9,} "
              f"{r['tokens_per_s']:>11,.0f} {mfu:>6s}")
    if "ours_over_transformers" in result:
        print(f"ours / transformers ({args.presets[0]}): {result['ours_over_transformers']:.3f}x")
    if "second_over_first" in result:
        print(f"{args.presets[1]} / {args.presets[0]}: {result['second_over_first']:.3f}x")
    return emit(result, args)


# ----------------------------------------------------------------------------------------------
# serve


def length_range(text: str) -> tuple[int, int]:
    """LO:HI (or N) -> (lo, hi), positive integers with lo <= hi."""
    lo, _, hi = text.partition(":")
    try:
        bounds = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI token counts such as 128:512, got {text!r}") from None
    if bounds[0] < 1 or bounds[0] > bounds[1]:
        raise argparse.ArgumentTypeError(f"expected 1 <= LO <= HI, got {text!r}")
    return bounds


def _register_serve(sub) -> None:
    from ..bench import serve
    from ..device import LONG_NAMES

    p = sub.add_parser("serve", help="vLLM offline throughput at fixed KV budgets: a CLA model vs its twin (needs vLLM)",
                       description=serve.__doc__)
    p.add_argument("--models", type=name_list, default=None, metavar="NAME=DIR,...",
                   help="crosslayer folders to serve, the first is the baseline (default: random-weight CLA1 and CLA2 "
                        "of the SmolLM2-135M shape, written under --out)")
    p.add_argument("--out", default="runs/bench-serve", metavar="DIR",
                   help="folder for the default models, serve.json and (with --plot) the plot")
    p.add_argument("--budgets", type=name_list, default=["32MiB", "128MiB", "512MiB"],
                   help="KV-cache budgets (bytes of KV pages vLLM may allocate), e.g. 32MiB,512MiB")
    p.add_argument("--kv-dtypes", type=name_list, default=list(serve.VLLM_KV_DTYPES),
                   help=f"vLLM KV-cache dtypes, of {', '.join(serve.VLLM_KV_DTYPES)} (auto: the weights' dtype)")
    p.add_argument("--requests", type=positive_int, default=256, help="requests, all queued at once")
    p.add_argument("--prompt-len", type=length_range, default=(128, 512), metavar="LO:HI",
                   help="prompt tokens per request, uniform in LO..HI")
    p.add_argument("--output-len", type=length_range, default=(32, 256), metavar="LO:HI",
                   help="generated tokens per request, uniform in LO..HI (greedy, ignore_eos)")
    p.add_argument("--max-num-seqs", type=positive_int, default=256, help="vLLM's cap on requests running at once")
    p.add_argument("--dtype", default="bfloat16", choices=list(LONG_NAMES), help="weights' dtype in vLLM")
    p.add_argument("--seed", type=int, default=0, help="workload seed (prompt tokens and lengths)")
    p.add_argument("--plot", action="store_true", help="also write OUT/serve.png: output tokens/s against the budget")
    add_json_flags(p)
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import json
    import os

    from ..bench.serve import VLLM_KV_DTYPES, plot, run_serve, twin_models
    from ..device import LONG_NAMES
    from ..errors import CrossLayerError
    from ..kv import parse_bytes

    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise CrossLayerError("bench serve needs vLLM beside crosslayer: "
                              "see docs/serving.md (scripts/vllm-env.sh)") from None
    if set(args.kv_dtypes) - set(VLLM_KV_DTYPES):
        raise CrossLayerError(f"--kv-dtypes: of {', '.join(VLLM_KV_DTYPES)}, got {','.join(args.kv_dtypes)!r}")
    budgets = [parse_bytes(b) for b in args.budgets]
    out = Path(args.out)
    if args.models:
        models = {}
        for item in args.models:
            name, sep, folder = item.partition("=")
            if not sep or not name or not folder:
                raise CrossLayerError(f"--models: NAME=DIR items, got {item!r}")
            if not (Path(folder) / "config.json").is_file():
                raise CrossLayerError(f"--models: {folder} is not a model folder (no config.json)")
            models[name] = Path(folder)
    else:
        twins = twin_models(out / "models", dtype=args.dtype)
        models = {"CLA1 (GQA3)": twins["cla1"], "CLA2": twins["cla2"]}
    result = run_serve(models, budgets, tuple(args.kv_dtypes), requests=args.requests, prompt_len=args.prompt_len,
                       output_len=args.output_len, dtype=args.dtype, max_num_seqs=args.max_num_seqs, seed=args.seed)
    _print_machine(result)
    print(f"{'model':14s} {'KV':>5s} {'budget':>8s} {'capacity':>9s} {'x':>5s} {'req/s':>6s} {'out tok/s':>9s} "
          f"{'x':>5s} {'peak run':>8s} {'preempt':>7s} {'wall s':>7s}")
    for r in result["rows"]:
        print(f"{r['model']:14s} {r['kv_cache_dtype'].replace('auto', LONG_NAMES[args.dtype]):>5s} "
              f"{r['budget_bytes'] / 2**20:>5.0f}MiB {r['kv_capacity_tokens']:>9,} {r.get('capacity_vs_baseline', 0):>5.2f} "
              f"{r['requests_per_s']:>6.2f} {r['output_tokens_per_s']:>9.1f} {r.get('throughput_vs_baseline', 0):>5.2f} "
              f"{r['peak_running']:>8d} {r['preemptions']:>7d} {r['wall_s']:>7.1f}")
    print(f"({result['requests']} requests, prompts {args.prompt_len[0]}-{args.prompt_len[1]}, outputs "
          f"{args.output_len[0]}-{args.output_len[1]} tokens; x = against {result['baseline']} at the same budget and "
          f"the weights' KV dtype; {result['engine']}, {result['machine']})")
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(result, out / "serve.png")
    return emit(result, args)
