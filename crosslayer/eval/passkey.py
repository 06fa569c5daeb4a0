"""Passkey retrieval: a number hidden at some depth in filler text, the model asked to repeat it.

The long-context probe reviewers asked of the paper: CLA consumers read K/V computed by another
layer, so one may ask whether long-range retrieval suffers. For each prompt length (in tokens) and
depth (0 = the key at the start, 1 = at the end) we build `trials` prompts with random 5-digit keys,
decode greedily, and count a success when the key's digits are the first digits generated.
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import CrossLayerError

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about it.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


def build_prompt(tokenizer, length: int, depth: float, key: int) -> list[int]:
    """Token ids of a prompt of about `length` tokens (never more) with the key at `depth`."""
    ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    fixed = len(ids(INTRO)) + len(ids(NEEDLE.format(key=key))) + len(ids(QUESTION))
    if fixed > length:
        raise CrossLayerError(f"a {length}-token prompt cannot hold the instructions, key and question "
                              f"({fixed} tokens with this tokenizer); use longer lengths")
    def compose(n_filler: int) -> list[int]:
        before = round(n_filler * depth)
        return ids(INTRO + FILLER * before + NEEDLE.format(key=key) + FILLER * (n_filler - before) + QUESTION)

    n_filler = max(0, (length - fixed) // len(ids(FILLER)))
    out = compose(n_filler)
    while len(out) > length and n_filler > 0:  # tokenisation across joins can add a few tokens
        n_filler -= 1
        out = compose(n_filler)
    return out


@torch.no_grad()
def passkey(model, tokenizer, lengths: list[int], depths: list[float], trials: int = 5, seed: int = 0,
            progress: bool = True) -> dict[str, Any]:
    """Accuracy per (length, depth); greedy decoding through the model's own `generate`."""
    if not lengths or any(n < 1 for n in lengths):
        raise CrossLayerError(f"lengths must be positive token counts, got {lengths}")
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise CrossLayerError(f"depths must lie in [0, 1], got {depths}")
    for length in lengths:  # every length can hold the prompt: checked before any work starts
        build_prompt(tokenizer, length, 0.5, 10000)
    rng = random.Random(seed)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cells, bar = [], None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(lengths) * len(depths) * trials, desc="passkey", file=sys.stderr, dynamic_ncols=True)
    for length in lengths:
        for depth in depths:
            hits, tokens, answers = 0, [], []
            for _ in range(trials):
                key = rng.randint(10000, 99999)
                prompt = build_prompt(tokenizer, length, depth, key)
                tokens.append(len(prompt))
                out = model.generate(torch.tensor([prompt], device=device), max_new_tokens=8, do_sample=False,
                                     pad_token_id=pad)
                answer = tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)
                answers.append(answer)
                digits = re.match(r"\s*(\d+)", answer)
                hits += bool(digits) and digits[1].startswith(str(key))
                if bar:
                    bar.update(1)
            cells.append({"length": length, "depth": depth, "accuracy": hits / trials, "trials": trials,
                          "prompt_tokens": round(sum(tokens) / len(tokens)), "answers": answers})
    if bar:
        bar.close()
    max_pos = getattr(model.config, "max_position_embeddings", None)
    return {"cells": cells, "accuracy": sum(c["accuracy"] for c in cells) / len(cells), "seed": seed,
            "max_position_embeddings": max_pos,
            "beyond_training_length": [n for n in lengths if max_pos and n > max_pos]}


def heatmap(result: dict[str, Any], path: str | Path, title: str = "passkey retrieval") -> None:
    """Accuracy by depth (rows) and prompt length (columns) as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CrossLayerError("the heat map needs matplotlib: pip install matplotlib (or crosslayer[plot])") from None
    lengths = sorted({c["length"] for c in result["cells"]})
    depths = sorted({c["depth"] for c in result["cells"]})
    grid = [[next(c["accuracy"] for c in result["cells"] if c["length"] == n and c["depth"] == d) for n in lengths]
            for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.5 * len(depths)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("depth of the key")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
