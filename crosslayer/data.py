"""Corpus -> tokenizer -> token shards: everything a training run reads from disk.

`prepare` turns a text source into a folder the trainer can use:

    tokenizer.json, tokenizer_config.json   the tokenizer (loadable by AutoTokenizer.from_pretrained)
    train.bin, val.bin                      flat little-endian token streams, uint16 or uint32; every
                                            document is followed by the end-of-text (EOS) token
    meta.json                               sizes, dtype, checksums and the arguments used

Sources (the `source` string):

    stdlib                 the running Python's standard-library .py files (no tests), one document per file
    text:GLOB              plain UTF-8 text files, one document per file
    jsonl:GLOB:FIELD       JSON-lines files, one document per line, from the string field FIELD
    hf:NAME[:CONFIG]       a `datasets` dataset (hub name or local folder of data files), field "text"

Validation data comes from `val` (a glob, or a split name for hf sources) or, failing that, from a
deterministic `val_fraction` of the documents; see `prepare` for the details per source.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from .errors import CrossLayerError
from .loading import tokenizer_fingerprint

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
EOT = "<|endoftext|>"
SPLITS = ("train", "val")
# A training run needs at least a couple of context windows of data; anything below this is
# almost certainly a wrong glob or field rather than a deliberate corpus.
MIN_TRAIN_TOKENS = 2 * 1024

_META = "meta.json"
_STAGING_PREFIX = ".prepare-tmp-"
_DTYPES = {"uint16": "<u2", "uint32": "<u4"}  # always little-endian on disk, whatever the machine
# Directories of the standard library that are not representative code (the test suites alone
# are ~2/3 of the stdlib and contain deliberately odd files), or not the stdlib at all.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
# Documents are tokenised in batches so the Rust tokenizer can spread them over all cores,
# flushed by count or by size so one huge document cannot make a batch hold gigabytes.
_BATCH_DOCS = 1024
_BATCH_CHARS = 8_000_000


# ----------------------------------------------------------------------------- public API


def prepare(
    source: str,
    out_dir: str | Path,
    tokenizer: str = "bpe:8192",
    val: str | None = None,
    val_fraction: float = 0.02,
    max_train_docs: int | None = None,
    progress: bool = True,
) -> dict:
    """Tokenise `source` into `out_dir` (see the module docstring) and return its meta dict.

    Validation split, per source kind:
      stdlib            `val` not allowed; round(val_fraction * files) files (at least one), chosen
                        by a sha256 of each file's path relative to the stdlib folder.
      text, jsonl       `val` is a glob of validation files (for jsonl: `jsonl:GLOB:FIELD` or a plain
                        GLOB read with the source's FIELD); files it matches are left out of train.
                        Without `val`: text picks whole files as for stdlib (key: path relative to
                        the glob's fixed leading folder); jsonl picks lines whose sha256 of
                        "relative/path:line" falls below val_fraction.
      hf                `val` names a split; default "validation" when the dataset has it, else rows
                        whose sha256 of the row number falls below val_fraction.
    Empty (whitespace-only) documents are skipped. `max_train_docs` keeps the first N train documents.
    The tokenizer is `bpe:VOCAB` (byte-level BPE trained on the train split, EOS `<|endoftext|>` = id 0)
    or `hf:NAME_OR_PATH` (an existing tokenizer; its EOS token separates documents).

    Re-running with the same arguments returns the existing meta without work; a folder holding
    anything else is an error, never overwritten. Nothing is left behind when this raises.
    """
    out_dir = Path(out_dir)
    spec = _parse_source(source, val)
    tok_spec = _parse_tokenizer(tokenizer)
    arguments = _arguments(spec, tok_spec, val_fraction, max_train_docs)
    fingerprint = _sha256_text(json.dumps({"format_version": FORMAT_VERSION, "arguments": arguments}, sort_keys=True))
    existing = _existing_dataset(out_dir, fingerprint)
    if existing is not None:
        log.info(f"reusing prepared data in {out_dir} (same arguments)")
        return existing

    # Everything that can fail on user input without reading the corpus happens before any file
    # is created: globs, dataset loading, tokenizer loading.
    corpus = _open_corpus(spec, val_fraction, max_train_docs)
    hf_tokenizer = _load_hf_tokenizer(tok_spec.name) if tok_spec.kind == "hf" else None

    created = _make_dirs(out_dir)
    for stale in out_dir.glob(_STAGING_PREFIX + "*"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=out_dir))
    try:
        wrapper = _train_bpe(corpus, tok_spec.vocab_size, progress) if tok_spec.kind == "bpe" else hf_tokenizer
        meta = {
            "format": "crosslayer-tokens",
            "format_version": FORMAT_VERSION,
            "source": source,
            "tokenizer": tokenizer,
            **_write_tokens(staging, wrapper, tokenizer, corpus, val_fraction, progress),
            "arguments": arguments,
            "fingerprint": fingerprint,
            "versions": _versions(),
        }
        (staging / _META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _publish(staging, out_dir, [*meta["tokenizer_files"], "train.bin", "val.bin", _META])
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(created):
            _rmdir_if_empty(folder)
        raise
    return meta


def read_meta(data_dir: str | Path) -> dict:
    """Return the meta.json of a folder written by `prepare` (CrossLayerError if it is not one)."""
    data_dir = Path(data_dir)
    path = data_dir / _META
    if not data_dir.is_dir():
        raise CrossLayerError(f"data folder {str(data_dir)!r} does not exist; create it with `prepare`")
    if not path.is_file():
        raise CrossLayerError(f"{str(data_dir)!r} is not a prepared dataset (no {_META}); create it with `prepare`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CrossLayerError(f"{path} is not readable JSON ({e}); delete the folder and prepare it again") from e
    if not isinstance(meta, dict) or meta.get("format") != "crosslayer-tokens":
        raise CrossLayerError(f"{path} was not written by crosslayer prepare")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CrossLayerError(
            f"{path} has data format version {meta.get('format_version')!r}; this crosslayer reads version "
            f"{FORMAT_VERSION}. Prepare the data again with this version."
        )
    return meta


def load_tokens(data_dir: str | Path, split: str) -> np.memmap:
    """Memory-map the token stream of `split` ("train" or "val") of a prepared folder, read-only."""
    if split not in SPLITS:
        raise CrossLayerError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    meta = read_meta(data_dir)
    info = meta.get("splits", {}).get(split)
    if info is None:
        raise CrossLayerError(f"{Path(data_dir) / _META} has no {split!r} split")
    path = Path(data_dir) / info["file"]
    dtype = np.dtype(_DTYPES[meta["dtype"]])
    if not path.is_file() or path.stat().st_size != info["tokens"] * dtype.itemsize:
        raise CrossLayerError(f"{path} is missing or not the size meta.json records; prepare the data again")
    return np.memmap(path, dtype=dtype, mode="r")


def document_bos(tokenizer) -> int | None:
    """The BOS id to put before every document: the tokenizer's, when its own encoding adds one (as
    Llama-family tokenizers do, and what their models saw in training); None otherwise."""
    bos = tokenizer.bos_token_id
    if bos is None or bos == tokenizer.eos_token_id:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def token_dtype(vocab_size: int) -> str:
    """The smallest on-disk dtype name that holds every id of a `vocab_size` vocabulary."""
    if vocab_size <= 1 << 16:
        return "uint16"
    if vocab_size <= 1 << 32:
        return "uint32"
    raise CrossLayerError(f"vocabulary of {vocab_size} tokens does not fit uint32 token ids")


# ----------------------------------------------------------------------------- arguments


def _arguments(spec: _SourceSpec, tok_spec: _TokenizerSpec, val_fraction: float, max_train_docs: int | None) -> dict:
    """The arguments that decide the dataset (what its fingerprint covers), after checking the numeric ones."""
    if not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise CrossLayerError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if max_train_docs is not None and (not isinstance(max_train_docs, int) or max_train_docs < 1):
        raise CrossLayerError(f"max_train_docs must be a positive integer or None, got {max_train_docs!r}")
    return {
        "source": spec.identity,
        "tokenizer": tok_spec.identity,
        # An explicit validation glob makes the fraction irrelevant; leave it out so changing it
        # does not count as a different dataset.
        "val_fraction": None if spec.kind in ("text", "jsonl") and spec.val is not None else float(val_fraction),
        "max_train_docs": max_train_docs,
    }


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _SourceSpec:
    """A parsed source string; `identity` is what the fingerprint records (paths made absolute)."""

    kind: str
    text: str  # the string as the user gave it, for messages
    pattern: str | None = None  # text/jsonl glob
    field: str | None = None  # jsonl field
    val: str | None = None  # text/jsonl: validation glob; hf: split name
    val_field: str | None = None
    name: str | None = None  # hf dataset name or folder
    config: str | None = None
    identity: dict | None = None


@dataclass
class _Corpus:
    """An opened source: `docs(with_val)` starts a fresh pass yielding ("train"|"val", text).

    The pass yields only non-empty documents and stops the train side after max_train_docs.
    """

    docs: Callable[[bool], Iterator[tuple[str, str]]]
    val_method: str
    total: int | None  # documents in a full pass, when known cheaply (for the progress bar)


def _parse_source(source: str, val: str | None) -> _SourceSpec:
    if not isinstance(source, str) or not source:
        raise CrossLayerError(f"source must be a non-empty string, got {source!r}")
    kind, sep, rest = source.partition(":")
    if source == "stdlib":
        if val is not None:
            raise CrossLayerError("val is not supported for the stdlib source; use val_fraction instead")
        root = sysconfig.get_paths()["stdlib"]
        ident = {"kind": "stdlib", "path": root, "python": f"{sys.version_info[0]}.{sys.version_info[1]}"}
        return _SourceSpec(kind="stdlib", text=source, identity=ident)
    if kind == "text" and sep and rest:
        val_pattern = val[len("text:") :] if val is not None and val.startswith("text:") else val
        if val_pattern == "":
            raise CrossLayerError("val must be a glob of text files, got an empty string")
        ident = {"kind": "text", "glob": _abs_pattern(rest), "val": val_pattern and _abs_pattern(val_pattern)}
        return _SourceSpec(kind="text", text=source, pattern=rest, val=val_pattern, identity=ident)
    if kind == "jsonl" and sep:
        pattern, _, field = rest.rpartition(":")
        if not pattern or not field:
            raise CrossLayerError(f"jsonl source must look like jsonl:GLOB:FIELD, got {source!r}")
        val_pattern, val_field = val, field
        if val is not None and val.startswith("jsonl:"):
            val_pattern, _, val_field = val[len("jsonl:") :].rpartition(":")
            if not val_pattern or not val_field:
                raise CrossLayerError(f"val for a jsonl source must be GLOB or jsonl:GLOB:FIELD, got {val!r}")
        if val_pattern == "":
            raise CrossLayerError("val must be a glob of jsonl files, got an empty string")
        ident = {
            "kind": "jsonl",
            "glob": _abs_pattern(pattern),
            "field": field,
            "val": val_pattern and _abs_pattern(val_pattern),
            "val_field": val_field if val_pattern else None,
        }
        return _SourceSpec(
            kind="jsonl",
            text=source,
            pattern=pattern,
            field=field,
            val=val_pattern,
            val_field=val_field,
            identity=ident,
        )
    if kind == "hf" and sep and rest:
        name, _, config = rest.partition(":")
        local = Path(name).expanduser()
        name = str(local.absolute()) if local.is_dir() else name  # a local folder is identified by where it is
        ident = {"kind": "hf", "name": name, "config": config or None, "val": val}
        return _SourceSpec(kind="hf", text=source, name=name, config=config or None, val=val, identity=ident)
    raise CrossLayerError(f"unknown source {source!r}; use stdlib, text:GLOB, jsonl:GLOB:FIELD or hf:NAME[:CONFIG]")


def _open_corpus(spec: _SourceSpec, val_fraction: float, max_train_docs: int | None) -> _Corpus:
    """Resolve globs / load the dataset and return the document passes (no corpus text read yet)."""
    if spec.kind in ("stdlib", "text"):
        strict = spec.kind == "text"
        files = _stdlib_files() if spec.kind == "stdlib" else _glob_files(spec.pattern, "source")
        if spec.val is not None:
            val_files = _glob_files(spec.val, "val")
            train_files = _without(files, val_files, spec)
            method = f"files matching {spec.val}"
        else:
            train_files, val_files = _split_files(files, val_fraction, spec)
            n_files = len(train_files) + len(val_files)
            method = (
                f"{len(val_files)} of {n_files} non-empty files, by sha256 of their relative path "
                f"(val_fraction {val_fraction})"
            )
        n_train = len(train_files) if max_train_docs is None else min(len(train_files), max_train_docs)
        return _Corpus(
            docs=_separate(
                lambda: _read_text_files(train_files, strict),
                lambda: _read_text_files(val_files, strict),
                max_train_docs,
            ),
            val_method=method,
            total=n_train + len(val_files),
        )
    if spec.kind == "jsonl":
        files = _glob_files(spec.pattern, "source")
        if spec.val is not None:
            val_files = _glob_files(spec.val, "val")
            train_files = _without(files, val_files, spec)
            return _Corpus(
                docs=_separate(
                    lambda: (t for _, t in _read_jsonl(train_files, spec.field)),
                    lambda: (t for _, t in _read_jsonl(val_files, spec.val_field)),
                    max_train_docs,
                ),
                val_method=f"lines of files matching {spec.val} (field {spec.val_field})",
                total=None,
            )
        _need_fraction(val_fraction, "jsonl sources without val")
        return _Corpus(
            docs=_interleave(lambda: _read_jsonl(files, spec.field), val_fraction, max_train_docs),
            val_method=f"lines whose sha256 of 'file:line' < val_fraction {val_fraction}",
            total=None,
        )
    return _open_hf(spec, val_fraction, max_train_docs)


def _open_hf(spec: _SourceSpec, val_fraction: float, max_train_docs: int | None) -> _Corpus:
    try:
        import datasets  # optional: only hf sources need it, and it is slow to import
    except ImportError as e:
        raise CrossLayerError(
            f"source {spec.text!r} needs the datasets library: pip install datasets (or pip install 'crosslayer[data]')"
        ) from e
    label = spec.name + (f":{spec.config}" if spec.config else "")
    try:
        splits = datasets.load_dataset(spec.name, spec.config, streaming=True)
    except Exception as e:  # noqa: BLE001 - missing dataset, no network, bad files: all "cannot read this source"
        raise CrossLayerError(f"could not load dataset {label!r}: {type(e).__name__}: {e}") from e
    if "train" not in splits:
        raise CrossLayerError(f"dataset {label!r} has no 'train' split (it has: {', '.join(splits)})")
    train = splits["train"]
    if spec.val is not None or "validation" in splits:
        val_split = spec.val or "validation"
        if val_split not in splits:
            raise CrossLayerError(f"val split {val_split!r} not in dataset {label!r} (it has: {', '.join(splits)})")
        return _Corpus(
            docs=_separate(
                lambda: (t for _, t in _read_hf(train, label, "train")),
                lambda: (t for _, t in _read_hf(splits[val_split], label, val_split)),
                max_train_docs,
            ),
            val_method=f"split {val_split!r}",
            total=None,
        )
    _need_fraction(val_fraction, f"dataset {label!r}, which has no 'validation' split,")
    return _Corpus(
        docs=_interleave(lambda: _read_hf(train, label, "train"), val_fraction, max_train_docs),
        val_method=f"train rows whose sha256 of the row number < val_fraction {val_fraction}",
        total=None,
    )


def _separate(
    train: Callable[[], Iterable[str]], val: Callable[[], Iterable[str]], max_train_docs: int | None
) -> Callable[[bool], Iterator[tuple[str, str]]]:
    """Passes over a source whose train and validation documents come from different places."""

    def docs(with_val: bool) -> Iterator[tuple[str, str]]:
        n = 0
        for text in train():
            if text.strip():
                yield "train", text
                n += 1
                if n == max_train_docs:
                    break
        if with_val:
            yield from (("val", text) for text in val() if text.strip())

    return docs


def _interleave(
    records: Callable[[], Iterable[tuple[str, str]]], val_fraction: float, max_train_docs: int | None
) -> Callable[[bool], Iterator[tuple[str, str]]]:
    """Passes over one stream of (key, text) split per document by a stable hash of its key.

    The pass ends right after the last train document kept, so a limited run over a huge streamed
    dataset stops early; its validation documents are the ones met on the way.
    """

    def docs(with_val: bool) -> Iterator[tuple[str, str]]:
        n = 0
        for key, text in records():
            if not text.strip():
                continue
            if _unit_hash(key) < val_fraction:
                if with_val:
                    yield "val", text
                continue
            yield "train", text
            n += 1
            if n == max_train_docs:
                return

    return docs


def _stdlib_files() -> list[tuple[str, Path]]:
    """(path relative to the stdlib folder, absolute path) of every stdlib .py file, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, names in os.walk(root):  # os.walk does not follow symlinked folders
        dirs[:] = [d for d in dirs if d not in _STDLIB_SKIP_DIRS]
        for name in names:
            if name.endswith(".py"):
                path = Path(folder, name)
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def _glob_files(pattern: str, what: str) -> list[tuple[str, Path]]:
    """(path relative to the glob's fixed leading folder, absolute path) of matching files, sorted.

    The relative path is the file's identity for the train/val split, so the split does not depend
    on where the corpus lives on disk.
    """
    expanded = os.path.expanduser(pattern)
    matches = [m for m in glob.glob(expanded, recursive=True) if os.path.isfile(m)]
    if not matches:
        where = "" if os.path.isabs(expanded) else f" (relative globs resolve against {os.getcwd()})"
        raise CrossLayerError(f"{what} glob {pattern!r} matches no files{where}")
    base = _glob_base(expanded)
    return sorted((Path(os.path.relpath(m, base)).as_posix(), Path(os.path.abspath(m))) for m in matches)


def _glob_base(pattern: str) -> Path:
    """The leading folders of a glob that contain no wildcard (the parent, for a plain file path)."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if any(c in part for c in "*?["):
            break
        fixed.append(part)
    else:
        fixed = fixed[:-1]
    return Path(*fixed) if fixed else Path(".")


def _without(files: list[tuple[str, Path]], val_files: list[tuple[str, Path]], spec: _SourceSpec) -> list:
    """Train files minus the validation files, so a broad source glob cannot leak val into train."""
    held_out = {path for _, path in val_files}
    kept = [(key, path) for key, path in files if path not in held_out]
    if not kept:
        raise CrossLayerError(
            f"every file of source {spec.text!r} is also matched by val {spec.val!r}; nothing left to train on"
        )
    return kept


def _split_files(files: list[tuple[str, Path]], val_fraction: float, spec: _SourceSpec) -> tuple[list, list]:
    """Hold out round(val_fraction * n) files (at least one), those with the smallest path hash.

    Ranking instead of thresholding guarantees a non-empty split for small collections (3 books at
    val_fraction 0.3 give one validation book, not "zero with some probability").
    """
    files = [(key, path) for key, path in files if path.stat().st_size > 0]  # never hold out an empty file
    _need_fraction(val_fraction, f"source {spec.text!r} without val")
    if len(files) < 2:
        raise CrossLayerError(
            f"source {spec.text!r} has {len(files)} non-empty file(s); splitting by file needs at least 2 "
            "(give val=GLOB with separate validation files)"
        )
    n_val = min(max(1, round(val_fraction * len(files))), len(files) - 1)
    held_out = set(sorted(files, key=lambda f: (_sha256_text(f[0]), f[0]))[:n_val])
    return [f for f in files if f not in held_out], [f for f in files if f in held_out]


def _need_fraction(val_fraction: float, what: str) -> None:
    if val_fraction <= 0:
        raise CrossLayerError(f"val_fraction must be > 0 for {what}; raise it or give val")


def _read_text_files(files: list[tuple[str, Path]], strict: bool) -> Iterator[str]:
    for _, path in files:
        data = path.read_bytes()  # bytes, not text mode: no newline translation, exact byte counts
        try:
            yield data.decode("utf-8")
        except UnicodeDecodeError as e:
            if strict:
                raise CrossLayerError(f"{path} is not UTF-8 text ({e}); convert it to UTF-8") from e
            # stdlib: the user cannot fix these files, so leave the odd one out instead of failing


def _read_jsonl(files: list[tuple[str, Path]], field: str) -> Iterator[tuple[str, str]]:
    """(key "relative/path:line", text) for every line; blank lines and null fields are skipped."""
    for key, path in files:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8").strip()
                    if not line:
                        continue
                    row = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise CrossLayerError(f"{where}: not a UTF-8 JSON line ({e})") from e
                if not isinstance(row, dict):
                    raise CrossLayerError(f"{where}: expected a JSON object, got {type(row).__name__}")
                if field not in row:
                    raise CrossLayerError(f"{where}: no field {field!r} (fields here: {', '.join(row) or 'none'})")
                yield f"{key}:{lineno}", _as_text(row[field], f"{where}: field {field!r}")


def _read_hf(dataset: Iterable[dict], label: str, split: str) -> Iterator[tuple[str, str]]:
    """(key "row number", text) for every row of a streamed split, from its "text" column."""
    for i, row in enumerate(dataset):
        if "text" not in row:
            raise CrossLayerError(
                f"dataset {label!r} split {split!r} row {i}: no 'text' field (fields: {', '.join(row)})"
            )
        yield str(i), _as_text(row["text"], f"dataset {label!r} split {split!r} row {i}: field 'text'")


def _as_text(value: object, where: str) -> str:
    if value is None:
        return ""  # a null document is an empty one: skipped
    if not isinstance(value, str):
        raise CrossLayerError(f"{where} is a {type(value).__name__}, expected a string")
    return value


# ----------------------------------------------------------------------------- tokenizers


@dataclass(frozen=True)
class _TokenizerSpec:
    kind: str  # "bpe" or "hf"
    vocab_size: int | None
    name: str | None
    identity: dict


def _parse_tokenizer(spec: str) -> _TokenizerSpec:
    kind, sep, rest = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if kind == "bpe" and sep:
        minimum = 256 + 1  # every byte plus <|endoftext|>
        try:
            vocab = int(rest)
        except ValueError:
            vocab = None
        if vocab is None or vocab < minimum:
            raise CrossLayerError(f"tokenizer {spec!r}: VOCAB must be an integer >= {minimum} (256 bytes + {EOT})")
        token_dtype(vocab)  # rejects vocabularies too large for the token files
        return _TokenizerSpec("bpe", vocab, None, {"kind": "bpe", "vocab_size": vocab})
    if kind == "hf" and sep and rest:
        local = Path(rest).expanduser()
        name = str(local.absolute()) if local.is_dir() else rest
        return _TokenizerSpec("hf", None, name, {"kind": "hf", "name": name})
    raise CrossLayerError(f"unknown tokenizer {spec!r}; use bpe:VOCAB (e.g. bpe:8192) or hf:NAME_OR_PATH")


def _train_bpe(corpus: _Corpus, vocab_size: int, progress: bool):
    """Train a byte-level BPE on the train documents and wrap it for transformers.

    Deterministic: documents arrive in a fixed order and the trainer breaks ties between equally
    frequent pairs by token id, so the same corpus gives a byte-identical tokenizer.json.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],  # first, so its id is 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        show_progress=progress,
    )
    count = 0

    def texts() -> Iterator[str]:
        nonlocal count
        for _, text in corpus.docs(False):
            count += 1
            yield text

    tok.train_from_iterator(texts(), trainer)
    if count == 0:
        raise CrossLayerError("the corpus is empty: the train split has no non-empty documents")
    # GPT-2 convention: one special token plays every role; byte-level BPE never needs <unk>.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=EOT)


