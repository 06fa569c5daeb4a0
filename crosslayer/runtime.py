"""What every command needs, in one place: devices, dtype names, synchronisation, and loading a model.

A model is given as a folder (`save_pretrained` output, a converted or trained crosslayer model, a
training run's step checkpoint), a hub id, or a GGUF file (dequantised to the dtype asked for, with
the tokenizer, chat template and generation settings the file carries). Each mistake a user can
make here (no config, no tokenizer, unreadable weights, a tokenizer larger than the model's
vocabulary) raises one CrossLayerError naming the file and what is expected.
"""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path
from typing import Any

import torch

from .errors import CrossLayerError

# dtype names accepted everywhere (flags, recipes, suite configs)
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")

def _load_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (OSError, ValueError, KeyError, RuntimeError, ImportError, SafetensorError)


# what reading a model's files raises when they are missing, truncated or not what they claim to be
LOAD_ERRORS = _load_errors()

# files that make a tokenizer (and its chat template) loadable beside a model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


def dtype_by_name(name: str) -> torch.dtype:
    """torch dtype of a name such as `bf16` or `float32`."""
    if name not in DTYPES:
        raise CrossLayerError(f"dtype must be one of {', '.join(DTYPE_CHOICES[1:])}; got {name!r}")
    return DTYPES[name]


def pick_device(name: str = "auto") -> torch.device:
    """`auto`: the first CUDA device if there is one, else the CPU; or any name torch accepts (cpu, cuda:1)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CrossLayerError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CrossLayerError(f"device {name!r} asked for, but this torch sees no CUDA device")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA, fp32 on CPU; else the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype_by_name(name)


def sync(device: torch.device) -> None:
    """Wait for queued device work, so a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """A human name of the device, for benchmark reports."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()  # often just "x86_64" on Linux: the model name is better
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} CPU, {torch.get_num_threads()} threads"


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files `src` has into `dst`, byte for byte; returns the names copied."""
    import shutil

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
    from transformers import AutoModelForCausalLM

    import crosslayer  # noqa: F401  (registers CLAConfig / CLAForCausalLM with the Auto classes)

    from .checkpoint import is_step_checkpoint, load_step_checkpoint_model

    dev = device if isinstance(device, torch.device) else pick_device(device)
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
