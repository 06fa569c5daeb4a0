"""vLLM's offline engine (`vllm.LLM`) on a crosslayer folder, in this process, shut down on exit.

In-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so a caller can read the engine's scheduler and
model, and so several engines can run one after another in one Python process: each is shut down
explicitly and its process groups torn down before the next one starts.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def offline_engine(folder: str | Path, **llm_kwargs: Any) -> Iterator[Any]:
    """`vllm.LLM(model=folder, **llm_kwargs)`, yielded, then shut down; needs vLLM installed."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm = LLM(model=str(folder), **llm_kwargs)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def kv_capacity_tokens(llm: Any) -> int:
    """Tokens of KV cache the engine allocated: pages x tokens per page (what vLLM logs as KV cache size)."""
    cache = llm.llm_engine.vllm_config.cache_config
    return cache.num_gpu_blocks * cache.block_size