def _load_hf_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - not found, no network, bad files: all "cannot load it"
        raise CrossLayerError(f"could not load tokenizer hf:{name}: {type(e).__name__}: {e}") from e
    if getattr(tok, "backend_tokenizer", None) is None:
        raise CrossLayerError(
            f"tokenizer hf:{name} is not a fast (tokenizers-backed) tokenizer; it has no tokenizer.json"
        )
    if tok.eos_token_id is None:
        raise CrossLayerError(f"tokenizer hf:{name} has no EOS token to separate documents")
    return tok


# ----------------------------------------------------------------------------- tokenising


class _TokenWriter:
    """Appends documents ([BOS] ids EOS) to a file, keeping counts and a running sha256."""

    def __init__(self, path: Path, dtype: str, eos: int, bos: int | None = None):
        self.file = open(path, "wb")
        self.dtype = np.dtype(_DTYPES[dtype])
        self.eos = eos
        self.bos = () if bos is None else (bos,)
        self.sha = hashlib.sha256()
        self.documents = self.tokens = self.bytes = 0

    def write(self, texts: list[str], ids: list[list[int]]) -> None:
        n = sum(len(i) for i in ids) + len(ids) * (1 + len(self.bos))
        flat = np.fromiter(chain.from_iterable(chain(self.bos, i, (self.eos,)) for i in ids), dtype=self.dtype,
                           count=n)
        data = flat.tobytes()
        self.file.write(data)
        self.sha.update(data)
        self.documents += len(texts)
        self.tokens += n
        self.bytes += sum(len(t.encode("utf-8")) for t in texts)

    def close(self) -> None:
        self.file.close()


