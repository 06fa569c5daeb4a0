"""Decoding on a CPU: the model's linear layers through oneDNN, and compiled decode steps with inductor's CPU options.

`CPUDecoding` is the state of one caller (a `fast_generate` call, a benchmark run): the weights it packed
into oneDNN's blocked layout and the batch rows they are packed for. Which weights a model's compiled
steps froze in is recorded on the model itself (torch keeps compiled code for the whole process, so the
record must live as long as the model, not as one caller). Importing this module registers nothing:
the op `crosslayer::packed_linear` is defined at the first `linears` block of the process.

oneDNN (`CPUDecoding.linears`): linears of at least `ONEDNN_MIN_ROWS` rows (and, eager, of large weights
such as an LM head) run through oneDNN's matmul instead of torch's default BLAS call, where oneDNN is
faster (docs/benchmarks.md has the measurements); a compiled step reads weights packed once into
oneDNN's layout, an eager one reads them as stored.

Compiled steps (`CPUDecoding.compile`): `CPU_COMPILE_OPTIONS` freeze the weights into the step as
constants, let inductor autotune the remaining (one-row) GEMMs and write the step's wrapper in C++.
A step with frozen weights runs the old ones after they change, so a step is compiled afresh when
the weights differ from those recorded on the model.
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# oneDNN for a linear with at least this many rows, or in eager mode this many weight elements; torch's own
# call (in a compiled step: inductor's autotuned GEMM) below both
ONEDNN_MIN_ROWS, ONEDNN_MIN_WEIGHT = 8, 1 << 20

# inductor on a CPU: the weights frozen into the compiled step as constants and prepacked, every GEMM
# autotuned between inductor's own C++ micro-kernels and ATen's (the micro-kernel reads a one-row GEMV
# faster than the BLAS call), and the step's wrapper compiled to C++ instead of run as Python
CPU_COMPILE_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                       "cpp_wrapper": True}

# the CPUDecoding whose `linears` block runs in this thread (or task): compiled code calls the op with
# tensors only, so the op finds that object's packed weights here; set and reset by the block itself
_RUNNING: ContextVar[CPUDecoding | None] = ContextVar("crosslayer_cpu_decoding", default=None)
# the attribute of a model that records (address, version) of the weights its compiled CPU steps froze in
FROZEN_ATTRIBUTE = "_crosslayer_frozen_weights"


def cpu_compile_options(options: dict | None = None):
    """Inductor's configuration patched with `options` (default `CPU_COMPILE_OPTIONS`) while inside. Given as
    `torch.compile(options=...)`, freezing and the autotuned GEMMs do not take effect (torch 2.13)."""
    return torch._inductor.config.patch(CPU_COMPILE_OPTIONS if options is None else options)


class CPUDecoding:
    """oneDNN linears and compiled decode steps on a CPU, for one caller.

    `options`: inductor's options for compiled steps (default `CPU_COMPILE_OPTIONS`, copied).
    """

    def __init__(self, options: dict | None = None) -> None:
        self.options = dict(CPU_COMPILE_OPTIONS if options is None else options)
        self.rows = ONEDNN_MIN_ROWS  # the rows weights are packed for (a hint: any number of rows runs on a pack)
        self.packed: dict[tuple, torch.Tensor] = {}  # (address, shape, version) of a weight -> its oneDNN copy

    @contextmanager
    def linears(self, model: torch.nn.Module, rows: int = ONEDNN_MIN_ROWS):
        """Run the model's `nn.Linear` layers through oneDNN while inside (CPU, fp32 or bf16 weights, no
        autograd); otherwise, and afterwards, as they were. A compiled step's linears read packed copies of
        the weights (packed for `rows` rows: the decode batch; the weights' size again), freed on the way out."""
        linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.device.type == "cpu"
                   and m.weight.dtype in (torch.float32, torch.bfloat16)]
        if not torch.backends.mkldnn.is_available() or torch.is_grad_enabled():
            linears = []
        if linears:
            _packed_linear_library()
        for m in linears:
            m.forward = types.MethodType(_onednn_forward, m)
        self.rows = max(rows, 1)
        running = _RUNNING.set(self)
        try:
            yield self
        finally:
            for m in linears:
                del m.forward  # back to nn.Linear.forward
            self.packed.clear()
            _RUNNING.reset(running)

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` reordered into oneDNN's blocked layout, once while inside `linears` (again if changed in place)."""
        key = (weight.data_ptr(), tuple(weight.shape), weight._version)
        packed = self.packed.get(key)
        if packed is None:
            packed = self.packed[key] = torch.ops.mkldnn._reorder_linear_weight(weight, self.rows)
        return packed

    def packed_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (N, in) @ weight.T (+ bias) by oneDNN on a CPU, on the packed copy of `weight`."""
        return torch.ops.mkldnn._linear_pointwise(x, self.pack(weight), bias, "none", [], "")

    def compile(self, step: Callable, model: torch.nn.Module) -> Callable:
        """`torch.compile` of a decode step of `model` on a CPU, whole graph, run under `self.options` (the
        weights frozen in: if they changed since a step of `model` was compiled, the compiled code is
        dropped first, `thaw_if_changed`)."""
        self.thaw_if_changed(model)
        compiled = torch.compile(step, fullgraph=True)

        def run(*args):  # compiled at the first call (and recompiled at new shapes): the options must hold then
            with cpu_compile_options(self.options):
                return compiled(*args)
        return run

    @staticmethod
    def thaw_if_changed(model: torch.nn.Module) -> None:
        """If `model`'s weights changed (in place, or replaced) since a step was compiled with them frozen in
        (the record on the model, `FROZEN_ATTRIBUTE`), drop the compiled code (`torch.compiler.reset()`,
        every compiled function of the process), so the next step compiles with the weights as they are
        instead of running old ones."""
        weights = tuple((p.data_ptr(), p._version) for p in model.parameters())
        if getattr(model, FROZEN_ATTRIBUTE, weights) != weights:
            logger.info("the model's weights changed since its decode step was compiled: recompiling")
            torch.compiler.reset()
        setattr(model, FROZEN_ATTRIBUTE, weights)


def _onednn_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # decided from shapes, so a compiled step settles it once while tracing: few rows of a small weight (any
    # weight, compiled) stay with torch (oneDNN's fixed cost per call dominates there, and inductor's own
    # GEMM micro-kernels read a one-row GEMV faster than the BLAS call); a compiled step packs (the
    # weights' size again, held while it runs), eager calls read the weights as stored
    rows = x.numel() // x.shape[-1]
    compiling = torch.compiler.is_compiling()
    if rows < ONEDNN_MIN_ROWS and (compiling or self.weight.numel() < ONEDNN_MIN_WEIGHT):
        return F.linear(x, self.weight, self.bias)
    shape, x = x.shape[:-1], x.reshape(rows, x.shape[-1]).contiguous()
    if compiling:
        out = torch.ops.crosslayer.packed_linear(x, self.weight, self.bias)  # (N, out)
    else:
        out = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
    return out.view(*shape, self.weight.shape[0])


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The op's CPU kernel: the running `linears` block's packed copy of `weight` (outside one, packed for the call)."""
    running = _RUNNING.get()
    if running is None:
        return CPUDecoding().packed_linear(x, weight, bias)
    return running.packed_linear(x, weight, bias)


def _packed_linear_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


@functools.cache
def _packed_linear_library() -> torch.library.Library:
    """Define `crosslayer::packed_linear(x, weight, bias)`, once a process (the returned library, kept by the
    cache, keeps it defined): opaque to torch.compile, so inductor neither autotunes nor repacks it. A plain
    library op, not `torch.library.custom_op`, whose Python wrapper adds a fixed cost to every call."""
    lib = torch.library.Library("crosslayer", "DEF")
    lib.define("packed_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
    lib.impl("packed_linear", _packed_linear, "CPU")
    torch.library.register_fake("crosslayer::packed_linear", _packed_linear_shape, lib=lib)
    return lib
