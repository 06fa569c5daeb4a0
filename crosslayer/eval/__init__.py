"""`crosslayer eval ...`: perplexity, zero-shot tasks through lm-eval, passkey retrieval.

Every command takes any causal LM folder or hub id that transformers loads: our CLA models,
converted models, and plain transformers models, so baselines go through the same code.
"""

from __future__ import annotations

import argparse
import importlib

EVALS = ["crosslayer.eval.perplexity", "crosslayer.eval.tasks", "crosslayer.eval.passkey", "crosslayer.eval.suite"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model: ppl, tasks, passkey, all")
    sub = p.add_subparsers(dest="evaluation", metavar="EVAL", required=True)
    for name in EVALS:
        importlib.import_module(name).add_parser(sub)