def _write_tokens(staging: Path, wrapper, tokenizer: str, corpus: _Corpus, val_fraction: float,
                  progress: bool) -> dict:
    """Save the tokenizer and write train.bin and val.bin into `staging`; return the meta fields they fix."""
    wrapper.save_pretrained(str(staging))
    tokenizer_files = sorted(p.name for p in staging.iterdir())
    if "tokenizer.json" not in tokenizer_files:
        raise CrossLayerError(f"tokenizer {tokenizer!r} did not save a tokenizer.json; use a fast tokenizer")
    vocab_size = max(len(wrapper), wrapper.backend_tokenizer.get_vocab_size(with_added_tokens=True))
    dtype = token_dtype(vocab_size)
    bos = document_bos(wrapper)
    stats = _tokenise(corpus, staging, wrapper.eos_token_id, bos, dtype, progress)
    _check_sizes(stats, corpus, val_fraction)
    return {
        "vocab_size": vocab_size,
        "eos_token_id": wrapper.eos_token_id,
        "bos_token_id": bos,  # put before every document (None: the tokenizer adds no BOS)
        "tokenizer_fingerprint": tokenizer_fingerprint(wrapper),
        "dtype": dtype,
        "tokenizer_files": tokenizer_files,
        "val_method": corpus.val_method,
        "splits": stats,
    }


