"""Loading what a user names: a model, its tokenizer, its config, a model to train from or to imitate.

A model is given as a folder (`save_pretrained` output, a converted or trained crosslayer model, a
training run's step checkpoint), a hub id, or a GGUF file (dequantised to the dtype asked for, with
the tokenizer, chat template and generation settings the file carries). Each mistake a user can
make here (no config, no tokenizer, unreadable weights, a tokenizer larger than the model's
vocabulary, a training init that is not a crosslayer model of the data's tokenizer) raises one
CrossLayerError naming the file and what is expected.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from .checkpoint import is_step_checkpoint, load_step_checkpoint_model
from .config import CLAConfig
from .device import pick_device, pick_dtype
from .errors import CrossLayerError
from .modeling import CLAForCausalLM


def _load_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (OSError, ValueError, KeyError, RuntimeError, ImportError, SafetensorError)


# what reading a model's files raises when they are missing, truncated or not what they claim to be
LOAD_ERRORS = _load_errors()

# files that make a tokenizer (and its chat template) loadable beside a model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files `src` has into `dst`, byte for byte; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


@contextlib.contextmanager
def quiet_transformers():
    """No transformers warnings or progress bars: callers report what matters themselves."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# ----------------------------------------------------------------------------------------------
# Where a model lives


def split_model_spec(spec: str | Path, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(folder or hub id, GGUF file name or None) of what the user named.

    `path/to/model.gguf` -> (path/to, model.gguf); a folder or hub id with `gguf_file` keeps both.
    """
    spec = str(spec)
    if gguf_file is None and spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise CrossLayerError(f"GGUF file not found: {spec}")
        return str(path.parent), path.name
    if gguf_file is not None:
        if not gguf_file.endswith(".gguf"):
            raise CrossLayerError(f"gguf_file must name a .gguf file, got {gguf_file!r}")
        local = Path(spec)
        if local.is_dir() and not (local / gguf_file).is_file():
            raise CrossLayerError(f"{local} has no {gguf_file}")
    return spec, gguf_file


def looks_like_path(spec: str) -> bool:
    """A name that can only be a local path (not a hub id `owner/name`)."""
    return str(spec).startswith((".", "/", "~")) or str(spec).count("/") > 1


def _check_location(spec: str) -> Path | None:
    """The local folder of `spec`, after checking it is a model folder; None for a hub id."""
    path = Path(spec)
    if path.exists():
        if not path.is_dir():
            raise CrossLayerError(f"{spec} is a file; give a model folder, a hub id or a .gguf file")
        if not (path / "config.json").is_file():
            raise CrossLayerError(f"{spec} has no config.json: not a model folder (a training run's model is its "
                                  "run folder once finished, or one of its checkpoints/step_* folders)")
        return path
    if looks_like_path(spec):
        raise CrossLayerError(f"model folder not found: {spec}")
    return None


def load_tokenizer(spec: str | Path, gguf_file: str | None = None):
    """The tokenizer of a model folder, hub id or GGUF file."""
    from transformers import AutoTokenizer

    location, gguf_file = split_model_spec(spec, gguf_file)
    folder = None if gguf_file else _check_location(location)
    if folder is not None and not any((folder / n).is_file() for n in TOKENIZER_FILES):
        raise CrossLayerError(
            f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...): save the tokenizer beside the "
            f"model (tokenizer.save_pretrained({str(folder)!r})) or name one with --tokenizer"
        )
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(location, gguf_file=gguf_file) if gguf_file else \
                AutoTokenizer.from_pretrained(location)
    except LOAD_ERRORS as e:
        raise CrossLayerError(f"cannot load the tokenizer of {spec}: {_first_line(e)}") from None


def load_model(spec: str | Path, device: str | torch.device = "auto", dtype: str = "auto",
               gguf_file: str | None = None, tokenizer: str | Path | None | bool = True) -> tuple[Any, Any]:
    """(model in eval mode on `device`, its tokenizer) from a folder, hub id, GGUF file or step checkpoint.

    `tokenizer`: True loads the model's own, a path or hub id loads that one, False loads none.
    """
    from transformers import AutoModelForCausalLM  # (the package's import registered our classes with it)

    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    location, gguf_file = split_model_spec(spec, gguf_file)
    folder = None if gguf_file else _check_location(location)
    tok = None
    if tokenizer is True:
        tok = load_tokenizer(location, gguf_file)
    elif tokenizer:
        tok = load_tokenizer(tokenizer)
    try:
        with quiet_transformers():
            if folder is not None and is_step_checkpoint(folder):
                model = load_step_checkpoint_model(folder, torch_dtype)
            elif gguf_file:
                model = AutoModelForCausalLM.from_pretrained(location, gguf_file=gguf_file, dtype=torch_dtype)
            else:
                model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype)
    except CrossLayerError:
        raise
    except LOAD_ERRORS as e:
        raise CrossLayerError(f"cannot load the model weights of {spec}: {_first_line(e)}") from None
    if tok is not None:
        check_tokenizer_fits(tok, model.config, str(spec))
    return model.to(dev).eval(), tok


def check_tokenizer_fits(tokenizer, config, what: str) -> None:
    """Refuse a tokenizer whose ids run past the model's embedding (an IndexError deep in the model otherwise)."""
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise CrossLayerError(
            f"the tokenizer of {what} has {len(tokenizer):,} tokens but the model's vocabulary is {vocab:,}: "
            "they do not belong together (give the model's own tokenizer)"
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


# ----------------------------------------------------------------------------------------------
# What a config and a tokenizer are, before any weight is read


# model_type -> class, for configs that do not name their class (those read from GGUF metadata)
ARCHITECTURE_OF = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                   "crosslayer": "CLAForCausalLM"}


def read_source_config(spec: str | Path, gguf_file: str | None = None) -> dict[str, Any]:
    """The config (as a dict, with `architectures`) of a checkpoint folder, hub id or GGUF file,
    before any weight is read."""
    location, gguf_file = split_model_spec(spec, gguf_file)
    path = Path(location)
    if gguf_file is None and (path.exists() or looks_like_path(location)):
        if not path.is_dir():
            raise CrossLayerError(f"source {path} is not a folder (give a checkpoint folder, a hub id or a .gguf file)")
        if not (path / "config.json").exists():
            raise CrossLayerError(f"{path} has no config.json: not a transformers checkpoint folder")
        try:
            raw = json.loads((path / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CrossLayerError(f"cannot read {path / 'config.json'}: {e}") from None
        if not isinstance(raw, dict):
            raise CrossLayerError(f"{path / 'config.json'} does not hold a JSON object")
        return raw
    from transformers import AutoConfig

    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(location, gguf_file=gguf_file) if gguf_file else \
                AutoConfig.from_pretrained(location)
    except (OSError, ValueError, KeyError) as e:
        raise CrossLayerError(f"cannot read the config of {spec}: {type(e).__name__}: {e}") from None
    raw = config.to_dict()
    if not raw.get("architectures"):  # GGUF metadata names the model type, not the class
        raw["architectures"] = [ARCHITECTURE_OF.get(raw.get("model_type"), raw.get("model_type"))]
    return raw


def tokenizer_fingerprint(tokenizer_or_folder) -> str | None:
    """A sha256 of what makes a tokenizer: its model (vocabulary, merges) and added tokens, so two
    tokenizers that encode alike match whatever transformers version saved them. None for a folder
    without tokenizer files."""
    tokenizer = tokenizer_or_folder
    if isinstance(tokenizer_or_folder, (str, Path)):
        folder = Path(tokenizer_or_folder)
        if not any((folder / n).is_file() for n in TOKENIZER_FILES):
            return None
        if (folder / "tokenizer.json").is_file():
            raw = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
            return _fingerprint(raw)
        tokenizer = load_tokenizer(folder)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CrossLayerError(f"tokenizer {type(tokenizer).__name__} is not a fast (tokenizers) one: no tokenizer.json")
    return _fingerprint(json.loads(backend.to_str()))


def _fingerprint(raw: dict) -> str:
    added = sorted((t["id"], t["content"]) for t in raw.get("added_tokens") or [])
    text = json.dumps({"model": raw.get("model"), "added": added}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------
# Models the trainer starts from or imitates


def load_init_model(init: str, data: str, meta: dict, attn_implementation: str) -> CLAForCausalLM:
    """The model `--init` names, after checking it is a crosslayer model of the dataset's tokenizer."""
    folder = Path(init)
    if not folder.is_dir():
        raise CrossLayerError(f"init: model folder not found: {init}")
    raw = read_source_config(folder)
    if raw.get("model_type") != "crosslayer":
        raise CrossLayerError(
            f"init: {init} is a {raw.get('model_type')!r} model, not a crosslayer one; convert it first "
            f"(`crosslayer convert {init} --out DIR --cla-factor N`, factor 1 for an exact copy) and --init DIR"
        )
    theirs = tokenizer_fingerprint(folder)
    if theirs is None:
        raise CrossLayerError(f"init: {init} has no tokenizer files, so the data cannot be checked against it; save "
                              "the model's tokenizer beside it")
    if theirs != meta.get("tokenizer_fingerprint"):
        raise CrossLayerError(
            f"data: {data} was not tokenised with the tokenizer of {init} (prepared with {meta.get('tokenizer')!r}); "
            f"prepare it with `crosslayer prepare SOURCE --tokenizer hf:{init} --out DIR`"
        )
    try:
        with quiet_transformers():
            model, info = CLAForCausalLM.from_pretrained(init, attn_implementation=attn_implementation,
                                                         dtype=torch.float32, output_loading_info=True)
    except LOAD_ERRORS as e:
        raise CrossLayerError(f"init: cannot load the weights of {init}: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    missing = [k for k in info.get("missing_keys") or [] if not (model.config.tie_word_embeddings and "lm_head" in k)]
    if missing or info.get("unexpected_keys") or info.get("mismatched_keys"):
        raise CrossLayerError(f"init: the weights of {init} do not match its config.json (missing {missing[:3]}, "
                              f"unexpected {list(info.get('unexpected_keys') or [])[:3]})")
    if model.config.vocab_size < meta["vocab_size"]:
        raise CrossLayerError(f"init model's vocabulary ({model.config.vocab_size}) is smaller than the "
                              f"dataset's ({meta['vocab_size']})")
    return model


def load_teacher(spec: str, student: CLAConfig, device: torch.device) -> torch.nn.Module:
    """The frozen original model a distillation objective imitates; it must share the student's vocabulary."""
    teacher, _ = load_model(spec, device, "fp32", tokenizer=False)
    if teacher.config.vocab_size != student.vocab_size:
        raise CrossLayerError(f"teacher: {spec} has a vocabulary of {teacher.config.vocab_size}, the model trained "
                              f"has {student.vocab_size}: distillation needs the same tokens")
    teacher.requires_grad_(False)
    return teacher
