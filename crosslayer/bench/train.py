"""Training throughput: our trainer against a plain loop over transformers' LlamaForCausalLM.

Every model sees the same batch shape, optimizer (AdamW, paper settings), gradient clipping, loss
(`crosslayer.losses.HeadLoss`) and precision (bf16 autocast on CUDA and on CPUs with bf16 matrix units,
else fp32; `dtype` overrides). Ours runs `Trainer.step()` — the exact code `crosslayer train`
runs, data loading included; the baseline is the loop a transformers user writes. Tokens are
random ids (throughput does not depend on them). Reports tokens/s, the ratios, and on CUDA the model
FLOPs utilisation. Prints a table, then one JSON line.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaForCausalLM

from ..config import CLAConfig, to_llama_config
from ..data import FORMAT_VERSION, token_dtype
from ..device import compute_dtype, cpu_capabilities, device_name, sync
from ..errors import CrossLayerError
from ..losses import HeadLoss
from ..train import TRAIN_DTYPES, TrainConfig, Trainer, causal_lm_loss, param_groups

# dense bf16 peak FLOP/s of accelerators we know; MFU is left out elsewhere
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L4": 121e12}


@dataclass
class TrainBench:
    """What `bench train` measures: our trainer on `presets` (the first a CLA1 shape) and the baseline."""

    presets: list[str]
    seq_len: int = 256
    micro_batch: int = 8
    accum: int = 1  # micro-batches per optimizer step
    steps: int = 5  # timed steps per repeat
    warmup: int = 2
    repeats: int = 3  # timed rounds, models interleaved; medians reported
    compile: bool = False  # torch.compile ours and the baseline
    baseline: bool = True  # transformers' Llama of the first preset's shape
    dtype: str = "auto"  # auto (the trainer's rule), fp32 or bf16


def flops_per_token(config: CLAConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x the weights of every matmul (forward 2, backward 4; the LM head
    included, the embedding lookup, norms and biases not) + 12 x layers x heads x head_dim x seq_len
    (attention scores and values, forward and backward; PaLM's accounting, no causal discount)."""
    d, hd, L = config.hidden_size, config.head_dim, config.num_hidden_layers
    q_out, kv_out = config.num_attention_heads * hd, config.num_key_value_heads * hd
    per_layer = 2 * d * q_out + 3 * d * config.intermediate_size  # q, o, gate, up, down
    matmul_weights = L * per_layer + config.num_producer_layers * 2 * d * kv_out + config.vocab_size * d
    attn = 12 * L * config.num_attention_heads * hd * seq_len
    return 6 * matmul_weights + attn


def _synthetic_dataset(folder: Path, vocab: int, tokens: int, seed: int = 0) -> None:
    """A prepared-dataset folder of random ids, so `Trainer` runs unchanged."""
    rng = np.random.default_rng(seed)
    dtype = token_dtype(vocab)
    for split, n in (("train", tokens), ("val", 4096)):
        rng.integers(0, vocab, n, dtype=np.int64).astype(dtype).tofile(folder / f"{split}.bin")
    meta = {"format": "crosslayer-tokens", "format_version": FORMAT_VERSION, "source": "synthetic",
            "tokenizer": "none", "vocab_size": vocab, "eos_token_id": 0, "dtype": dtype,
            "splits": {"train": {"file": "train.bin", "tokens": tokens}, "val": {"file": "val.bin", "tokens": 4096}}}
    (folder / "meta.json").write_text(json.dumps(meta))


def _time_interleaved(step_fns: list, steps: int, warmup: int, repeats: int, device: torch.device) -> list[list[float]]:
    """Seconds per step of each function: warm-up, then `repeats` rounds in which every function runs
    one timed block in turn, so drift of the machine (clocks, other load) hits all of them alike."""
    for fn in step_fns:
        for _ in range(warmup):
            fn()
    sync(device)
    times: list[list[float]] = [[] for _ in step_fns]
    for _ in range(repeats):
        for i, fn in enumerate(step_fns):
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            sync(device)
            times[i].append((time.perf_counter() - start) / steps)
    return times


def bench_bf16(args: TrainBench, device: torch.device) -> bool:
    """Whether the benchmark trains in bf16 autocast: `args.dtype` (auto: the trainer's rule)."""
    if args.dtype not in TRAIN_DTYPES:
        raise CrossLayerError(f"dtype must be one of {', '.join(TRAIN_DTYPES)}; got {args.dtype!r}")
    return compute_dtype(args.dtype, device) == torch.bfloat16


