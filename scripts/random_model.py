"""Write a random transformers Llama / Qwen2 checkpoint of a named shape, in bf16, never holding the model in memory.

    python scripts/random_model.py tinyllama-1.1b runs/random-1.1b          # 2.3 GB, 2 shards
    python scripts/random_model.py llama2-7b runs/random-7b                 # 13.8 GB, 7 shards
    python scripts/random_model.py tiny runs/random-tiny --layers 3 --max-shard-size 100KB
    python scripts/random_model.py --list                                   # the shapes, their bytes

The folder is what `save_pretrained` writes for a bf16 model: config.json, generation_config.json,
model-0000i-of-0000N.safetensors + model.safetensors.index.json (model.safetensors when one shard
holds everything), plus a tokenizer: by default SmolLM2-135M's (49,152 tokens, read from the shared
GGUF), so every shape has vocab_size 49152 — Llama-2-7B's real vocabulary is 32,000 (its shape here
has 201M more embedding/head parameters, 13.76 GB instead of 13.48 GB). `--tokenizer` takes another
folder (its tokenizer files copied byte for byte) or GGUF file; `--vocab` must then cover it.

Weights: every matrix (and Qwen2's q/k/v biases) N(0, 0.02^2), every RMSNorm scale 1. Each tensor
has its own generator seeded from (--seed, its name), so the values do not depend on the shard size.
Tensors are generated a chunk of 16M values at a time and written straight into a safetensors file
laid out exactly as safetensors.torch.save_file lays it out (tensors sorted by name, 8-byte aligned
header), so this process's RSS stays ~0.2 GB whatever the model's size (the written bytes sit in the
page cache, not in RSS). Shards are filled in state_dict order up to --max-shard-size (as
transformers does). Everything is written into OUT.partial-<pid> and renamed to OUT at the end.
Prints the bytes written, the time and this process's peak RSS; the last line is one JSON object.
"""

import argparse
import hashlib
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = REPO.parent / "shared" / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
STD = 0.02
CHUNK = 1 << 24  # values generated at once: 64 MB of fp32, 32 MB of bf16

# name -> the source model's shape (vocabulary: SmolLM2's 49,152, see the docstring)
SHAPES = {
    "tiny": dict(arch="llama", layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16,
                 vocab=49152, max_positions=2048, rms_eps=1e-5, rope_theta=10000.0),
    "tinyllama-1.1b": dict(arch="llama", layers=22, hidden=2048, intermediate=5632, heads=32, kv_heads=4,
                           head_dim=64, vocab=49152, max_positions=2048, rms_eps=1e-5, rope_theta=10000.0),
    "llama2-7b": dict(arch="llama", layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32,
                      head_dim=128, vocab=49152, max_positions=4096, rms_eps=1e-5, rope_theta=10000.0),
    "qwen2-7b": dict(arch="qwen2", layers=28, hidden=3584, intermediate=18944, heads=28, kv_heads=4,
                     head_dim=128, vocab=49152, max_positions=32768, rms_eps=1e-6, rope_theta=1000000.0),
}
OVERRIDES = ("layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab")


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000 (transformers' max_shard_size units: KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    t = text.strip().lower()
    for suffix, scale in units.items():
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * scale)
    return int(t)


