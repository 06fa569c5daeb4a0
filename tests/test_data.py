"""Tests for crosslayer.data: sources, splits, tokenizers, token files, reuse and errors.

Real corpora come from the shared data folder beside the checkout (read-only, never copied into
the repository); tests needing it are skipped when it is absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from crosslayer import data
from crosslayer.errors import CrossLayerError

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data folder {SHARED} not present")
BOOKS = ["a_modest_proposal.txt", "the_gift_of_the_magi.txt", "the_yellow_wallpaper.txt"]


# ----------------------------------------------------------------------------- helpers


def documents(out: Path, split: str) -> list[str]:
    """Decode a token file back into its documents, cutting at the EOS token."""
    meta = data.read_meta(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = np.asarray(data.load_tokens(out, split))
    ends = np.flatnonzero(ids == meta["eos_token_id"])
    assert len(ids) and ids[-1] == meta["eos_token_id"], "every document, the last too, ends with EOS"
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(ids[s:e].tolist(), skip_special_tokens=False) for s, e in zip(starts, ends, strict=True)]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_meta_matches_files(out: Path) -> dict:
    meta = data.read_meta(out)
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        s = meta["splits"][split]
        path = out / s["file"]
        assert path.stat().st_size == s["tokens"] * itemsize
        assert s["sha256"] == sha(path)
        tokens = data.load_tokens(out, split)
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.dtype(meta["dtype"]) and len(tokens) == s["tokens"]
        # exactly one separator per document
        assert int((np.asarray(tokens) == meta["eos_token_id"]).sum()) == s["documents"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporaries left behind"
    return meta


@pytest.fixture(scope="module")
def books(tmp_path_factory) -> Path:
    """Three short Gutenberg books, one in a subfolder (exercises '**')."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder {SHARED} not present")
    root = tmp_path_factory.mktemp("books")
    (root / "sub").mkdir()
    for i, name in enumerate(BOOKS):
        shutil.copy(SHARED / "gutenberg" / "books" / name, root / ("sub" if i == 2 else "") / name)
    return root


