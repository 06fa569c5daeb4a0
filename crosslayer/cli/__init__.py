"""The command line: every argparse parser, table and exit code lives below this package.

Conventions every command follows:
  - a folder output is `--out DIR`; a JSON result is `--json` (one object, the last line of stdout)
    and `--json-out FILE` (the same object in a file); long work has `--no-progress`;
  - every flag's help ends with its type and default, added by `HelpFormatter`;
  - a mistake the user made prints one line, `crosslayer CMD: error: ...`, and exits 2 (argparse's own
    usage errors included); nothing below `crosslayer/cli/` ever parses arguments or prints tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends `(TYPE, default: X)` to each flag's help, so every flag says what it takes."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default:" in text or "required)" in text or isinstance(action, argparse._HelpAction) \
                or not action.option_strings and action.nargs in (None, argparse.PARSER) and action.dest in ("", None) \
                or type(action).__name__ in ("_ChoicesPseudoAction", "_SubParsersAction"):
            return text
        if action.option_strings and action.nargs == 0:  # a switch
            return text if "(" in text[-1:] else f"{text} (switch)".strip()
        if action.default is argparse.SUPPRESS or not action.option_strings and action.nargs in ("?", "*"):
            return text
        kind = _type_name(action)
        if not action.option_strings:
            return f"{text} ({kind})"
        if action.required:
            return f"{text} ({kind}, required)"
        default = action.default
        shown = "none" if default is None else ",".join(map(str, default)) if isinstance(default, list) else default
        return f"{text} ({kind}, default: {shown})"


def _type_name(action: argparse.Action) -> str:
    if action.choices:
        return "one of " + ", ".join(map(str, action.choices))
    kind = action.type
    if kind is None:
        return action.metavar.lower() if isinstance(action.metavar, str) else "text"
    return getattr(kind, "type_name", getattr(kind, "__name__", "value"))


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with usage errors as one line (`crosslayer CMD: error: ...`) and exit code 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------
# Argument types: each has a `type_name` the help shows, and a message naming what is allowed


def _typed(name: str):
    def wrap(fn):
        fn.type_name = name
        return fn
    return wrap


def _at_least(kind: type, minimum: int, noun: str):
    """An argparse type: a `kind` (int or float) >= minimum; its message names what is allowed."""
    expected = f"{noun} >= {minimum}"

    @_typed(f"{kind.__name__} >= {minimum}")
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not value >= minimum:  # `not >=`: NaN is out of range too
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value
    return parse


positive_int = _at_least(int, 1, "an integer")
non_negative_int = _at_least(int, 0, "an integer")
non_negative_float = _at_least(float, 0, "a number")


def _list_type(kind: type, name: str, minimum: float | None = None):
    """An argparse type for comma-separated values (recipe.parse_list), optionally all >= minimum."""
    from ..errors import CrossLayerError
    from ..recipe import parse_list

    @_typed(name)
    def parse(text: str) -> list:
        try:
            values = parse_list(text, kind, "value")
        except CrossLayerError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("value: ")) from None
        if minimum is not None and min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}")
        return values
    return parse


int_list = _list_type(int, "comma-separated ints >= 1", minimum=1)
float_list = _list_type(float, "comma-separated numbers")
name_list = _list_type(str, "comma-separated names")


# ----------------------------------------------------------------------------------------------
# Flags many commands share


def add_json_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="end stdout with the result as one JSON object")
    p.add_argument("--json-out", default=None, metavar="FILE", help="also write the JSON result to FILE")


def add_progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")


def add_calibration_flags(p: argparse.ArgumentParser) -> None:
    """How calibration text is read and computed (convert and frontier): tokens, sequence length, the tokens plans
    are scored on, the compute dtype. Each command adds its own --calibration."""
    from ..calibration import CALIBRATION_SEQ_LEN, CALIBRATION_TOKENS, COMPUTE_DTYPES
    from ..plan import SEARCH_TOKENS

    p.add_argument("--calibration-tokens", type=positive_int, default=None,
                   help=f"calibration tokens read (default: {CALIBRATION_TOKENS})")
    p.add_argument("--calibration-seq-len", type=positive_int, default=None,
                   help=f"tokens per calibration sequence (default: {CALIBRATION_SEQ_LEN})")
    p.add_argument("--search-tokens", type=positive_int, default=None,
                   help=f"plan search: score plans on the first this many calibration tokens (default: {SEARCH_TOKENS}; "
                        "the K/V fits use all of --calibration-tokens)")
    p.add_argument("--compute-dtype", default="auto", choices=("auto", *COMPUTE_DTYPES),
                   help="calibration activations and plan search run in this dtype (auto: bf16 on CUDA or on a CPU "
                        "with bf16 matrix units, else fp32); plan costs and the K/V fit are summed in fp32/fp64")


def add_device_flags(p: argparse.ArgumentParser, dtype_default: str | None = "auto",
                     dtype_help: str = "auto: bf16 on CUDA, fp32 on CPU") -> None:
    """--device, and --dtype (default `dtype_default`; None: the command takes no --dtype)."""
    from ..device import DTYPE_CHOICES

    p.add_argument("--device", default="auto", metavar="DEVICE", help="auto, cpu, cuda or cuda:N")
    if dtype_default is not None:
        p.add_argument("--dtype", default=dtype_default, choices=DTYPE_CHOICES, help=dtype_help)


def add_model_flags(p: argparse.ArgumentParser, what: str = "model") -> None:
    """The model argument and how to read it: folder, hub id, .gguf file or a run's step checkpoint."""
    p.add_argument("model", help=f"{what}: a model folder, hub id, .gguf file, or a run's checkpoints/step_* folder")
    p.add_argument("--gguf-file", default=None, metavar="NAME",
                   help="read this GGUF file of the folder or hub repository MODEL")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer folder or hub id, when MODEL's folder has none")
    add_device_flags(p)


def load_model_from_args(args: argparse.Namespace):
    """(model, tokenizer) as the model flags say."""
    from ..loading import load_model

    return load_model(args.model, args.device, args.dtype, gguf_file=args.gguf_file,
                      tokenizer=args.tokenizer or True)


def emit(result: dict[str, Any], args: argparse.Namespace) -> int:
    """Finish a command: the JSON object as the last line (with --json) and in --json-out."""
    line = json.dumps(result, default=str)
    if getattr(args, "json_out", None):
        Path(args.json_out).write_text(line + "\n")
    if getattr(args, "json", False):
        print(line)
    return 0


def setup_logging(quiet: bool) -> None:
    """Library progress lines (logger `crosslayer`) go to stderr, bare, unless --no-progress."""
    log = logging.getLogger("crosslayer")
    log.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)

