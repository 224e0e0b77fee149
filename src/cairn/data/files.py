"""Reading task data files: UTF-8 text, JSON lists and JSONL, each problem named by file and line.

Every task file is read through here so a bad file fails when the task loads (before a model loads or
a run directory is written) with a message naming the file, the line and how to fix it. Hand-written
because the standard library reports neither: ``json.load`` gives no line for the item a problem
belongs to (a missing field in item 3 of a list), and bad bytes surface as a bare UnicodeDecodeError.
A JSON list is therefore parsed item by item with :meth:`json.JSONDecoder.raw_decode`, which keeps
each item's starting line.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cairn.errors import CairnError

_WS = " \t\n\r"


@dataclass
class Row:
    """One item of a data file and the 1-based line it starts on."""

    value: Any
    line: int


def check_file(path: Path, what: str) -> None:
    """``path`` is an existing regular file; else an error saying what it was meant to be."""
    if not path.exists():
        raise CairnError(f"{what} {path} does not exist")
    if path.is_dir():
        raise CairnError(f"{what} {path} is a directory, not a file; point at the file itself")
    if not path.is_file():
        raise CairnError(f"{what} {path} is not a regular file")


def read_text(path: Path, what: str = "data file") -> str:
    """The file as UTF-8 text (a leading byte-order mark dropped); a bad byte is named by offset and line."""
    check_file(path, what)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        utf16 = " (it starts with a UTF-16 byte-order mark)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise CairnError(f"{path}: not valid UTF-8{utf16}: byte 0x{data[exc.start]:02x} at byte offset {exc.start} "
                         f"(line {line}) ({exc.reason}); re-save the file as UTF-8") from None
    return text.removeprefix("\ufeff")


class _Lines:
    """Line number of a character offset (1-based), by bisection over the newline positions."""

    def __init__(self, text: str):
        self.newlines = [m.start() for m in re.finditer("\n", text)]

    def __call__(self, offset: int) -> int:
        return bisect.bisect_left(self.newlines, offset) + 1


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def read_json_list(path: Path, what: str = "data file") -> list[Row]:
    """A file holding one JSON list, item by item, each with the line it starts on."""
    text = read_text(path, what)
    if not text.strip():
        raise CairnError(f"{path}: the file is empty; expected a JSON list of objects `[{{...}}, ...]`")
    line_of = _Lines(text)
    decoder = json.JSONDecoder()
    i = _skip(text, 0)
    if text[i] != "[":
        hint = " (one object per line is format: jsonl)" if text[i] == "{" else ""
        raise CairnError(f"{path}, line {line_of(i)}: expected a JSON list `[{{...}}, ...]`{hint}")
    rows: list[Row] = []
    i = _skip(text, i + 1)
    if i < len(text) and text[i] == "]":
        i += 1
    else:
        while True:
            if i >= len(text):
                raise CairnError(f"{path}: the file ends inside the JSON list (no closing `]`); the file may be "
                                 f"truncated")
            if text[i] == "]":
                raise CairnError(f"{path}, line {line_of(i)}: malformed JSON (a `,` before `]`: trailing comma)")
            try:
                value, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as exc:
                raise CairnError(f"{path}, line {exc.lineno}: malformed JSON ({exc.msg}, column {exc.colno})") \
                    from None
            rows.append(Row(value, line_of(i)))
            i = _skip(text, end)
            if i >= len(text):
                raise CairnError(f"{path}: the file ends inside the JSON list (no closing `]`); the file may be "
                                 f"truncated")
            if text[i] == ",":
                i = _skip(text, i + 1)
                continue
            if text[i] == "]":
                i += 1
                break
            raise CairnError(f"{path}, line {line_of(i)}: malformed JSON (expected `,` or `]` after item "
                             f"{len(rows)})")
    i = _skip(text, i)
    if i < len(text):
        raise CairnError(f"{path}, line {line_of(i)}: malformed JSON (extra data after the closing `]`)")
    return rows


def read_jsonl(path: Path, what: str = "data file") -> list[Row]:
    """A JSONL file: one JSON value per non-blank line, each with its line number."""
    text = read_text(path, what)
    rows: list[Row] = []
    # split on "\n" only: str.splitlines also breaks at U+2028 etc., which JSON strings may hold raw
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(Row(json.loads(line), lineno))
        except json.JSONDecodeError as exc:
            raise CairnError(f"{path}, line {lineno}: malformed JSON ({exc.msg}, column {exc.colno})") from None
    return rows
