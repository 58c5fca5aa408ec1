"""`lowbit` command line. Each subcommand lives in lowbit/commands/<name>.py and exposes
`register(subparsers)`, which adds its parser and sets `func(args) -> int` as the handler.

User errors (LowbitError) print one line and exit 2; no traceback reaches a CLI user.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import LowbitError

COMMANDS = ["demo", "inspect", "generate", "serve", "bench", "quantize"]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="lowbit", description="Run quantized LLM checkpoints exactly and fast.")
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"lowbit.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"lowbit.commands.{name}":
                continue  # not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LowbitError as e:
        msg = str(e)
        first, _, rest = msg.partition("\n")
        print(f"lowbit {args.command}: error: {first}", file=sys.stderr)
        if rest:
            print(rest, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
