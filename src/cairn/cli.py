"""The ``cairn`` command line.

Each sub-command lives in its own module under ``cairn.commands`` and offers two functions:
``register(subparsers)`` adds its parser (and ``set_defaults(func=run)``) and ``run(args) -> int``
does the work. User errors (:class:`cairn.errors.CairnError`) become one message on stderr and exit
status 2; nothing else is caught, so a bug keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cairn import __version__
from cairn.errors import CairnError

# Order is the order shown by ``cairn --help``.
COMMAND_MODULES = ["demo", "run", "merge", "mix", "eval", "report", "models",
                   "init", "contribute", "ledger"]  # ledger helper: model projects (cairn.ledger)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cairn",
        description="Add new knowledge to an LLM round after round without losing what it knew.",
    )
    parser.add_argument("--version", action="version", version=f"cairn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"cairn.commands.{name}")
        except ModuleNotFoundError as exc:  # a command not built yet is simply not offered
            if exc.name == f"cairn.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except CairnError as exc:
        print(f"cairn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cairn {args.command}: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
