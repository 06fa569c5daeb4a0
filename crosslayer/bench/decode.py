"""Decode speed: prefill latency and decode tokens/s, ours against transformers' `generate`, eager and
compiled, and vLLM's CPU engine as a reference.

Models: one transformers `LlamaForCausalLM` of the CLA1 shape, with random weights of a preset's
shape or a real checkpoint (`model`: a Llama-family folder or GGUF file, e.g. SmolLM2-135M); our CLA1
twin, its exact copy (`from_hf`, factor 1); and the CLA model, its conversion with the preset's
sharing (or `cla_factor` for a checkpoint; K/V mean-pooled). For each batch size every runner
decodes the same random prompts greedily for a fixed number of tokens (no early stop): warm-up, then
`repeats` rounds with the runners interleaved; medians.
  - transformers `generate`: eager, over its default dynamic cache (what users run by default);
  - transformers `static-compiled`: `generate(cache_implementation="static")` with its own compiled
    forward for the decode steps (`CompileConfig()` defaults; the path transformers documents for
    speed; on a CPU `generate` compiles only when told to, `CompileConfig._compile_all_devices`);
  - transformers `static-compiled-tuned` (a CPU only): the same, compiled with the inductor options our
    compiled CPU step uses (`crosslayer.cpu_decode.CPU_COMPILE_OPTIONS`, patched in around the call), so a
    gain of ours that the options alone give shows as such;
  - ours `eager` / `compiled`: `crosslayer.decode.fast_generate` (producer-only preallocated cache;
    `compiled` puts the decode step under `torch.compile`), for each KV dtype asked (e.g. `int8`);
  - vLLM (with `vllm_python`, a Python that has vLLM): its offline engine on the same Llama, in
    that Python (`crosslayer/bench/vllm_decode.py`); end-to-end tokens/s only.
Times come from a streamer that stamps each new token, so prefill latency (prompt in, first token
out), decode tokens/s (after the first token) and end-to-end tokens/s (all new tokens over the
whole call, prefill included) are separated inside one call, the same way for all.

Beside each figure: the roofline, i.e. bytes one decode step must read (weights + the K/V of every
producer layer at the mean context, in the cache's dtype with its scales) over the memory bandwidth
measured here (best of several copies of a large buffer, bytes read + written); `bw_util` = measured
/ roofline tokens/s. Prints a table, then one JSON line; both name the machine (the CPU, its matrix
features and measured GEMM peaks, or the GPU: `crosslayer.bench.machine`).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from ..config import CLAConfig, to_llama_config
from ..convert import from_hf, load_source, target_config
from ..cpu_decode import CPUDecoding, cpu_compile_options
from ..decode import fast_generate
from ..device import device_name, sync
from ..errors import CrossLayerError
from ..kv import kv_bytes_per_token
from .machine import machine_fields
from .memory import kv_dtype_name, weight_bytes

TRANSFORMERS_PATHS = ("generate", "static-compiled", "static-compiled-tuned")
DEFAULT_BASELINES = ("generate", "static-compiled")
# run by its path in vLLM's Python, which need not have crosslayer installed
VLLM_RUNNER = Path(__file__).resolve().with_name("vllm_decode.py")


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


def bytes_per_decode_step(model: torch.nn.Module, config: CLAConfig, batch: int, context: int,
                          kv_dtype: str = "auto") -> int:
    """What one decode step must read: every weight matrix (an untied input embedding only for the
    batch's rows) and the cached K/V (with scales, for 8-bit) of every producer layer for `context` tokens."""
    param = next(model.parameters())
    weights = weight_bytes(model)
    if not config.tie_word_embeddings:
        weights -= (config.vocab_size - batch) * config.hidden_size * param.element_size()
    return weights + batch * context * kv_bytes_per_token(config, kv_dtype_name(kv_dtype, param.dtype))


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


def _hf_runner(model, ids: torch.Tensor, new_tokens: int, path: str = "generate"):
    from transformers import CompileConfig

    kwargs = {}
    if path.startswith("static-compiled"):
        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # transformers compiles on GPUs by itself, on a CPU when told to
        kwargs = dict(cache_implementation="static", compile_config=compile_config)
    # tuned: the inductor options our compiled CPU step uses (frozen weights, autotuned GEMMs, C++ wrapper)
    tuned = path == "static-compiled-tuned" and ids.device.type == "cpu"

    def run() -> tuple[list[float], torch.Tensor]:
        clock = StepClock(ids.device)
        with torch.no_grad(), cpu_compile_options() if tuned else contextlib.nullcontext():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=clock, **kwargs)
        return clock.stamps, out
    return run


def _our_runner(model, ids: torch.Tensor, new_tokens: int, compile: bool, cpu: CPUDecoding, kv_dtype: str = "auto"):
    def run() -> tuple[list[float], torch.Tensor]:
        clock = StepClock(ids.device)
        out = fast_generate(model, ids, max_new_tokens=new_tokens, compile=compile, streamer=clock, kv_dtype=kv_dtype,
                            cpu=cpu)
        return clock.stamps, out.sequences
    return run


