"""``cairn config schema``: every experiment-config key with its type, default and help.

Generated from the config dataclasses (:mod:`cairn.config`) and the method sections the method pieces
register (:func:`cairn.methods.registry.sections`: ``lora``, ``olora``, ``ewc``, ...), so it cannot drift
from what the loader accepts. ``--format markdown`` prints a table for documentation.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal


def register(sub) -> None:
    p = sub.add_parser("config", help="experiment config tools: `cairn config schema` lists every key",
                       description="Experiment config tools.")
    inner = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    s = inner.add_parser("schema", help="print every config key with its type, default and help",
                         description="Print every key an experiment YAML accepts, with its type, default and "
                                     "help text, generated from the config dataclasses and the method sections "
                                     "the method pieces register (lora, loramoe, olora, nlora, ewc, ...). Keys "
                                     "under tasks[] and methods[] belong to each list item.",
                         formatter_class=p.formatter_class)
    s.add_argument("--format", choices=["text", "markdown"], default="text", help="output format")
    s.add_argument("--section", default=None, metavar="PREFIX",
                   help="only keys that start with PREFIX, e.g. training or methods[].lora")
    s.set_defaults(func=run_schema)
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of ``X | None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(tp)):
            return args[0], True
    return tp, False


def type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is list:
        return f"list[{type_name(args[0])}]"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "section"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return "null" if f.default is None else repr(f.default) if isinstance(f.default, str) else str(f.default)
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return "(section)"
        return str(value)
    return "required"


def schema_rows(cls: type | None = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every key of ``cls`` (default: the experiment config), recursively."""
    from cairn.config import ExperimentConfig

    cls = cls or ExperimentConfig
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if f.metadata.get("section_holder"):  # the method pieces' registered sections, keys of the item itself
            rows += _registered_section_rows(prefix)
            continue
        tp, optional = _unwrap(hints[f.name])
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else None
        if dataclasses.is_dataclass(tp):
            kind = "section" + (" | null" if optional else "")
            rows.append((key, kind, _default(f), f.metadata.get("help", "")))
            rows += schema_rows(tp, f"{key}.")
        elif inner is not None and dataclasses.is_dataclass(inner):
            rows.append((key, "list of sections", _default(f), f.metadata.get("help", "")))
            rows += schema_rows(inner, f"{key}[].")
        else:
            name = type_name(hints[f.name])
            rows.append((key, name, _default(f), f.metadata.get("help", "")))
    return rows


def _section_help(key: str, section) -> str:
    doc = section.cls.__doc__ or ""
    if doc.startswith(section.cls.__name__ + "("):  # the dataclass' generated signature, not a docstring
        doc = ""
    doc = " ".join(doc.strip().split("\n\n")[0].split())
    role = (f"Settings of the `{key}` trainable (read when `trainable: {key}`)." if section.default_on
            else f"Switches the `{key}` part on for this method when present (omit: off).")
    return f"{role} {doc}".strip()


def _registered_section_rows(prefix: str) -> list[tuple[str, str, str, str]]:
    """Rows for every config section registered by a method piece (see cairn.methods.registry)."""
    from cairn.methods.registry import sections

    rows = []
    for key, section in sorted(sections().items()):
        if section.cls is None:  # a part configured by a plain MethodConfig field (replay)
            continue
        kind, default = ("section", "(section)") if section.default_on else ("section | null", "null")
        rows.append((f"{prefix}{key}", kind, default, _section_help(key, section)))
        rows += schema_rows(section.cls, f"{prefix}{key}.")
    return rows


def run_schema(args: argparse.Namespace) -> int:
    rows = schema_rows()
    if args.section:
        rows = [r for r in rows if r[0].startswith(args.section)]
    if args.format == "markdown":
        print("| key | type | default | help |\n|---|---|---|---|")
        for key, tp, default, text in rows:
            cells = [f"`{key}`", tp.replace("|", "\\|"), f"`{default}`", text.replace("|", "\\|")]
            print("| " + " | ".join(cells) + " |")
        return 0
    import textwrap

    for key, tp, default, text in rows:
        indent = "  " * key.count(".")
        print(f"{indent}{key}: {tp} = {default}")
        if text:
            print(textwrap.fill(text, width=100, initial_indent=indent + "    ", subsequent_indent=indent + "    "))
    return 0
