"""Serving throughput under vLLM at a fixed KV-cache budget: a CLA model against its dense twin.

Each variant (a model folder, a KV-cache dtype) is served by vLLM's offline engine (V1, in this
process) with exactly `budget` bytes of KV pages, for each budget. The same seeded workload runs on
every one: `requests` requests, all queued at once (an offline batch), with prompt and output
lengths drawn uniformly from the given ranges; random prompt tokens, greedy decoding with
`ignore_eos`, so every request produces exactly its output length. A short warm-up request runs
first. Per run: wall time from the first engine step to the last, requests/s, output tokens/s,
the KV capacity vLLM allocated (tokens), the peak number of requests running at once (sampled
after every engine step) and the preemptions vLLM counted (requests pushed out of their KV pages
and recomputed later). With a budget that binds, capacity caps concurrency: CLA2 holds twice the
sequences of its twin, and fp8 twice again. Needs vLLM (`bash scripts/vllm-env.sh VENV`).

`twin_models` writes random-weight models of a shape (the SmolLM2-135M shape by default) for a
workload whose lengths do not depend on what the model says; `run_serve` returns one dict (rows,
ratios, the machine's name and its capabilities, `crosslayer.bench.machine`); `plot` draws output
tokens/s against the budget.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from ..config import CLAConfig
from ..device import device_name
from ..errors import CrossLayerError
from ..modeling import CLAForCausalLM
from ..serving.offline import kv_capacity_tokens, offline_engine
from .machine import machine_fields

log = logging.getLogger(__name__)

# SmolLM2-135M's shape (../shared/models/smollm2-135m-instruct): GQA3, tied embeddings
SMOLLM2_SHAPE: dict[str, Any] = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
)
VLLM_KV_DTYPES = ("auto", "fp8")  # vLLM's names: auto = the model's dtype


def twin_models(folder: str | Path, shape: dict[str, Any] | None = None, cla_factor: int = 2, dtype: str = "bfloat16",
                seed: int = 0) -> dict[str, Path]:
    """Random-weight CLA1 and CLA<cla_factor> (uniform) models of `shape`, saved under FOLDER: {name: path}.

    Existing folders are reused (they are deterministic in `seed`)."""
    shape = dict(shape or SMOLLM2_SHAPE)
    out = {}
    for factor in (1, cla_factor):
        name = f"cla{factor}"
        path = Path(folder) / name
        if not (path / "config.json").exists():
            log.info(f"building {name} ({shape['num_hidden_layers']} layers, random weights) in {path}")
            torch.manual_seed(seed)
            model = CLAForCausalLM(CLAConfig(**shape, cla_factor=factor)).to(getattr(torch, dtype))
            model.save_pretrained(path)
            del model
        out[name] = path
    return out


def make_workload(requests: int, prompt_len: tuple[int, int], output_len: tuple[int, int], vocab_size: int,
                  seed: int = 0) -> list[tuple[list[int], int]]:
    """`requests` (prompt token ids, output length) pairs, lengths uniform in the inclusive ranges."""
    rng = random.Random(seed)
    work = []
    for _ in range(requests):
        n = rng.randint(*prompt_len)
        work.append(([rng.randrange(vocab_size) for _ in range(n)], rng.randint(*output_len)))
    return work


def _counter(llm, name: str) -> float:
    """A Prometheus counter of the engine (`vllm:num_preemptions` ...), summed over its label sets."""
    return sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == name)


def run_one(folder: Path, budget: int, kv_cache_dtype: str, workload: list[tuple[list[int], int]], dtype: str,
            max_num_seqs: int, enforce_eager: bool, block_size: int | None = None) -> dict[str, Any]:
    """Serve `workload` once with vLLM on `folder` with `budget` bytes of KV pages; measurements as a dict."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    max_len = max(len(p) + n for p, n in workload)
    with offline_engine(folder, dtype=dtype, kv_cache_dtype=kv_cache_dtype, kv_cache_memory_bytes=budget,
                        max_model_len=max_len, max_num_seqs=max_num_seqs, enforce_eager=enforce_eager,
                        enable_prefix_caching=False, skip_tokenizer_init=True, disable_log_stats=False, seed=0,
                        **({"block_size": block_size} if block_size else {})) as llm:
        engine = llm.llm_engine
        # warm-up: one short request through prefill and decode
        llm.generate([TokensPrompt(prompt_token_ids=workload[0][0][:16])],
                     SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False), use_tqdm=False)
        preempted_before = _counter(llm, "vllm:num_preemptions")
        for i, (prompt, n) in enumerate(workload):
            engine.add_request(f"bench-{i}", TokensPrompt(prompt_token_ids=prompt),
                               SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False))
        scheduler = engine.engine_core.engine_core.scheduler  # in-process engine: its scheduler, for concurrency
        out_tokens, peak, steps = 0, 0, 0
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    out_tokens += len(output.outputs[0].token_ids)
            peak = max(peak, len(scheduler.running))
            steps += 1
        wall = time.perf_counter() - start
        return {
            "kv_capacity_tokens": kv_capacity_tokens(llm), "block_size": engine.vllm_config.cache_config.block_size,
            "wall_s": wall, "steps": steps, "requests_per_s": len(workload) / wall,
            "output_tokens_per_s": out_tokens / wall, "output_tokens": out_tokens, "peak_running": peak,
            "preemptions": int(_counter(llm, "vllm:num_preemptions") - preempted_before),
        }