def build_models(preset: str | None, device: torch.device, dtype: torch.dtype, max_len: int, seed: int = 0,
                 model: str | None = None, cla_factor: int = 2):
    """(transformers Llama of the CLA1 shape, our exact CLA1 copy, the CLA model converted from it).

    The Llama has random weights of `preset`'s shape, or is the checkpoint `model` (folder or GGUF
    file), converted with `cla_factor` (uniform groups)."""
    from transformers import LlamaForCausalLM

    if model is not None:
        llama = load_source(model, dtype=dtype).to(device).eval()
        config = target_config({**llama.config.to_dict(), "architectures": [type(llama).__name__]}, cla_factor)
        name = f"{Path(model).name} (CLA{cla_factor})"
    else:
        config = CLAConfig.from_preset(preset)
        twin = CLAConfig.from_preset(preset, cla_factor=1, cla_pattern="uniform", kv_sources=None)
        torch.manual_seed(seed)
        with torch.device(device):
            llama = LlamaForCausalLM(to_llama_config(twin, max_len)).to(dtype).eval()
        name = preset
    cla1 = from_hf(llama).to(device)
    if config.num_producer_layers == config.num_hidden_layers:
        raise CrossLayerError(f"{name} shares no K/V; give a CLA preset (e.g. small-H64-MQA-CLA2) or --cla-factor >= 2")
    cla = from_hf(llama, kv_sources=config.kv_sources).to(device)
    for m in (cla1, cla):
        m.config._attn_implementation = "sdpa"
    return llama, cla1, cla


def vllm_reference(llama, prompts: dict[int, torch.Tensor], new_tokens: int, repeats: int, python: str,
                   timeout: float = 1800) -> dict[int, dict]:
    """vLLM's offline engine on `llama` (saved to a temporary folder), run by `python` (an interpreter
    with vLLM installed) in `llama`'s dtype: per batch size, end-to-end tokens/s and the greedy tokens."""
    from transformers import LlamaForCausalLM

    dtype = next(llama.parameters()).dtype
    with tempfile.TemporaryDirectory(prefix="crosslayer-vllm-") as tmp:
        plain = LlamaForCausalLM(llama.config)  # a checkpoint read from GGUF refuses save_pretrained
        plain.load_state_dict(llama.state_dict())
        plain.to(dtype).save_pretrained(tmp)
        out = Path(tmp) / "result.json"
        request = {"model": tmp, "prompts": {str(b): ids.tolist() for b, ids in prompts.items()},
                   "new_tokens": new_tokens, "repeats": repeats, "dtype": str(dtype).removeprefix("torch."),
                   "out": str(out)}
        proc = subprocess.run([python, str(VLLM_RUNNER)], input=json.dumps(request), capture_output=True, text=True,
                              timeout=timeout)
        result = json.loads(out.read_text()) if proc.returncode == 0 else None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise CrossLayerError(f"the vLLM reference run failed ({python}):\n{tail}")
    return {int(b): r for b, r in result["batches"].items()} | {"version": result["vllm"]}


