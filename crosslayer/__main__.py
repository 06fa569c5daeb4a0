"""The `crosslayer` command: a table of subcommands, each registered by its own module."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import CrossLayerError

# subcommand modules, in the order `crosslayer --help` lists them; each has add_parser(subparsers)
SUBCOMMANDS = [
    "crosslayer.quickstart", "crosslayer.data", "crosslayer.train", "crosslayer.kv", "crosslayer.convert",
    "crosslayer.generate", "crosslayer.eval", "crosslayer.bench",
    "crosslayer.sweep", "crosslayer.plot",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crosslayer", description="Cross-Layer Attention: define, train, convert and measure CLA models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