def _tokenise(corpus: _Corpus, staging: Path, eos: int, bos: int | None, dtype: str, progress: bool) -> dict:
    """Encode every document into staging/{train,val}.bin; return per-split statistics."""
    from tokenizers import Tokenizer
    from tqdm import tqdm

    # Encode with the tokenizer.json just saved, so the files match exactly what users will load.
    encoder = Tokenizer.from_file(str(staging / "tokenizer.json"))
    encode = getattr(encoder, "encode_batch_fast", encoder.encode_batch)  # _fast skips offsets
    writers = {split: _TokenWriter(staging / f"{split}.bin", dtype, eos, bos) for split in SPLITS}

    def flush(batch: list[tuple[str, str]]) -> None:
        encodings = encode([text for _, text in batch], add_special_tokens=False)
        for split, writer in writers.items():
            chosen = [(text, enc.ids) for (s, text), enc in zip(batch, encodings, strict=True) if s == split]
            if chosen:
                writer.write([t for t, _ in chosen], [i for _, i in chosen])

    try:
        with tqdm(total=corpus.total, unit="doc", desc="tokenising", file=sys.stderr, disable=not progress) as bar:
            batch, chars = [], 0
            for split, text in corpus.docs(True):
                batch.append((split, text))
                chars += len(text)
                if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
                    flush(batch)
                    bar.update(len(batch))
                    batch, chars = [], 0
            if batch:
                flush(batch)
                bar.update(len(batch))
    finally:
        for writer in writers.values():
            writer.close()
    return {
        split: {
            "file": f"{split}.bin",
            "documents": w.documents,
            "tokens": w.tokens,
            "bytes": w.bytes,
            "sha256": w.sha.hexdigest(),
        }
        for split, w in writers.items()
    }


