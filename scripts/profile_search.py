"""Where a plan search's time goes: the search of `crosslayer convert --plan search --kv-budget 0.5` run in-process
on a safetensors model, with its weights held in memory (`resident`) or read a layer at a time for every plan
(`streamed`), under cProfile.

    python scripts/profile_search.py runs/random-1.1b resident|streamed [calibration text]
"""

import cProfile
import pstats
import sys
import time

import torch

from crosslayer.calibration import Calibration, read_calibration
from crosslayer.convert import LazySource, read_source_config
from crosslayer.loading import load_tokenizer
from crosslayer.plan import Searcher
from crosslayer.weights import open_weights


def main(folder: str, mode: str, text: str = "../shared/data/wikitext-2/wiki.valid.raw") -> None:
    source = LazySource(open_weights(folder), read_source_config(folder))
    tokens = read_calibration(text, load_tokenizer(folder))
    cpu, dtype = torch.device("cpu"), torch.bfloat16
    t0 = time.perf_counter()
    if mode == "resident":
        calibration = Calibration(source.model(dtype, cpu), tokens, compute_dtype=dtype)
    else:
        calibration = Calibration(source.model(dtype, cpu, resident=False), tokens, compute_dtype=dtype, device=cpu,
                                  load=lambda name, module: source.load(name, module, dtype, cpu))
    print(f"calibration {time.perf_counter() - t0:.1f} s")
    profile = cProfile.Profile()
    profile.enable()
    result = Searcher(kv_budget=0.5)(calibration)
    profile.disable()
    print(f"search {result['seconds']} s, {result['evaluations']} plans: {result['plan']}")
    pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main(*sys.argv[1:])
