"""Decode speed: prefill latency and decode tokens/s, ours against transformers' `generate`.

One transformers `LlamaForCausalLM` of the CLA1 shape is built with random weights; our CLA1 twin
is its exact copy (`from_hf`, factor 1) and the CLA model under test is its conversion with the
preset's sharing (K/V mean-pooled), so all three have the same shape and nearly the same weights.
For each batch size, every runner decodes the same random prompts greedily for a fixed number of
tokens (no early stop): warm-up, then `--repeats` rounds with the runners interleaved; medians.
  - transformers: `generate()` over its default dynamic cache (what users run today);
  - ours, `eager`: `crosslayer.decode.fast_generate` (producer-only preallocated cache);
  - ours, `compiled`: the same with the decode step under `torch.compile` (fixed shapes).
Times come from a streamer that stamps each new token, so prefill latency (prompt in, first token
out) and decode tokens/s (after the first token) are separated inside one call, the same way for all.

Beside each figure: the roofline, i.e. bytes one decode step must read (weights + the K/V of every
producer layer at the mean context) over the memory bandwidth measured here (best of several
copies of a large buffer, bytes read + written); `bw_util` = measured / roofline tokens/s.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from ..config import CLAConfig
from ..convert import from_hf
from ..decode import fast_generate
from ..errors import CrossLayerError
from ..eval.common import pick_device, pick_dtype
from . import emit
from .memory import _ints, weight_bytes
from .train import _device_name, _sync, llama_config


def measure_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 7) -> float:
    """Bytes/s of a large device-to-device copy (read + written), best of `repeats`."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def bytes_per_decode_step(model: torch.nn.Module, config: CLAConfig, batch: int, context: int) -> int:
    """What one decode step must read: every weight matrix (an untied input embedding only for the
    batch's rows) and the cached K/V of every producer layer for `context` tokens."""
    element = next(model.parameters()).element_size()
    weights = weight_bytes(model)
    if not config.tie_word_embeddings:
        weights -= (config.vocab_size - batch) * config.hidden_size * element
    return weights + batch * context * config.kv_bytes_per_token(element)