def tensor_shapes(s: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every weight, in LlamaForCausalLM / Qwen2ForCausalLM state_dict order."""
    d, q, kv = s["hidden"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    out = [("model.embed_tokens.weight", (s["vocab"], d))]
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (q, d))]
        if s["arch"] == "qwen2":
            out += [(p + "self_attn.q_proj.bias", (q,))]
        out += [(p + "self_attn.k_proj.weight", (kv, d))]
        if s["arch"] == "qwen2":
            out += [(p + "self_attn.k_proj.bias", (kv,))]
        out += [(p + "self_attn.v_proj.weight", (kv, d))]
        if s["arch"] == "qwen2":
            out += [(p + "self_attn.v_proj.bias", (kv,))]
        out += [(p + "self_attn.o_proj.weight", (d, q)),
                (p + "mlp.gate_proj.weight", (s["intermediate"], d)),
                (p + "mlp.up_proj.weight", (s["intermediate"], d)),
                (p + "mlp.down_proj.weight", (d, s["intermediate"])),
                (p + "input_layernorm.weight", (d,)),
                (p + "post_attention_layernorm.weight", (d,))]
    return out + [("model.norm.weight", (d,)), ("lm_head.weight", (s["vocab"], d))]


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def plan_shards(tensors: list[tuple[str, tuple[int, ...]]], max_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors in order, a new shard whenever the next one would take the current one past max_bytes."""
    shards, current, size = [], [], 0
    for name, shape in tensors:
        nbytes = 2 * numel(shape)
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    return shards + [current]


def generator_for(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def write_tensor_data(f, name: str, shape: tuple[int, ...], seed: int) -> None:
    """The bf16 bytes of one tensor, CHUNK values at a time: ones for norm scales, N(0, STD^2) otherwise."""
    n = numel(shape)
    if name.endswith("norm.weight"):
        ones = torch.ones(min(n, CHUNK), dtype=torch.bfloat16).view(torch.int16).numpy()
        for start in range(0, n, CHUNK):
            f.write(ones[: min(CHUNK, n - start)])
        return
    g = generator_for(seed, name)
    buf = torch.empty(min(n, CHUNK), dtype=torch.float32)
    for start in range(0, n, CHUNK):
        chunk = buf[: min(CHUNK, n - start)].normal_(0.0, STD, generator=g)
        f.write(chunk.to(torch.bfloat16).view(torch.int16).numpy())  # little-endian bf16 bytes


def safetensors_header(tensors: list[tuple[str, tuple[int, ...]]]) -> tuple[bytes, list[tuple[str, tuple[int, ...]]]]:
    """The header safetensors.torch.save_file writes for these bf16 tensors (sorted by name, padded with spaces
    to 8 bytes, preceded by its little-endian u64 length), and the tensors in file order."""
    ordered = sorted(tensors)
    entries, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in ordered:
        nbytes = 2 * numel(shape)
        entries[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header, ordered


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int) -> int:
    header, ordered = safetensors_header(tensors)
    with open(path, "wb") as f:
        f.write(header)
        for name, shape in ordered:
            write_tensor_data(f, name, shape, seed)
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def load_tokenizer(src: Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if src.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    return AutoTokenizer.from_pretrained(str(src))


def write_config(folder: Path, s: dict, tokenizer) -> None:
    from transformers import GenerationConfig, LlamaConfig, Qwen2Config

    fields = dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                  num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                  head_dim=s["head_dim"], max_position_embeddings=s["max_positions"], rms_norm_eps=s["rms_eps"],
                  tie_word_embeddings=False,
                  initializer_range=STD, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id,
                  rope_parameters={"rope_type": "default", "rope_theta": s["rope_theta"]})
    if s["arch"] == "qwen2":
        config = Qwen2Config(**fields, use_sliding_window=False)
        config.architectures = ["Qwen2ForCausalLM"]
    else:
        config = LlamaConfig(**fields)
        config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.bfloat16
    config.save_pretrained(folder)
    GenerationConfig.from_model_config(config).save_pretrained(folder)


def copy_tokenizer(src: Path, folder: Path, tokenizer) -> list[str]:
    if src.is_dir():
        names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
        for n in names:
            shutil.copyfile(src / n, folder / n)
        return names
    before = set(os.listdir(folder))
    tokenizer.save_pretrained(folder)
    return sorted(set(os.listdir(folder)) - before)


def human(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("shape", nargs="?", choices=sorted(SHAPES))
    ap.add_argument("out", nargs="?", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-shard-size", default="2GB", help="per shard (default 2GB; KB/MB/GB as in transformers)")
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="folder or .gguf file (default: SmolLM2's)")
    ap.add_argument("--list", action="store_true", help="print the shapes and their sizes, write nothing")
    for key in OVERRIDES:
        ap.add_argument("--" + key.replace("_", "-"), type=int, help=f"override the shape's {key}")
    args = ap.parse_args(argv)
    if args.list:
        for name, s in SHAPES.items():
            shapes = tensor_shapes(s)
            n = sum(numel(x) for _, x in shapes)
            print(f"{name:16s} {s['arch']:6s} {s['layers']:3d} layers  d {s['hidden']:5d}  ff {s['intermediate']:6d}  "
                  f"heads {s['heads']:3d}/{s['kv_heads']:<3d} head_dim {s['head_dim']:4d}  vocab {s['vocab']}  "
                  f"{n / 1e6:9.1f}M params  {human(2 * n)}")
        return {}
    if args.shape is None or args.out is None:
        ap.error("give SHAPE and OUT (or --list)")
    s = dict(SHAPES[args.shape])
    s.update({k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None})
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        sys.exit(f"error: {out} exists and is not an empty folder")
    shards = plan_shards(tensor_shapes(s), parse_size(args.max_shard_size))
    total = sum(2 * numel(x) for shard in shards for _, x in shard)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < total + 200_000_000:
        sys.exit(f"error: {human(total)} of weights do not fit in the {human(free)} free under {out.parent}")

    start = time.perf_counter()
    tokenizer = load_tokenizer(args.tokenizer)
    if len(tokenizer) > s["vocab"]:
        sys.exit(f"error: the tokenizer of {args.tokenizer} has {len(tokenizer)} tokens, more than vocab {s['vocab']}")
    tmp = out.parent / f"{out.name}.partial-{os.getpid()}"
    tmp.mkdir()
    try:
        write_config(tmp, s, tokenizer)
        tokenizer_files = copy_tokenizer(args.tokenizer, tmp, tokenizer)
        names = ["model.safetensors"] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        written, weight_map = 0, {}
        for shard, fname in zip(shards, names, strict=True):
            t0 = time.perf_counter()
            nbytes = write_shard(tmp / fname, shard, args.seed)
            written += nbytes
            weight_map.update({name: fname for name, _ in shard})
            print(f"{fname}: {len(shard)} tensors, {human(nbytes)} in {time.perf_counter() - t0:.1f} s", flush=True)
        if len(shards) > 1:
            params = sum(numel(x) for shard in shards for _, x in shard)
            index = {"metadata": {"total_parameters": params, "total_size": total},
                     "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    wall = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = total // 2
    print(f"{out}: {args.shape} ({s['arch']}, {s['layers']} layers, d {s['hidden']}, vocab {s['vocab']}), "
          f"{params / 1e6:.1f}M params, {written:,} bytes written ({human(written)} in {len(shards)} shards, "
          f"weights {total:,} bytes), {wall:.1f} s, {written / wall / 1e6:.0f} MB/s, peak RSS of this process "
          f"{human(peak_rss)}")
    result = {"out": str(out), "shape": args.shape, **s, "seed": args.seed, "parameters": params,
              "weight_bytes": total, "bytes_written": written, "shards": len(shards), "wall_s": round(wall, 2),
              "peak_rss_bytes": peak_rss, "tokenizer": str(args.tokenizer), "tokenizer_files": tokenizer_files}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