@pytest.fixture(scope="module")
def books_out(books, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "books"
    data.prepare(f"text:{books}/**/*.txt", out, tokenizer="bpe:400", val_fraction=0.3, progress=False)
    return out


# ----------------------------------------------------------------------------- sources


def test_stdlib_split_is_by_file_and_deterministic(tmp_path):
    kw = dict(tokenizer="bpe:400", max_train_docs=30, progress=False)
    meta_a = data.prepare("stdlib", tmp_path / "a", **kw)
    meta_b = data.prepare("stdlib", tmp_path / "b", **kw)

    for name in ("train.bin", "val.bin", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert meta_a["splits"] == meta_b["splits"] and meta_a["fingerprint"] == meta_b["fingerprint"]
    check_meta_matches_files(tmp_path / "a")

    # The expected split, rebuilt from the file list: 2 % of the non-empty files, by path hash.
    files = [(k, p) for k, p in data._stdlib_files() if p.stat().st_size > 0]
    assert not any("/test/" in f"/{k}" or "site-packages" in k for k, _ in files)
    n_val = round(0.02 * len(files))
    ranked = sorted(files, key=lambda f: (hashlib.sha256(f[0].encode()).hexdigest(), f[0]))
    val_keys = {k for k, _ in ranked[:n_val]}
    train_files = [(k, p) for k, p in files if k not in val_keys]
    text = {k: p.read_text(encoding="utf-8") for k, p in files}
    expected_train = [text[k] for k, _ in train_files if text[k].strip()][:30]
    expected_val = [text[k] for k, _ in files if k in val_keys and text[k].strip()]

    assert meta_a["splits"]["train"]["documents"] == 30
    assert meta_a["splits"]["val"]["documents"] == len(expected_val) == n_val > 5
    assert documents(tmp_path / "a", "train") == expected_train
    assert documents(tmp_path / "a", "val") == expected_val
    assert meta_a["splits"]["val"]["bytes"] == sum(len(t.encode()) for t in expected_val)
    assert meta_a["vocab_size"] == 400 and meta_a["eos_token_id"] == 0 and meta_a["dtype"] == "uint16"


@needs_shared
def test_text_with_explicit_val_files_round_trips(tmp_path):
    ptb = SHARED / "ptb"
    out = tmp_path / "ptb"
    meta = data.prepare(
        f"text:{ptb}/ptb.train.txt", out, tokenizer="bpe:512", val=str(ptb / "ptb.valid.txt"), progress=False
    )
    check_meta_matches_files(out)
    train_text = (ptb / "ptb.train.txt").read_text(encoding="utf-8")
    val_text = (ptb / "ptb.valid.txt").read_text(encoding="utf-8")

    assert meta["splits"]["train"]["documents"] == 1 and meta["splits"]["val"]["documents"] == 1
    assert meta["splits"]["train"]["bytes"] == (ptb / "ptb.train.txt").stat().st_size == 5_101_618
    assert meta["splits"]["val"]["bytes"] == (ptb / "ptb.valid.txt").stat().st_size
    assert meta["vocab_size"] == 512 and meta["dtype"] == "uint16"
    assert documents(out, "train") == [train_text]
    assert documents(out, "val") == [val_text]
    # a 512-token BPE compresses PTB to roughly 2-4 bytes per token
    assert 2.0 < meta["splits"]["train"]["bytes"] / meta["splits"]["train"]["tokens"] < 4.5
    assert meta["val_method"].startswith("files matching")
    assert meta["arguments"]["val_fraction"] is None


@needs_shared
def test_text_by_file_fraction_with_relative_recursive_glob(books, books_out, tmp_path, monkeypatch):
    texts = {p.name: p.read_text(encoding="utf-8") for p in books.rglob("*.txt")}
    meta = check_meta_matches_files(books_out)
    train, val = documents(books_out, "train"), documents(books_out, "val")

    # whole books go to exactly one split: round(0.3 * 3) = 1 validation book
    assert len(train) == 2 and len(val) == 1
    assert sorted(train + val) == sorted(texts.values())
    keys = ["a_modest_proposal.txt", "the_gift_of_the_magi.txt", "sub/the_yellow_wallpaper.txt"]
    split_bytes = meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"]
    assert split_bytes == sum((books / k).stat().st_size for k in keys)
    # round trip of the first document: train files are read in sorted order of relative path
    first_train = min(k for k in keys if (books / k).read_text(encoding="utf-8") in train)
    assert train[0] == (books / first_train).read_text(encoding="utf-8")

    # A relative glob resolves against the current folder and gives the same split; even a tiny
    # val_fraction holds out one book (split by rank, not by threshold).
    monkeypatch.chdir(books)
    rel = data.prepare("text:**/*.txt", tmp_path / "rel", tokenizer="bpe:400", val_fraction=0.3, progress=False)
    assert rel["splits"] == meta["splits"]
    tiny = data.prepare("text:**/*.txt", tmp_path / "tiny", tokenizer="bpe:400", val_fraction=0.001, progress=False)
    assert tiny["splits"]["val"]["documents"] == 1 and tiny["splits"]["train"]["documents"] == 2


def test_token_dtype_choice():
    assert data.token_dtype(300) == "uint16"
    assert data.token_dtype(65536) == "uint16"  # ids 0..65535 fit
    assert data.token_dtype(65537) == "uint32"
    assert data.token_dtype(152_064) == "uint32"


@needs_shared
def test_jsonl_by_line_fraction(tmp_path):
    path = SHARED / "lambada_openai" / "lambada_openai.jsonl"
    contexts = [json.loads(line)["context"] for line in path.read_text(encoding="utf-8").splitlines()]
    meta = data.prepare(
        f"jsonl:{path}:context", tmp_path / "lam", tokenizer="bpe:400", val_fraction=0.05, progress=False
    )
    check_meta_matches_files(tmp_path / "lam")
    train, val = meta["splits"]["train"], meta["splits"]["val"]

    assert train["documents"] + val["documents"] == len(contexts) == 5153
    assert 0.03 < val["documents"] / len(contexts) < 0.07
    assert train["bytes"] + val["bytes"] == sum(len(c.encode()) for c in contexts)
    assert sorted(documents(tmp_path / "lam", "train") + documents(tmp_path / "lam", "val")) == sorted(contexts)


def test_jsonl_explicit_val_plain_glob_and_other_field(tmp_path):
    words = "the quick brown fox jumps over the lazy dog while seven wizards quietly hex jolly kings".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) for i in range(60)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"body": t, "n": i}) + "\n" for i, t in enumerate(lines)))
    valid = [json.dumps({"body": "held out one"}), "", json.dumps({"body": None})]
    (tmp_path / "valid.jsonl").write_text("\n".join(valid) + "\n")
    (tmp_path / "other.jsonl").write_text(json.dumps({"content": "held out two"}) + "\n")

    # the source glob also matches valid.jsonl: files held out for validation never reach train
    plain = data.prepare(
        f"jsonl:{tmp_path}/[tv]*.jsonl:body",
        tmp_path / "o1",
        tokenizer="bpe:300",
        val=str(tmp_path / "valid.jsonl"),
        progress=False,
    )
    assert plain["splits"]["train"]["documents"] == 60
    assert plain["splits"]["val"]["documents"] == 1  # blank line and null field skipped
    assert documents(tmp_path / "o1", "train") == lines
    assert documents(tmp_path / "o1", "val") == ["held out one"]

    other = data.prepare(
        f"jsonl:{tmp_path}/train.jsonl:body",
        tmp_path / "o2",
        tokenizer="bpe:300",
        val=f"jsonl:{tmp_path}/other.jsonl:content",
        progress=False,
    )
    assert other["splits"]["train"]["documents"] == 60
    assert documents(tmp_path / "o2", "val") == ["held out two"]
    assert documents(tmp_path / "o2", "train") == lines


