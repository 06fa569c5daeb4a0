"""`crosslayer prepare`: a corpus -> tokenizer + train/val token files a training run reads."""

from __future__ import annotations

import argparse

from . import add_json_flags, add_progress_flag, emit, positive_int

SOURCE_HELP = """\
what to tokenise:
  stdlib             this Python's standard-library .py files (test suites excluded)
  text:GLOB          plain UTF-8 text files, one document per file ('**' recurses)
  jsonl:GLOB:FIELD   JSON lines, one document per line from the string field FIELD
  hf:NAME[:CONFIG]   a Hugging Face dataset (hub name or local folder), field "text"
                     (needs `pip install datasets`)"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare", help="tokenise a corpus into train/val token files",
        description="Train or load a tokenizer and write train.bin, val.bin, meta.json and the tokenizer to --out.\n\n"
        + SOURCE_HELP,
    )
    p.add_argument("source", nargs="?", default="stdlib", metavar="SOURCE",
                   help="stdlib, text:GLOB, jsonl:GLOB:FIELD or hf:NAME[:CONFIG] (see above; default: stdlib)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (new, empty, or an earlier prepare)")
    p.add_argument("--tokenizer", default="bpe:8192", metavar="SPEC",
                   help="bpe:VOCAB trains a byte-level BPE on the train split; hf:NAME_OR_PATH uses an existing "
                        "tokenizer (a model's: its BOS starts every document)")
    p.add_argument("--val", default=None, metavar="GLOB",
                   help="validation files for text/jsonl sources (jsonl: GLOB or jsonl:GLOB:FIELD), a split name "
                        "for hf sources; none: a fraction of the documents")
    p.add_argument("--val-fraction", type=float, default=0.02, help="share of documents held out when --val is not given")
    p.add_argument("--max-train-docs", type=positive_int, default=None, metavar="N",
                   help="use only the first N train documents")
    add_progress_flag(p)
    add_json_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data import SPLITS, prepare

    meta = prepare(args.source, args.out, tokenizer=args.tokenizer, val=args.val, val_fraction=args.val_fraction,
                   max_train_docs=args.max_train_docs, progress=not args.no_progress)
    print(f"prepared {meta['source']} -> {args.out}")
    print(f"  tokenizer {meta['tokenizer']}: vocab {meta['vocab_size']}, eos id {meta['eos_token_id']}, "
          f"bos id {meta.get('bos_token_id')}, {meta['dtype']} ids")
    for split in SPLITS:
        s = meta["splits"][split]
        print(f"  {split:5s} {s['documents']:>9,} docs {s['tokens']:>13,} tokens {s['bytes']:>14,} bytes"
              f"  ({s['bytes'] / s['tokens']:.2f} bytes/token)")
    print(f"  validation: {meta['val_method']}")
    return emit(meta, args)