def run_decode(models: tuple, preset: str, batch_sizes: list[int], prompt_len: int, new_tokens: int, modes: list[str],
               warmup: int, repeats: int, device: torch.device, baselines: list[str] = DEFAULT_BASELINES,
               kv_dtypes: list[str] = ("auto",), vllm_python: str | None = None) -> dict:
    """Time every runner at every batch size; `models` is `build_models(...)`'s triple."""
    llama, cla1, cla = models
    cpu = CPUDecoding()  # one for the run: each model's compiled steps stay compiled
    bandwidth = measure_bandwidth(device)
    context = prompt_len + new_tokens / 2  # mean context over the decode steps
    rows, checks, prompts, references = [], {}, {}, {}
    for batch in batch_sizes:
        ids = torch.randint(0, cla.config.vocab_size, (batch, prompt_len), device=device,
                            generator=torch.Generator(device).manual_seed(batch))
        prompts[batch] = ids.cpu()
        runners = {}
        for path in baselines:
            runners[("transformers", path, "auto")] = (_hf_runner(llama, ids, new_tokens, path), cla1)
        for mode in modes:
            for kv_dtype in kv_dtypes:
                for label, model in (("CLA1", cla1), (preset, cla)):
                    runner = _our_runner(model, ids, new_tokens, mode == "compiled", cpu, kv_dtype)
                    runners[(label, mode, kv_dtype)] = (runner, model)
        prefill: dict = {k: [] for k in runners}
        decode: dict = {k: [] for k in runners}
        total: dict = {k: [] for k in runners}
        outputs = {}
        for run, _ in runners.values():
            for _ in range(warmup):
                run()
        for _ in range(repeats):
            for key, (run, _) in runners.items():
                stamps, outputs[key] = run()
                prefill[key].append(stamps[0])
                decode[key].append(batch * (len(stamps) - 1) / (stamps[-1] - stamps[0]))
                total[key].append(batch * len(stamps) / stamps[-1])
        # our CLA1 copy must decode exactly what transformers decodes (fp32; ties may flip in 16-bit);
        # an 8-bit cache is checked against the same reference, and may differ
        reference = next((outputs[k] for k in outputs if k[0] == "transformers"), None)
        if reference is not None:
            references[batch] = reference.cpu()
            checks[batch] = {f"{k[0]}/{k[1]}/{k[2]}": bool(torch.equal(out, reference))
                             for k, out in outputs.items() if k[0] in ("transformers", "CLA1")}
        for key, (_, model) in runners.items():
            step_bytes = bytes_per_decode_step(model, model.config, batch, int(context), key[2])
            roofline = batch * bandwidth / step_bytes
            tps = statistics.median(decode[key])
            rows.append({"model": key[0], "path": key[1], "kv_dtype": kv_dtype_name(key[2], next(model.parameters()).dtype),
                         "batch": batch, "prompt": prompt_len, "new_tokens": new_tokens,
                         "kv_bytes_per_token": kv_bytes_per_token(model.config, kv_dtype_name(
                             key[2], next(model.parameters()).dtype)),
                         "prefill_ms": 1e3 * statistics.median(prefill[key]), "decode_tokens_per_s": tps,
                         "decode_tokens_per_s_all": decode[key], "e2e_tokens_per_s": statistics.median(total[key]),
                         "bytes_per_step": step_bytes, "roofline_tokens_per_s": roofline, "bw_util": tps / roofline})
    dtype = str(next(cla.parameters()).dtype).replace("torch.", "")
    result = {"benchmark": "decode", "device": device_name(device), "torch": torch.__version__, "preset": preset,
              "dtype": dtype, "bandwidth_bytes_per_s": bandwidth, "rows": rows,
              "greedy_equal_to_transformers": checks, **machine_fields(device)}
    if vllm_python:  # a reference only: its failure is reported, not raised, so our figures are kept
        try:
            vllm = vllm_reference(llama, prompts, new_tokens, repeats, vllm_python)
        except (CrossLayerError, OSError, subprocess.TimeoutExpired) as e:
            vllm, result["vllm_error"] = {"version": None}, str(e)
        result["vllm_version"] = vllm.pop("version")
        for batch, r in vllm.items():
            rows.append({"model": "vLLM", "path": "offline", "kv_dtype": r["dtype"], "batch": batch,
                         "prompt": prompt_len, "new_tokens": new_tokens, "e2e_tokens_per_s": r["tokens_per_s"],
                         "e2e_tokens_per_s_all": r["tokens_per_s_all"]})
            if batch in references:
                checks[batch]["vLLM"] = r["tokens"] == references[batch][:, prompt_len:].tolist()
    result["ratios"] = _ratios(rows, preset)
    return result


def _ratios(rows: list[dict], preset: str) -> list[dict]:
    """Per batch and KV dtype: each of our models on its fastest path (CLA1's and the CLA model's chosen
    apart) over each transformers path, and the CLA model over CLA1."""
    out = []
    keys = sorted({(r["batch"], r["kv_dtype"]) for r in rows if r["model"] == preset})
    for batch, kv in keys:
        ours = [r for r in rows if r["batch"] == batch and r["kv_dtype"] == kv and r["model"] in (preset, "CLA1")]
        best = {m: max((r for r in ours if r["model"] == m), key=lambda r: r["decode_tokens_per_s"])
                for m in (preset, "CLA1")}
        cla, cla1 = best[preset]["decode_tokens_per_s"], best["CLA1"]["decode_tokens_per_s"]
        entry = {"batch": batch, "kv_dtype": kv, "fastest_path": best[preset]["path"],
                 "fastest_path_cla1": best["CLA1"]["path"], "cla_over_cla1": cla / cla1}
        for r in rows:
            if r["batch"] == batch and r["model"] == "transformers":
                entry[f"cla1_over_{r['path']}"] = cla1 / r["decode_tokens_per_s"]
                entry[f"cla_over_{r['path']}"] = cla / r["decode_tokens_per_s"]
        out.append(entry)
    return out


def profile_decode(models: tuple, batch: int, prompt_len: int, new_tokens: int, device: torch.device,
                   out_dir: Path, rows: int = 25, compile: bool = False) -> list[Path]:
    """torch.profiler tables (self time per op) of one decode by transformers (eager, and static-compiled
    with `compile`) and by ours (eager, and compiled with `compile`), written to out_dir."""
    from torch.profiler import ProfilerActivity, profile

    llama, cla1, _ = models
    ids = torch.randint(0, cla1.config.vocab_size, (batch, prompt_len), device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out_dir.mkdir(parents=True, exist_ok=True)
    cpu = CPUDecoding()
    runs = [("transformers", _hf_runner(llama, ids, new_tokens)),
            ("ours-eager", _our_runner(cla1, ids, new_tokens, False, cpu))]
    if compile:
        runs += [("transformers-static-compiled", _hf_runner(llama, ids, new_tokens, "static-compiled")),
                 ("ours-compiled", _our_runner(cla1, ids, new_tokens, True, cpu))]
    paths = []
    for name, run in runs:
        run()
        with profile(activities=activities) as prof:
            run()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        path = out_dir / f"profile-{name}-b{batch}.txt"
        path.write_text(prof.key_averages().table(sort_by=sort, row_limit=rows))
        paths.append(path)
    return paths