def prompt_perplexity(folder: str | Path, windows: list[list[int]], kv_cache_dtype: str = "auto",
                      dtype: str = "bfloat16", budget: int = 256 << 20) -> dict[str, Any]:
    """Perplexity of `windows` (token id lists) as vLLM scores them (prompt logprobs), with this KV-cache dtype.

    vLLM's prefill writes each window's K/V to the cache and attends from there, so an fp8 cache
    shows in these numbers as it would in generation."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    with offline_engine(folder, dtype=dtype, kv_cache_dtype=kv_cache_dtype, kv_cache_memory_bytes=budget,
                        max_model_len=max(len(w) for w in windows) + 1, enforce_eager=True,
                        enable_prefix_caching=False, skip_tokenizer_init=True, seed=0) as llm:
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params, use_tqdm=False)
        nll, count = 0.0, 0
        for window, out in zip(windows, outs, strict=True):
            for token, logprobs in zip(window[1:], out.prompt_logprobs[1:], strict=True):  # position 0 has no prediction
                nll -= logprobs[token].logprob
                count += 1
        capacity = kv_capacity_tokens(llm)
    return {"perplexity": math.exp(nll / count), "tokens": count, "kv_cache_dtype": kv_cache_dtype, "dtype": dtype,
            "budget_bytes": budget, "kv_capacity_tokens": capacity}


def run_serve(models: dict[str, Path], budgets: list[int], kv_cache_dtypes: tuple[str, ...] = VLLM_KV_DTYPES,
              requests: int = 256, prompt_len: tuple[int, int] = (128, 512), output_len: tuple[int, int] = (32, 256),
              dtype: str = "bfloat16", max_num_seqs: int = 256, enforce_eager: bool = True, seed: int = 0,
              baseline: str | None = None) -> dict[str, Any]:
    """Serve one seeded workload with every model x KV dtype x budget; rows, ratios to `baseline`.

    `models`: {name: folder}, e.g. from `twin_models`; `baseline`: the name the ratios divide by
    (default: the first), at KV dtype `auto`.
    """
    try:
        import vllm
    except ImportError:
        raise CrossLayerError("bench serve needs vLLM: build its environment with scripts/vllm-env.sh") from None
    for kv in kv_cache_dtypes:
        if kv not in VLLM_KV_DTYPES:
            raise CrossLayerError(f"KV-cache dtype must be one of {', '.join(VLLM_KV_DTYPES)}; got {kv!r}")
    if not models:
        raise CrossLayerError("bench serve needs at least one model")
    configs = {name: CLAConfig.from_pretrained(path) for name, path in models.items()}
    vocab = min(c.vocab_size for c in configs.values())
    workload = make_workload(requests, prompt_len, output_len, vocab, seed)
    baseline = baseline or next(iter(models))
    # before any engine starts: on a CPU this measures its GEMM peaks (once per process), undisturbed by vLLM's threads
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine = machine_fields(device)
    rows = []
    for budget in budgets:
        for name, path in models.items():
            for kv in kv_cache_dtypes:
                log.info(f"{name} kv={kv} budget={budget / 2**20:g} MiB: {requests} requests ...")
                row = {"model": name, "kv_cache_dtype": kv, "budget_bytes": budget,
                       "producer_layers": configs[name].num_producer_layers,
                       "num_layers": configs[name].num_hidden_layers}
                row.update(run_one(path, budget, kv, workload, dtype, max_num_seqs, enforce_eager))
                log.info(f"  {row['output_tokens_per_s']:.1f} output tok/s, peak {row['peak_running']} running, "
                         f"{row['preemptions']} preemptions, capacity {row['kv_capacity_tokens']:,} tokens")
                rows.append(row)
    for row in rows:
        base = next(r for r in rows if r["model"] == baseline and r["kv_cache_dtype"] == "auto"
                    and r["budget_bytes"] == row["budget_bytes"]) if "auto" in kv_cache_dtypes else None
        if base is not None:
            row["capacity_vs_baseline"] = row["kv_capacity_tokens"] / base["kv_capacity_tokens"]
            row["throughput_vs_baseline"] = row["output_tokens_per_s"] / base["output_tokens_per_s"]
    return {
        "benchmark": "serve", "engine": f"vllm {vllm.__version__}", "dtype": dtype, "baseline": baseline,
        "requests": requests, "prompt_len": list(prompt_len), "output_len": list(output_len), "seed": seed,
        "max_num_seqs": max_num_seqs, "enforce_eager": enforce_eager,
        "models": {name: {"path": str(path), "kv_sources": configs[name].kv_sources} for name, path in models.items()},
        "machine": device_name(device), "rows": rows, **machine,
    }


def plot(result: dict[str, Any], path: str | Path) -> None:
    """Output tokens/s against the KV budget, one line per model x KV dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    series: dict[str, list[tuple[float, float]]] = {}
    for r in result["rows"]:
        label = r["model"] + ("" if r["kv_cache_dtype"] == "auto" else f" + {r['kv_cache_dtype']} KV")
        series.setdefault(label, []).append((r["budget_bytes"] / 2**20, r["output_tokens_per_s"]))
    for label, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV-cache budget (MiB)")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"vLLM offline serving, {result['requests']} requests ({result['machine']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
