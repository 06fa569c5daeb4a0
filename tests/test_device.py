"""The ground floor: dtype tables and the CPU's capabilities, against torch and /proc/cpuinfo read here."""

from pathlib import Path

import pytest
import torch

from crosslayer.device import (
    DTYPES,
    ELEMENT_BYTES,
    KV_DTYPES,
    cpu_capabilities,
    dtype_by_name,
    dtype_name,
    kv_storage_dtype,
)
from crosslayer.errors import CrossLayerError


def test_dtype_tables_agree_with_torch():
    for long in ("float32", "bfloat16", "float16"):
        assert dtype_by_name(long) == getattr(torch, long)
        assert ELEMENT_BYTES[long] == getattr(torch, long).itemsize
    assert {dtype_name(d) for d in DTYPES.values()} == set(DTYPES)
    assert kv_storage_dtype("int8", torch.float32) == torch.int8
    assert kv_storage_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert ELEMENT_BYTES["fp8"] == 1 and set(KV_DTYPES) >= {"auto", "fp32", "bf16", "fp16", "int8", "fp8"}
    with pytest.raises(CrossLayerError, match="kv_dtype must be one of"):
        kv_storage_dtype("int4", torch.float32)


def test_cpu_capabilities_read_this_cpu():
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        pytest.skip("no /proc/cpuinfo")
    flags = next(line for line in info.read_text().splitlines() if line.startswith("flags")).split()
    caps = cpu_capabilities()
    assert caps["bf16_matrix_units"] == ("amx_bf16" in flags or "avx512_bf16" in flags)
    assert all(f in flags for f in caps["features"])
    assert caps["gemm_gflops"]["fp32"] > 1 and caps["gemm_gflops"]["bf16"] > 1
    assert cpu_capabilities() is caps  # measured once per process
