"""The ``cairn`` command line.

Each sub-command lives in its own module under ``cairn.commands`` and offers two functions:
``register(subparsers)`` adds its parser (and ``set_defaults(func=run)``) and ``run(args) -> int``
does the work. User errors (:class:`cairn.errors.CairnError`) become one message on stderr and exit
status 2; nothing else is caught, so a bug keeps its traceback.

Global options: ``--quiet`` / ``--verbose`` set how much cairn and the libraries under it print
(:mod:`cairn.verbosity`); a command's ``--no-progress`` hides every progress bar, transformers' and
the hub's included. Every command's ``--help`` shows an option's default once: where its help text
does not already say it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cairn import __version__
from cairn.errors import CairnError

# Order is the order shown by ``cairn --help``.
COMMAND_MODULES = ["demo", "run", "merge", "mix", "eval", "report", "export", "init", "contribute", "ledger",
                   "models", "config"]


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help only when there is a default worth showing and the
    help text does not already mention it (argparse's ArgumentDefaultsHelpFormatter printed
    "(default: all) (default: None)")."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or "%(default)" in text or default in (None, False, argparse.SUPPRESS)
                or default == [] or isinstance(action, (argparse._HelpAction, argparse._VersionAction))
                or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


class _Subparsers:
    """Wraps argparse's sub-parser action so that every command gets :class:`HelpFormatter`."""

    def __init__(self, action):
        self._action = action

    def add_parser(self, name, **kwargs):
        kwargs["formatter_class"] = HelpFormatter
        return self._action.add_parser(name, **kwargs)

    def __getattr__(self, item):
        return getattr(self._action, item)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cairn",
        description="Add new knowledge to an LLM round after round without losing what it knew.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cairn {__version__}")
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", action="store_true",
                      help="errors and results only: no progress lines, bars or library warnings")
    loud.add_argument("-v", "--verbose", action="store_true",
                      help="also the libraries' info messages (transformers, accelerate, datasets, hub)")
    sub = _Subparsers(parser.add_subparsers(dest="command", metavar="COMMAND"))
    for name in COMMAND_MODULES:
        importlib.import_module(f"cairn.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    from cairn import verbosity

    verbosity.configure("quiet" if args.quiet else "verbose" if args.verbose else "normal",
                        progress=not getattr(args, "no_progress", False))
    if args.quiet and hasattr(args, "no_progress"):
        args.no_progress = True  # commands pass progress=not args.no_progress to cairn's own bars
    try:
        return int(args.func(args) or 0)
    except CairnError as exc:
        print(f"cairn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `cairn config schema | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"cairn {args.command}: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
