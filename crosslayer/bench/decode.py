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

import statistics
import time
from pathlib import Path

import torch

from ..config import CLAConfig, to_llama_config
from ..convert import from_hf
from ..decode import fast_generate
from ..errors import CrossLayerError
from ..runtime import device_name, sync
from .memory import weight_bytes


def measure_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 7) -> float:
    """Bytes/s of a large device-to-device copy (read + written), best of `repeats`."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
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
        sync(self.device)
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
        llama = LlamaForCausalLM(to_llama_config(twin, max_len)).to(dtype).eval()
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
    result = {"benchmark": "decode", "device": device_name(device), "torch": torch.__version__, "preset": preset,
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