class StepClock:
    """A `generate` streamer that stamps the time each new token arrives (the first put is the prompt)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.start, self.stamps = device, time.perf_counter(), []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        _sync(self.device)
        self.stamps.append(time.perf_counter() - self.start)

    def end(self) -> None:
        pass


def _hf_runner(model, ids: torch.Tensor, new_tokens: int):
    def run() -> tuple[list[float], torch.Tensor]:
        clock = StepClock(ids.device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=clock)
        return clock.stamps, out
    return run


def _our_runner(model, ids: torch.Tensor, new_tokens: int, compile: bool):
    def run() -> tuple[list[float], torch.Tensor]:
        clock = StepClock(ids.device)
        out = fast_generate(model, ids, max_new_tokens=new_tokens, compile=compile, streamer=clock)
        return clock.stamps, out.sequences
    return run


def build_models(preset: str, device: torch.device, dtype: torch.dtype, max_len: int, seed: int = 0):
    """(transformers Llama of the CLA1 shape, our exact CLA1 copy, the preset's CLA model converted from it)."""
    from transformers import LlamaForCausalLM

    config = CLAConfig.from_preset(preset)
    twin = CLAConfig.from_preset(preset, cla_factor=1, cla_pattern="uniform", kv_sources=None)
    torch.manual_seed(seed)
    with torch.device(device):
        llama = LlamaForCausalLM(llama_config(twin, max_len)).to(dtype).eval()
    cla1 = from_hf(llama).to(device)
    if config.num_producer_layers == config.num_hidden_layers:
        raise CrossLayerError(f"{preset} shares no K/V; give a CLA preset (e.g. small-H64-MQA-CLA2)")
    cla = from_hf(llama, kv_sources=config.kv_sources).to(device)
    for m in (cla1, cla):
        m.config._attn_implementation = "sdpa"
    return llama, cla1, cla


def run_decode(models: tuple, preset: str, batch_sizes: list[int], prompt_len: int, new_tokens: int, modes: list[str],
               warmup: int, repeats: int, device: torch.device, baseline: bool = True) -> dict:
    """Time every runner at every batch size; `models` is `build_models(...)`'s triple."""
    llama, cla1, cla = models
    bandwidth = measure_bandwidth(device)
    context = prompt_len + new_tokens / 2  # mean context over the decode steps
    rows, checks = [], {}
    for batch in batch_sizes:
        ids = torch.randint(0, cla.config.vocab_size, (batch, prompt_len), device=device,
                            generator=torch.Generator(device).manual_seed(batch))
        runners = {}
        if baseline:
            runners[("transformers", "generate")] = (_hf_runner(llama, ids, new_tokens), cla1.config, llama)
        for mode in modes:
            for label, model in (("CLA1", cla1), (preset, cla)):
                runners[(label, mode)] = (_our_runner(model, ids, new_tokens, mode == "compiled"), model.config, model)
        prefill: dict = {k: [] for k in runners}
        decode: dict = {k: [] for k in runners}
        outputs = {}
        for run, _, _ in runners.values():
            for _ in range(warmup):
                run()
        for _ in range(repeats):
            for key, (run, _, _) in runners.items():
                stamps, outputs[key] = run()
                prefill[key].append(stamps[0])
                decode[key].append(batch * (len(stamps) - 1) / (stamps[-1] - stamps[0]))
        if baseline:  # our CLA1 copy must decode exactly what transformers decodes (fp32; ties may flip in 16-bit)
            reference = outputs[("transformers", "generate")]
            checks[batch] = {mode: bool(torch.equal(outputs[("CLA1", mode)], reference)) for mode in modes}
        for key, (_, config, model) in runners.items():
            step_bytes = bytes_per_decode_step(model, config, batch, int(context))
            roofline = batch * bandwidth / step_bytes
            tps = statistics.median(decode[key])
            rows.append({"model": key[0], "path": key[1], "batch": batch, "prompt": prompt_len, "new_tokens": new_tokens,
                         "kv_bytes_per_token": config.kv_bytes_per_token(next(model.parameters()).element_size()),
                         "prefill_ms": 1e3 * statistics.median(prefill[key]), "decode_tokens_per_s": tps,
                         "decode_tokens_per_s_all": decode[key], "bytes_per_step": step_bytes,
                         "roofline_tokens_per_s": roofline, "bw_util": tps / roofline})
    dtype = str(next(cla.parameters()).dtype).replace("torch.", "")
    result = {"benchmark": "decode", "device": _device_name(device), "torch": torch.__version__, "preset": preset,
              "dtype": dtype, "bandwidth_bytes_per_s": bandwidth, "rows": rows,
              "greedy_equal_to_transformers": checks, "ratios": _ratios(rows, preset)}
    return result


def _ratios(rows: list[dict], preset: str) -> list[dict]:
    """Per batch: our fastest path (the same path for both of ours) over transformers, and CLA over CLA1."""
    out = []
    for batch in sorted({r["batch"] for r in rows}):
        at = {(r["model"], r["path"]): r["decode_tokens_per_s"] for r in rows if r["batch"] == batch}
        paths = sorted({p for m, p in at if m == preset}, key=lambda p: -at[(preset, p)])
        if not paths:
            continue
        best = paths[0]
        entry = {"batch": batch, "fastest_path": best, "cla_over_cla1": at[(preset, best)] / at[("CLA1", best)]}
        if ("transformers", "generate") in at:
            hf = at[("transformers", "generate")]
            entry.update(cla1_over_transformers=at[("CLA1", best)] / hf, cla_over_transformers=at[(preset, best)] / hf)
        out.append(entry)
    return out


def profile_decode(models: tuple, batch: int, prompt_len: int, new_tokens: int, device: torch.device,
                   out_dir: Path, rows: int = 25) -> list[Path]:
    """torch.profiler tables (self time per op) of one decode by each runner, written to out_dir."""
    from torch.profiler import ProfilerActivity, profile

    llama, cla1, _ = models
    ids = torch.randint(0, cla1.config.vocab_size, (batch, prompt_len), device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, run in (("transformers", _hf_runner(llama, ids, new_tokens)),
                      ("ours-eager", _our_runner(cla1, ids, new_tokens, False))):
        run()
        with profile(activities=activities) as prof:
            run()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        path = out_dir / f"profile-{name}-b{batch}.txt"
        path.write_text(prof.key_averages().table(sort_by=sort, row_limit=rows))
        paths.append(path)
    return paths


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("decode", help="prefill latency and decode tokens/s: ours (CLA, CLA1) vs transformers",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small-H64-MQA-CLA2", help="the CLA model; its CLA1 twin is derived")
    p.add_argument("--batch-sizes", default="1,4,16")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--modes", default="eager,compiled", help="our decode paths: eager and/or compiled")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (runners interleaved); medians reported")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-baseline", action="store_true", help="skip transformers")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also write torch.profiler tables of one decode (transformers, ours) at the first batch size")
    p.add_argument("--json-out", default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"eager", "compiled"}:
        raise CrossLayerError(f"--modes: eager and/or compiled, got {args.modes!r}")
    if args.prompt_len < 1 or args.new_tokens < 2 or args.repeats < 1 or args.warmup < 0:
        raise CrossLayerError("need --prompt-len >= 1, --new-tokens >= 2, --repeats >= 1, --warmup >= 0")
    batches = _ints(args.batch_sizes, "--batch-sizes")
    models = build_models(args.preset, device, pick_dtype(args.dtype, device), args.prompt_len + args.new_tokens)
    result = run_decode(models, args.preset, batches, args.prompt_len, args.new_tokens, modes, args.warmup,
                        args.repeats, device, baseline=not args.no_baseline)
    if args.profile:
        result["profiles"] = [str(p) for p in profile_decode(models, batches[0], args.prompt_len, args.new_tokens,
                                                             device, Path(args.profile))]
    print(f"device: {result['device']}, {result['dtype']}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"measured bandwidth {result['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s")
    print(f"{'model':22s} {'path':9s} {'batch':>5s} {'KV B/tok':>9s} {'prefill ms':>10s} {'decode tok/s':>12s} "
          f"{'roofline':>9s} {'bw util':>7s}")
    for r in result["rows"]:
        print(f"{r['model']:22s} {r['path']:9s} {r['batch']:>5d} {r['kv_bytes_per_token']:>9,} {r['prefill_ms']:>10.1f} "
              f"{r['decode_tokens_per_s']:>12,.1f} {r['roofline_tokens_per_s']:>9,.0f} {r['bw_util'] * 100:>6.1f}%")
    for e in result["ratios"]:
        line = f"batch {e['batch']:>3d}: fastest path {e['fastest_path']}; {args.preset} / CLA1 {e['cla_over_cla1']:.2f}x"
        if "cla1_over_transformers" in e:
            line += (f"; CLA1 / transformers {e['cla1_over_transformers']:.2f}x; "
                     f"{args.preset} / transformers {e['cla_over_transformers']:.2f}x")
        print(line)
    if result["greedy_equal_to_transformers"]:
        print(f"greedy tokens of our CLA1 copy == transformers': {result['greedy_equal_to_transformers']}")
    return emit(result, args.json_out)