def test_jsonl_missing_field_is_a_clear_error(tmp_path):
    src = tmp_path / "rows.jsonl"
    src.write_text(json.dumps({"text": "a b c " * 500}) + "\n" + json.dumps({"txt": "oops"}) + "\n")
    with pytest.raises(CrossLayerError, match=r"rows\.jsonl:2: no field 'text' \(fields here: txt\)"):
        data.prepare(f"jsonl:{src}:text", tmp_path / "out", tokenizer="bpe:300", progress=False)
    assert not (tmp_path / "out").exists()


HF_SCRIPT = """
import json, sys
from crosslayer import data
with_val = data.prepare("hf:" + sys.argv[1], sys.argv[3], tokenizer="bpe:300", progress=False)
by_fraction = data.prepare("hf:" + sys.argv[2], sys.argv[4], tokenizer="bpe:300", val_fraction=0.2, progress=False)
print(json.dumps([with_val, by_fraction]))
"""


def test_hf_source_from_local_folder_offline(tmp_path):
    pytest.importorskip("datasets", reason="the hf source needs `pip install datasets`")
    rows = [f"row {i}: " + " ".join(f"w{(i * j) % 97}" for j in range(60)) for i in range(200)]
    both, train_only = tmp_path / "both", tmp_path / "train_only"
    both.mkdir()
    train_only.mkdir()
    for folder in (both, train_only):
        (folder / "train.jsonl").write_text(
            "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(rows))
        )
    (both / "validation.jsonl").write_text(
        "".join(json.dumps({"text": f"validation row {i}"}) + "\n" for i in range(20))
    )

    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    # A subprocess, because datasets/huggingface_hub read the offline switches when imported.
    done = subprocess.run(
        [sys.executable, "-c", HF_SCRIPT, str(both), str(train_only), str(tmp_path / "o1"), str(tmp_path / "o2")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with_val, by_fraction = json.loads(done.stdout.strip().splitlines()[-1])

    assert with_val["val_method"] == "split 'validation'"
    assert with_val["splits"]["train"]["documents"] == 200 and with_val["splits"]["val"]["documents"] == 20
    assert with_val["splits"]["train"]["bytes"] == sum(len(r.encode()) for r in rows)
    assert documents(tmp_path / "o1", "val")[:2] == ["validation row 0", "validation row 1"]
    assert documents(tmp_path / "o1", "train") == rows

    n_val = by_fraction["splits"]["val"]["documents"]
    assert by_fraction["splits"]["train"]["documents"] + n_val == 200 and 20 <= n_val <= 60
    assert sorted(documents(tmp_path / "o2", "train") + documents(tmp_path / "o2", "val")) == sorted(rows)


def test_hf_source_without_datasets_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(CrossLayerError, match=r"pip install datasets"):
        data.prepare("hf:some/dataset", tmp_path / "out", tokenizer="bpe:300", progress=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- tokenizers


@needs_shared
def test_saved_tokenizer_loads_with_autotokenizer(books_out):
    from transformers import AutoTokenizer

    meta = data.read_meta(books_out)
    auto = AutoTokenizer.from_pretrained(books_out)
    raw = Tokenizer.from_file(str(books_out / "tokenizer.json"))
    sample = documents(books_out, "val")[0][:3000]
    assert auto(sample)["input_ids"] == raw.encode(sample, add_special_tokens=False).ids
    assert auto.eos_token == "<|endoftext|>" and auto.eos_token_id == meta["eos_token_id"] == 0
    assert auto.pad_token_id == auto.bos_token_id == 0
    assert len(auto) == meta["vocab_size"] == 400
    assert auto.decode(auto(sample)["input_ids"]) == sample
    assert sorted(meta["tokenizer_files"]) == ["tokenizer.json", "tokenizer_config.json"]


@needs_shared
def test_existing_tokenizer_from_a_prepared_folder(books_out, tmp_path):
    ptb = SHARED / "ptb" / "ptb.valid.txt"
    out = tmp_path / "ptb_with_book_tokenizer"
    meta = data.prepare(
        f"text:{ptb}", out, tokenizer=f"hf:{books_out}", val=str(SHARED / "ptb" / "ptb.test.txt"), progress=False
    )
    check_meta_matches_files(out)
    assert meta["vocab_size"] == 400 and meta["eos_token_id"] == 0
    # the new tokens are exactly the book tokenizer's encoding of the text, plus one EOS
    book_tok = Tokenizer.from_file(str(books_out / "tokenizer.json"))
    expected = book_tok.encode(ptb.read_text(encoding="utf-8"), add_special_tokens=False).ids + [0]
    assert np.array_equal(np.asarray(data.load_tokens(out, "train")), np.array(expected, dtype=np.uint16))
    assert (out / "tokenizer.json").read_text() == (books_out / "tokenizer.json").read_text()


def test_bpe_training_is_byte_identical(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"d{i}.txt").write_text(" ".join(f"token{(i * 31 + j * 7) % 53} and more" for j in range(300)))
    a = data.prepare(f"text:{src}/*.txt", tmp_path / "a", tokenizer="bpe:320", val_fraction=0.2, progress=False)
    b = data.prepare(f"text:{src}/*.txt", tmp_path / "b", tokenizer="bpe:320", val_fraction=0.2, progress=False)
    assert sha(tmp_path / "a" / "tokenizer.json") == sha(tmp_path / "b" / "tokenizer.json")
    assert a["splits"] == b["splits"]
    # this corpus runs out of pairs to merge before 320: meta records the real size, not the request
    assert a["vocab_size"] == Tokenizer.from_file(str(tmp_path / "a" / "tokenizer.json")).get_vocab_size() < 320
    assert a["splits"]["val"]["documents"] == 1 and a["splits"]["train"]["documents"] == 5


# ----------------------------------------------------------------------------- reuse


@needs_shared
def test_reuse_and_refuse_to_overwrite(books, tmp_path, caplog):
    out = tmp_path / "out"
    args = (f"text:{books}/**/*.txt", out)
    first = data.prepare(*args, tokenizer="bpe:300", val_fraction=0.3, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    caplog.clear()
    caplog.set_level("INFO", logger="crosslayer")

    t0 = time.perf_counter()
    again = data.prepare(*args, tokenizer="bpe:300", val_fraction=0.3, progress=False)
    assert time.perf_counter() - t0 < 1.0
    assert again == first
    assert "reusing prepared data" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    with pytest.raises(CrossLayerError, match="different arguments.*another folder or delete it"):
        data.prepare(*args, tokenizer="bpe:320", val_fraction=0.3, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    check_meta_matches_files(out)

    # token files damaged: same arguments rebuild them identically
    (out / "val.bin").unlink()
    rebuilt = data.prepare(*args, tokenizer="bpe:300", val_fraction=0.3, progress=False)
    assert rebuilt["splits"] == first["splits"]
    check_meta_matches_files(out)


def test_refuses_a_non_empty_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "src.txt").write_text("x y z " * 2000)
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CrossLayerError, match="not empty and holds no prepared dataset"):
        data.prepare(f"text:{tmp_path}/src.txt", out, tokenizer="bpe:300", val=str(tmp_path / "src.txt"))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


# ----------------------------------------------------------------------------- errors


def _write(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


@pytest.mark.parametrize(
    "files, source, kwargs, message",
    [
        ({}, "csv:data/*.csv", {}, "unknown source 'csv:data/\\*.csv'"),
        ({}, "text:", {}, "unknown source"),
        ({}, "text:{src}/*.nothing", {}, "source glob .* matches no files"),
        ({"a.txt": "x " * 3000}, "text:{src}/a.txt", {"val": "{src}/missing*.txt"}, "val glob .* matches no files"),
        ({"a.txt": "", "b.txt": "  \n"}, "text:{src}/a.txt", {"val": "{src}/b.txt"}, "corpus is empty"),
        ({"a.txt": "tiny corpus", "b.txt": "v"}, "text:{src}/a.txt", {"val": "{src}/b.txt"}, "too small: .* 2048"),
        ({"a.txt": "x " * 3000, "b.txt": ""}, "text:{src}/a.txt", {"val": "{src}/b.txt"}, "validation split is empty"),
        ({"a.txt": "x " * 3000}, "text:{src}/a.txt", {}, "at least 2"),
        ({"a.txt": "x " * 3000, "b.txt": "y"}, "text:{src}/*.txt", {"val_fraction": 0.0}, "val_fraction must be > 0"),
        ({"a.txt": "x " * 3000}, "text:{src}/a.txt", {"val": "{src}/a.txt"}, "also matched by val"),
        ({"a.txt": "x"}, "text:{src}/a.txt", {"tokenizer": "bpe:100"}, r"VOCAB must be an integer >= 257"),
        ({"a.txt": "x"}, "text:{src}/a.txt", {"tokenizer": "bpe:lots"}, r"VOCAB must be an integer"),
        ({"a.txt": "x"}, "text:{src}/a.txt", {"tokenizer": "wordpiece:300"}, "unknown tokenizer"),
        ({"a.txt": "x"}, "text:{src}/a.txt", {"val_fraction": 1.5}, r"val_fraction must be a number in \[0, 1\)"),
        ({"a.txt": "x"}, "text:{src}/a.txt", {"max_train_docs": 0}, "max_train_docs must be a positive integer"),
        ({}, "stdlib", {"val": "x*.txt"}, "val is not supported for the stdlib source"),
        ({"a.jsonl": "{}\n"}, "jsonl:{src}/a.jsonl", {}, "jsonl:GLOB:FIELD"),
        ({"a.jsonl": "not json\n"}, "jsonl:{src}/a.jsonl:text", {}, r"a\.jsonl:1: not a UTF-8 JSON line"),
    ],
)
def test_user_errors_write_nothing(tmp_path, files, source, kwargs, message):
    src = tmp_path / "src"
    _write(src, files)
    fill = {k: v.format(src=src) if isinstance(v, str) else v for k, v in kwargs.items()}
    fill.setdefault("tokenizer", "bpe:300")
    out = tmp_path / "deeper" / "out"
    with pytest.raises(CrossLayerError, match=message):
        data.prepare(source.format(src=src), out, progress=False, **fill)
    assert not (tmp_path / "deeper").exists(), "the output folder (and its created parents) are removed"


def test_read_meta_and_load_tokens_errors(tmp_path):
    with pytest.raises(CrossLayerError, match="does not exist"):
        data.read_meta(tmp_path / "nope")
    with pytest.raises(CrossLayerError, match="not a prepared dataset"):
        data.load_tokens(tmp_path, "train")
    (tmp_path / "meta.json").write_text("{broken")
    with pytest.raises(CrossLayerError, match="not readable JSON"):
        data.read_meta(tmp_path)
    with pytest.raises(CrossLayerError, match="split must be one of train, val"):
        data.load_tokens(tmp_path, "test")


# ----------------------------------------------------------------------------- CLI


@needs_shared
def test_cli_prepare(books, tmp_path, capsys):
    from crosslayer.__main__ import build_parser

    parser = build_parser()
    assert parser.parse_args(["prepare", "--out", "x"]).source == "stdlib"

    args = parser.parse_args(
        [
            "prepare",
            f"text:{books}/**/*.txt",
            "--out",
            str(tmp_path / "cli"),
            "--tokenizer",
            "bpe:300",
            "--val-fraction",
            "0.3",
            "--max-train-docs",
            "1",
            "--no-progress",
        ]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    meta = data.read_meta(tmp_path / "cli")
    assert meta["splits"]["train"]["documents"] == 1 and meta["arguments"]["max_train_docs"] == 1
    assert f"{meta['splits']['train']['tokens']:,} tokens" in printed
    assert "vocab 300" in printed and str(tmp_path / "cli") in printed
