"""Sliding-window (strided) perplexity, with tokenizer-independent figures beside it.

The text is one token stream. Windows of `context` tokens advance `stride` tokens at a time; each
window scores only the tokens no earlier window scored, so every token is predicted once, from at
least `context - stride` tokens of left context (except in the first window). With a BOS/EOS token available
it is put in front of the stream, so the first token is scored too and bits per byte cover all
the text. Reported: token-level perplexity; bits per byte (UTF-8) and word-level perplexity
(whitespace words, as for WikiText) so models with different tokenizers compare.
"""

from __future__ import annotations

import glob
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import load_tokens, read_meta
from ..errors import CrossLayerError
from ..loading import tokenizer_fingerprint


def windows(n: int, context: int, stride: int, first: int = 1) -> list[tuple[int, int, int]]:
    """(begin, end, score_from) of each window over a stream of n tokens.

    The first window scores positions first..context-1; each later one ends `stride` tokens further
    (at most context-1, so every scored token keeps some context), is `context` long, and scores
    only its new tokens. Positions < first are not scored (the prefix token)."""
    if context < 2 or not 1 <= stride <= context:
        raise CrossLayerError(f"need context >= 2 and 1 <= stride <= context; got context {context}, stride {stride}")
    step = min(stride, context - 1)
    end = min(context, n)
    out = [(0, end, first)] if end > first else []
    while end < n:
        new_end = min(end + step, n)
        out.append((max(0, new_end - context), new_end, end))
        end = new_end
    return out


@torch.no_grad()
def strided_nll(model, stream: torch.Tensor, context: int, stride: int, batch_size: int = 4,
                first: int = 1, progress: bool = True) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods (nats) over the scored positions, and their count."""
    device = next(model.parameters()).device
    spans = windows(len(stream), context, stride, first)
    total, count = 0.0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(spans), desc="ppl", unit="window", file=sys.stderr, dynamic_ncols=True)
    i = 0
    while i < len(spans):
        # batch windows of equal length (all but possibly the last)
        length = spans[i][1] - spans[i][0]
        group = [spans[i]]
        while i + len(group) < len(spans) and len(group) < batch_size and \
                spans[i + len(group)][1] - spans[i + len(group)][0] == length:
            group.append(spans[i + len(group)])
        batch = torch.stack([stream[b:e] for b, e, _ in group]).to(device)  # (B, L)
        logits = model(input_ids=batch, use_cache=False).logits.float()  # (B, L, V)
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # predicts positions 1..L-1
        targets = batch[:, 1:]
        token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, L-1)
        for row, (b, _, s) in enumerate(group):
            scored = token_lp[row, s - b - 1 :]
            total -= scored.double().sum().item()
            count += scored.numel()
        i += len(group)
        if bar:
            bar.update(len(group))
    if bar:
        bar.close()
    return total, count


def read_text(source: str) -> tuple[str, str]:
    """(text, description) of a text file / glob, or of a hub dataset `hf:NAME[:CONFIG[:SPLIT]]`."""
    if source.startswith("hf:"):
        parts = source[3:].split(":")
        name, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
        split = parts[2] if len(parts) > 2 else "test"
        try:
            import datasets
        except ImportError:
            raise CrossLayerError("hub datasets need `pip install datasets` (or crosslayer[data])") from None
        try:
            ds = datasets.load_dataset(name, config, split=split)
        except Exception as e:  # the hub client raises many types; the user needs the message
            raise CrossLayerError(f"cannot load {source}: {e}") from None
        if "text" not in ds.column_names:
            raise CrossLayerError(f"{source} has no 'text' column (columns: {', '.join(ds.column_names)})")
        return "\n\n".join(ds["text"]), source
    files = sorted(glob.glob(source, recursive=True))
    if not files:
        raise CrossLayerError(f"no file matches {source!r}")
    try:
        return "\n\n".join(Path(f).read_text(encoding="utf-8") for f in files), f"{len(files)} file(s): {source}"
    except UnicodeDecodeError as e:
        raise CrossLayerError(f"{source}: not UTF-8 text ({e})") from None


def perplexity(model, tokenizer, data: str, context: int | None = None, stride: int | None = None,
               batch_size: int = 4, split: str = "val", max_tokens: int | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Strided perplexity of `model` on text (file, glob, hf:...) or a prepared dataset folder."""
    max_pos = getattr(model.config, "max_position_embeddings", 2048)
    if context is None:
        context = min(max_pos, 2048)
    if stride is None:
        stride = max(1, context // 2)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    result: dict[str, Any] = {"data": data, "context": context, "stride": stride}
    text = None
    if Path(data).is_dir() and (Path(data) / "meta.json").exists():
        meta = read_meta(data)
        if tokenizer_fingerprint(tokenizer) != meta.get("tokenizer_fingerprint"):
            raise CrossLayerError(f"{data} was tokenised with another tokenizer ({meta['tokenizer']}) than the "
                                  "model's: evaluate on the text instead, or prepare it with the model's tokenizer "
                                  "(hf:<model>)")
        ids = torch.from_numpy(np.asarray(load_tokens(data, split), dtype=np.int64))
        n_bytes = meta["splits"][split]["bytes"]
        result["source"] = f"prepared {split} split ({meta['source']})"
        # the stream already starts after a document boundary; its EOS tokens are scored like any token
    else:
        text, result["source"] = read_text(data)
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        n_bytes = len(text.encode("utf-8"))
    if len(ids) and int(ids.max()) >= model.config.vocab_size:
        raise CrossLayerError(f"the tokenizer gives id {int(ids.max())}, past the model's vocabulary of "
                              f"{model.config.vocab_size}: the tokenizer and the model do not belong together")
    if max_tokens is not None and len(ids) > max_tokens:
        ids, text = ids[:max_tokens], None  # a prefix of the text: byte/word counts no longer apply
        n_bytes = None
    if len(ids) < 2:
        raise CrossLayerError(f"{data} gives {len(ids)} tokens: too little to evaluate")
    # without a prefix token the first token has no context and is not scored
    stream = torch.cat([torch.tensor([prefix]), ids]) if prefix is not None else ids
    nll, count = strided_nll(model, stream, context, stride, batch_size, first=1, progress=progress)
    result.update(tokens=len(ids), tokens_scored=count, nll=nll, loss=nll / count, perplexity=math.exp(nll / count))
    if n_bytes and count == len(ids):
        result.update(bytes=n_bytes, bits_per_byte=nll / n_bytes / math.log(2))
    if text is not None and count == len(ids):
        words = len(re.findall(r"\S+", text))
        result.update(words=words, word_perplexity=math.exp(nll / words))
    return result