def ours_step(preset: str, data: Path, args, device: torch.device):
    """(step function, config): one optimizer step of our Trainer."""
    cfg = TrainConfig(model=preset, data=str(data), out="", seq_len=args.seq_len,
                      batch_tokens=args.seq_len * args.micro_batch * args.accum, micro_batch=args.micro_batch,
                      max_steps=10**6, device=str(device), compile=args.compile, progress=False,
                      dtype="bf16" if bench_bf16(args, device) else "fp32")
    trainer = Trainer(cfg)
    return trainer.step, trainer.model_config


def hf_llama_step(preset: str, args, device: torch.device):
    """(step function, config): one optimizer step of a plain loop over transformers' Llama."""
    ours = CLAConfig.from_preset(preset)
    if ours.num_producer_layers != ours.num_hidden_layers:
        raise CrossLayerError(f"the transformers baseline needs a CLA1 shape, {preset} shares K/V")
    config = to_llama_config(ours, args.seq_len)
    torch.manual_seed(0)
    model = HeadLoss(LlamaForCausalLM(config).to(device).train())  # the same chunked loss as our trainer's
    if args.compile:
        model = torch.compile(model)
    # the same optimizer groups and loss as our trainer, so only the models differ
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    bf16 = bench_bf16(args, device)
    rng = torch.Generator().manual_seed(0)

    def step() -> float:
        total = 0.0
        for _ in range(args.accum):
            batch = torch.randint(0, config.vocab_size, (args.micro_batch, args.seq_len + 1), generator=rng).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = causal_lm_loss(model, batch)
            (loss / args.accum).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(total / args.accum)

    return step, ours


def _row(name: str, config: CLAConfig, times: list[float], batch_tokens: int, args, device) -> dict:
    step_s = statistics.median(times)
    tps = batch_tokens / step_s
    row = {"name": name, "parameters": config.num_parameters(), "kv_bytes_per_token": config.kv_bytes_per_token(),
           "step_s": step_s, "tokens_per_s": tps, "tokens_per_s_best": batch_tokens / min(times), "step_s_all": times}
    peak = _peak(device)
    if peak:
        row["mfu"] = flops_per_token(config, args.seq_len) * tps / peak
    return row


def _peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def run_train_bench(args: TrainBench, device: torch.device) -> dict:
    """Time one optimizer step of each model, interleaved; returns the result (rows, ratios)."""
    presets = args.presets
    vocab = max(CLAConfig.from_preset(p).vocab_size for p in presets)
    batch_tokens = args.seq_len * args.micro_batch * args.accum
    with tempfile.TemporaryDirectory() as tmp:
        _synthetic_dataset(Path(tmp), vocab, tokens=max(2_000_000, 4 * batch_tokens))
        names, fns, configs = [], [], []
        if args.baseline:
            fn, config = hf_llama_step(presets[0], args, device)
            names.append(f"transformers Llama ({presets[0]} shape)"), fns.append(fn), configs.append(config)
        for preset in presets:
            fn, config = ours_step(preset, Path(tmp), args, device)
            names.append(f"crosslayer {preset}"), fns.append(fn), configs.append(config)
        times = _time_interleaved(fns, args.steps, args.warmup, args.repeats, device)
        rows = [_row(n, c, t, batch_tokens, args, device) for n, c, t in zip(names, configs, times, strict=True)]
    result = {"benchmark": "train", "device": device_name(device), "torch": torch.__version__,
              "seq_len": args.seq_len, "micro_batch": args.micro_batch, "accum": args.accum,
              "precision": "bf16-autocast" if bench_bf16(args, device) else "fp32", "compile": args.compile,
              "rows": rows}
    if device.type == "cpu":
        result["cpu"] = cpu_capabilities()
    ours = {r["name"].split(" ", 1)[1]: r for r in rows if r["name"].startswith("crosslayer ")}
    if args.baseline:
        result["ours_over_transformers"] = ours[presets[0]]["tokens_per_s"] / rows[0]["tokens_per_s"]
    if len(presets) > 1:
        result["second_over_first"] = ours[presets[1]]["tokens_per_s"] / ours[presets[0]]["tokens_per_s"]
    return result
