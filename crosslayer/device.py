"""Devices and dtypes: the ground floor every other module may import.

One table of dtype names (flags, recipes, suite configs and the library all read it), one of the
names a KV cache may be stored as, picking a device and a compute dtype, waiting for queued device
work before a clock is read, and a human name of the device for benchmark reports.
"""

from __future__ import annotations

import functools
import platform
import time
from pathlib import Path

import torch

from .errors import CrossLayerError

# the dtypes weights and activations may have, by their short names
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# torch's (and vLLM's) long names for the same dtypes, accepted wherever a short one is
LONG_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
DTYPE_CHOICES = ("auto", *DTYPES)
# 8-bit formats a KV cache may store (values with scales, crosslayer.quant)
EIGHT_BIT = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
# what a KV cache may be stored as; auto: the weights' dtype
KV_DTYPES = ("auto", *DTYPES, *EIGHT_BIT)
# bytes of one element, by every name above (the KV arithmetic's table)
ELEMENT_BYTES: dict[str, int] = {
    **{name: dtype.itemsize for name, dtype in DTYPES.items()},
    **{long: DTYPES[short].itemsize for long, short in LONG_NAMES.items()},
    **{name: dtype.itemsize for name, dtype in EIGHT_BIT.items()},
}


def dtype_by_name(name: str) -> torch.dtype:
    """torch dtype of a name such as `bf16` or `float32`."""
    short = LONG_NAMES.get(name, name)
    if short not in DTYPES:
        raise CrossLayerError(f"dtype must be one of {', '.join(DTYPE_CHOICES[1:])}; got {name!r}")
    return DTYPES[short]


def dtype_name(dtype: torch.dtype) -> str:
    """The short name (fp32, bf16, fp16, int8, fp8) of a torch dtype."""
    for name, known in {**DTYPES, **EIGHT_BIT}.items():
        if known == dtype:
            return name
    raise CrossLayerError(f"no short name for {dtype}")


def kv_storage_dtype(kv_dtype: str | None, dtype: torch.dtype) -> torch.dtype:
    """The dtype a cache stores K/V in: the model's (`auto`/None), a float dtype, or an 8-bit format's."""
    if kv_dtype in (None, "auto"):
        return dtype
    if kv_dtype in EIGHT_BIT:
        return EIGHT_BIT[kv_dtype]
    if kv_dtype not in DTYPES:
        raise CrossLayerError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}; got {kv_dtype!r}")
    return DTYPES[kv_dtype]


def pick_device(name: str | torch.device = "auto") -> torch.device:
    """`auto`: the first CUDA device if there is one, else the CPU; or any name torch accepts (cpu, cuda:1)."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CrossLayerError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CrossLayerError(f"device {name!r} asked for, but this torch sees no CUDA device")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA, fp32 on CPU; else the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype_by_name(name)


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype heavy matrix work runs in (training's autocast, plan search): `auto` is bf16 on CUDA and on
    CPUs with bf16 matrix units (`has_bf16_matrix_units`), else fp32; or the named dtype. (`pick_dtype`'s
    auto, for weights a user loads, stays fp32 on every CPU.)"""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" or has_bf16_matrix_units() else torch.float32
    return dtype_by_name(name)


def sync(device: torch.device) -> None:
    """Wait for queued device work, so a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpuinfo(field: str) -> str | None:
    """The value of the first `field` line of /proc/cpuinfo (None where there is none)."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith(field))
    except (OSError, StopIteration):
        return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's answer is often just `x86_64` on Linux)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


# /proc/cpuinfo flags that name matrix units for 16-bit and 8-bit GEMMs (x86-64)
MATRIX_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    return set((_cpuinfo("flags") or "").split())


def has_bf16_matrix_units() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX or AVX512-BF16), so bf16 training pays."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def gemm_gflops(dtype: torch.dtype, n: int = 2048, seconds: float = 0.2) -> float:
    """Measured GFLOP/s of an (n x n) @ (n x n) product in `dtype` on the CPU with torch's threads."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up: first-call set-up, packing buffers
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or runs < 3:
        a @ b
        runs += 1
    return 2 * n**3 * runs / elapsed / 1e9


@functools.cache
def cpu_capabilities() -> dict:
    """What this CPU offers matrix work, measured once per process: its model, threads, matrix-unit
    flags and the GEMM GFLOP/s of fp32 and bf16 (benchmarks carry this beside every figure)."""
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "features": sorted(f for f in MATRIX_FLAGS if f in flags),
        "bf16_matrix_units": has_bf16_matrix_units(),
        "gemm_gflops": {name: round(gemm_gflops(DTYPES[name]), 1) for name in ("fp32", "bf16")},
    }


def device_name(device: torch.device) -> str:
    """A human name of the device, for benchmark reports."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} CPU, {torch.get_num_threads()} threads"
