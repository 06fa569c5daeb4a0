"""What every benchmark reports about the machine it ran on: JSON fields beside its figures, and the
line its table's header prints.

On a CPU: `"cpu": crosslayer.device.cpu_capabilities()` (model, threads, matrix-unit flags and the
measured fp32/bf16 GEMM GFLOP/s, measured once per process). On CUDA: `"gpu"` (name, compute
capability, memory, the dense bf16 peak where `bench.train.PEAK_BF16` knows it) and `"host_cpu"`,
the host CPU read from /proc/cpuinfo without any GEMM measured (a GPU benchmark pays nothing for it).
"""

from __future__ import annotations

import torch

from ..device import MATRIX_FLAGS, cpu_capabilities, cpu_flags, cpu_model, has_bf16_matrix_units


def host_cpu() -> dict:
    """The CPU's model, torch's threads and its matrix-unit flags: `cpu_capabilities()` without the GEMMs (cheap)."""
    flags = cpu_flags()
    return {"cpu": cpu_model(), "threads": torch.get_num_threads(),
            "features": sorted(f for f in MATRIX_FLAGS if f in flags), "bf16_matrix_units": has_bf16_matrix_units()}


def gpu_info(device: torch.device) -> dict:
    """A CUDA device's name, compute capability, memory and (where known) dense bf16 peak FLOP/s."""
    from .train import PEAK_BF16

    props = torch.cuda.get_device_properties(device)
    info = {"name": props.name, "compute_capability": f"{props.major}.{props.minor}", "memory_bytes": props.total_memory,
            "multiprocessors": props.multi_processor_count}
    peak = next((v for k, v in PEAK_BF16.items() if k in props.name), None)
    if peak:
        info["peak_bf16_flops"] = peak
    return info


def machine_fields(device: torch.device) -> dict:
    """The fields a benchmark's JSON carries about `device`: {"cpu": ...} or {"gpu": ..., "host_cpu": ...}."""
    if device.type == "cuda":
        return {"gpu": gpu_info(device), "host_cpu": host_cpu()}
    return {"cpu": cpu_capabilities()}


def _cpu_words(cpu: dict) -> str:
    words = f"{cpu['cpu']}, {cpu['threads']} threads, matrix features: {' '.join(cpu['features']) or 'none'}"
    gemm = cpu.get("gemm_gflops")
    if gemm:
        words += "; GEMM " + ", ".join(f"{v:,.0f} GFLOP/s {k}" for k, v in gemm.items())
    return words


def machine_line(result: dict) -> str:
    """One header line naming the machine of a benchmark's `result` (its `machine_fields`); '' if it has none."""
    if "cpu" in result:
        return f"CPU: {_cpu_words(result['cpu'])}"
    if "gpu" in result:
        gpu = result["gpu"]
        line = f"GPU: {gpu['name']} (compute {gpu['compute_capability']}, {gpu['memory_bytes'] / 2**30:.0f} GiB)"
        if "host_cpu" in result:
            line += f"; host CPU: {_cpu_words(result['host_cpu'])}"
        return line
    return ""
