"""`lowbit` command line. Each subcommand lives in lowbit/commands/<name>.py and exposes
`register(subparsers)`, which adds its parser and sets `func(args) -> int` as the handler.
Command modules import torch and the rest of lowbit inside their handlers only, so `--help` is fast.

Exit status: 0 success; 1 `inspect` found problems / `demo` saw a problem; 2 user error (LowbitError:
a bad path, flag, config or checkpoint), printed as one line without a traceback; 3 an unexpected
internal error (a bug: one line asking for a report; LOWBIT_DEBUG=1 shows the traceback); 130 Ctrl-C.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import LowbitError

COMMANDS = ["demo", "inspect", "generate", "serve", "bench", "quantize"]
EXIT_CODES = ("exit status: 0 success; 1 problems found (inspect, demo); 2 user error (bad path, flag, config or "
              "checkpoint: one line on stderr, no traceback); 3 internal error (a bug in lowbit: please report it)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless it is None/False or the help text already states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS) or not text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="lowbit", description="Run quantized LLM checkpoints exactly and fast.",
                                     epilog=EXIT_CODES, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_SubParser)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"lowbit.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"lowbit.commands.{name}":
                continue  # not built yet
            raise
        mod.register(sub)
    return parser


class _SubParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


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
    except Exception as e:  # a bug: one line and a request to report it, not a traceback
        if os.environ.get("LOWBIT_DEBUG"):
            raise
        where = e.__traceback__
        while where is not None and where.tb_next is not None:
            where = where.tb_next
        loc = f" at {os.path.basename(where.tb_frame.f_code.co_filename)}:{where.tb_lineno}" if where else ""
        print(f"lowbit {args.command}: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
              f"{loc}. This is a bug in lowbit: please report it with the command you ran "
              f"(LOWBIT_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