def _check_sizes(stats: dict, corpus: _Corpus, val_fraction: float) -> None:
    train, val = stats["train"], stats["val"]
    if train["documents"] == 0:
        raise CrossLayerError("the corpus is empty: the train split has no non-empty documents")
    if train["tokens"] < MIN_TRAIN_TOKENS:
        raise CrossLayerError(
            f"the corpus is too small: the train split has {train['tokens']} tokens, at least {MIN_TRAIN_TOKENS} "
            "are needed; use more documents"
        )
    if val["documents"] == 0:
        raise CrossLayerError(
            f"the validation split is empty ({corpus.val_method}); raise val_fraction (now {val_fraction}), "
            "give val, or use more documents"
        )


# ----------------------------------------------------------------------------- output folder


def _existing_dataset(out_dir: Path, fingerprint: str) -> dict | None:
    """The meta of a complete earlier prepare with this fingerprint, None if the folder is free.

    Raises when the folder holds anything else, so no data is ever overwritten. A folder with our
    fingerprint but missing or truncated token files is rebuilt: same arguments, same output.
    """
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise CrossLayerError(f"output folder {str(out_dir)!r} exists and is not a folder")
    entries = [p for p in out_dir.iterdir() if not p.name.startswith(_STAGING_PREFIX)]
    if not entries:
        return None
    if not (out_dir / _META).is_file():
        raise CrossLayerError(
            f"output folder {str(out_dir)!r} is not empty and holds no prepared dataset"
            "; pick another folder or empty it"
        )
    meta = read_meta(out_dir)
    if meta.get("fingerprint") != fingerprint:
        raise CrossLayerError(
            f"output folder {str(out_dir)!r} already holds data prepared with different arguments "
            f"(source {meta.get('source')!r}, tokenizer {meta.get('tokenizer')!r}); pick another folder or delete it"
        )
    itemsize = np.dtype(_DTYPES[meta["dtype"]]).itemsize
    complete = all(
        (out_dir / s["file"]).is_file() and (out_dir / s["file"]).stat().st_size == s["tokens"] * itemsize
        for s in meta["splits"].values()
    ) and all((out_dir / name).is_file() for name in meta["tokenizer_files"])
    if complete:
        return meta
    log.warning(f"{out_dir}: token files missing or damaged; preparing them again")
    return None


def _publish(staging: Path, out_dir: Path, names: list[str]) -> None:
    """Move the staged files into `out_dir`. Each rename is atomic; the old meta.json goes first and the
    new one last, so a folder whose meta.json exists is complete."""
    (out_dir / _META).unlink(missing_ok=True)
    for name in names:
        os.replace(staging / name, out_dir / name)
    staging.rmdir()


def _make_dirs(folder: Path) -> list[Path]:
    """Create `folder` and missing parents; return those created, outermost first."""
    folder = folder.absolute()
    missing = []
    for p in [folder, *folder.parents]:
        if p.exists():
            break
        missing.append(p)
    folder.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def _rmdir_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


# ----------------------------------------------------------------------------- small helpers


def _abs_pattern(pattern: str) -> str:
    return os.path.abspath(os.path.expanduser(pattern))


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _unit_hash(key: str) -> float:
    """A stable number in [0, 1) for `key` (Python's hash() is salted per process)."""
    return int(_sha256_text(key)[:16], 16) / 2**64


def _versions() -> dict:
    import tokenizers
    import transformers

    return {
        "python": sys.version.split()[0],
        "tokenizers": tokenizers.__version__,
        "transformers": transformers.__version__,
    }
