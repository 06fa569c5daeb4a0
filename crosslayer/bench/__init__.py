"""`crosslayer bench ...`: benchmarks that warm up, synchronise, repeat, and end with one JSON line."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

BENCHMARKS = ["crosslayer.bench.train", "crosslayer.bench.memory", "crosslayer.bench.decode"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmarks (train throughput, ...)")
    sub = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name in BENCHMARKS:
        importlib.import_module(name).add_parser(sub)


def emit(result: dict, json_out: str | None = None) -> int:
    """The machine-readable last line (and, if asked, the same JSON in a file)."""
    line = json.dumps(result)
    if json_out:
        Path(json_out).write_text(line + "\n")
    print(line)
    return 0
