"""The `crosslayer` command: subcommand name -> the CLI module that registers and runs it."""

from __future__ import annotations

import importlib
import os
import sys

from .errors import CrossLayerError

# in the order `crosslayer --help` lists them; each module has register(subparsers)
COMMANDS = {
    "quickstart": "crosslayer.cli.quickstart",
    "prepare": "crosslayer.cli.data",
    "train": "crosslayer.cli.train",
    "kv": "crosslayer.cli.kv",
    "convert": "crosslayer.cli.convert",
    "frontier": "crosslayer.cli.frontier",
    "generate": "crosslayer.cli.generate",
    "eval": "crosslayer.cli.eval",
    "bench": "crosslayer.cli.bench",
    "sweep": "crosslayer.cli.sweep",
    "plot": "crosslayer.cli.sweep",
}


def build_parser():
    from .cli import ArgumentParser

    parser = ArgumentParser(prog="crosslayer",
                            description="Cross-Layer Attention: define, train, convert, evaluate, serve and measure CLA "
                                        "models. `crosslayer COMMAND --help` for each command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=ArgumentParser)
    registered = set()
    for module in COMMANDS.values():
        if module not in registered:
            importlib.import_module(module).register(sub)
            registered.add(module)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .cli import setup_logging

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # usage errors (one line, exit 2) and --help (exit 0)
        return int(e.code or 0)
    setup_logging(quiet=getattr(args, "no_progress", False))
    try:
        return int(args.func(args) or 0)
    except CrossLayerError as e:
        print(f"crosslayer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `crosslayer kv --list-presets | head`
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print(f"crosslayer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
