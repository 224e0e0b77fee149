"""Where a task's split comes from and how its rows become examples.

A split's source is one of: a file in the task's folder (``<path>/<split>.json`` for ``trace``,
``.jsonl`` for ``jsonl``/``messages``), a file named directly (``train_path: metamath/train.json``), or a
Hugging Face dataset (``format: hf``: a hub id, a folder saved with ``save_to_disk``, or a local folder
of data files that ``datasets.load_dataset`` reads). The train and test splits may come from different
sources (``train_path``/``test_path``, each with its own format and field names): the seed paper's math
task trains on MetaMathQA (``query``/``response``) and tests on GSM8K (``question``/``answer``).

Rows become examples (``{"prompt", "answer"}``, plus ``messages`` for chat examples and ``type`` for
LoRAMoE) with every problem named by file and line: a row that is not an object, a missing or
non-string field, an empty answer or prompt, a malformed conversation.

Empty answers are refused rather than warned about: an empty answer trains only the EOS token (it
teaches the model to answer nothing) and can never be scored right at evaluation (every metric scores
an empty reference 0), so it is always a data bug worth fixing before hours of training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cairn.config import TaskConfig
from cairn.data.files import Row, read_json_list, read_jsonl
from cairn.errors import CairnError

ROLES = ("system", "user", "assistant", "tool")
EXTENSION = {"trace": "json", "jsonl": "jsonl", "messages": "jsonl"}


@dataclass
class SplitSource:
    """How to read one split of a task."""

    split: str            # the task's name for the split (train, test, eval, ...)
    format: str           # trace | jsonl | messages | hf
    location: str         # folder, file or dataset
    source_split: str     # file stem / dataset split name
    prompt_field: str
    answer_field: str


@dataclass
class LoadedSplit:
    examples: list[dict]
    origins: list[str]    # "file, line N" / "dataset [split] row N" of each example
    description: str      # the file or dataset it was read from


def resolve(cfg: TaskConfig, split: str, data_dir: str | Path | None) -> SplitSource:
    """The source of ``split``: train_path/test_path (with their format and fields) or the task's path."""
    location, fmt = cfg.path, cfg.format
    prompt_field, answer_field = cfg.prompt_field, cfg.answer_field
    if split == cfg.train_split and cfg.train_path:
        location, fmt = cfg.train_path, cfg.train_format or cfg.format
    if split == cfg.test_split and cfg.test_path:
        location, fmt = cfg.test_path, cfg.test_format or cfg.format
    if split == cfg.train_split:
        prompt_field = cfg.train_prompt_field or prompt_field
        answer_field = cfg.train_answer_field or answer_field
    if split == cfg.test_split:
        prompt_field = cfg.test_prompt_field or prompt_field
        answer_field = cfg.test_answer_field or answer_field
    if location is None:
        raise CairnError(f"task {cfg.name!r}: no source for the {split!r} split; set `path`")
    if fmt != "hf":
        resolved = _resolve_path(location, data_dir)
        if location == cfg.path and resolved.is_file():  # one file would serve as train AND test split
            raise CairnError(f"task {cfg.name!r}: path {resolved} is a file; `path` is a folder holding "
                             f"train/test files: name single files with `train_path` and `test_path`")
        location = str(resolved)
    elif data_dir is not None and not Path(location).expanduser().is_absolute() \
            and (Path(data_dir).expanduser() / location).exists():
        location = str(Path(data_dir).expanduser() / location)  # a saved dataset under data_dir
    return SplitSource(split, fmt, location, cfg.split_map.get(split, split), prompt_field, answer_field)


def _resolve_path(location: str, data_dir: str | Path | None) -> Path:
    path = Path(location).expanduser()
    if not path.is_absolute() and data_dir is not None:
        path = Path(data_dir).expanduser() / path
    return path


def source_file(src: SplitSource) -> Path:
    """The file a folder-format split is read from (the location itself when it names a file)."""
    path = Path(src.location)
    if path.is_dir():
        return path / f"{src.source_split}.{EXTENSION[src.format]}"
    return path


def file_exists(src: SplitSource) -> bool:
    return src.format != "hf" and source_file(src).exists()


def missing_file_message(cfg: TaskConfig, src: SplitSource, role: str) -> str:
    path = source_file(src)
    folder = Path(src.location)
    if not folder.exists():
        return f"task {cfg.name!r}: {role} source {folder} does not exist"
    if folder.is_dir() and folder.suffix in (".json", ".jsonl"):
        return f"task {cfg.name!r}: {role} file {folder} is a directory, not a file"
    ext = EXTENSION[src.format]
    present = sorted(p.name for p in folder.glob(f"*.{ext}")) if folder.is_dir() else []
    has = f" (the folder has: {', '.join(present)})" if present else f" (the folder has no .{ext} files)"
    key = "train_path" if role == "training" else "test_path"
    return (f"task {cfg.name!r}: {role} file {path} does not exist{has}; add it, or point `{key}` at "
            f"another source")


def read_split(cfg: TaskConfig, src: SplitSource, chat: bool, cache: dict | None = None) -> LoadedSplit:
    """Read and check one split; every example is validated here. ``cache`` shares loaded datasets."""
    if src.format == "hf":
        rows, where, description = _hf_rows(cfg, src, {} if cache is None else cache)
    else:
        path = source_file(src)
        rows = read_json_list(path) if src.format == "trace" else read_jsonl(path)
        where = lambda row: f"{path}, line {row.line}"  # noqa: E731
        description = str(path)
    if src.format == "messages":
        examples = [_from_messages(row, where(row), cfg) for row in rows]
    else:
        examples = [_from_fields(row, where(row), src, cfg) for row in rows]
    if not examples:
        raise CairnError(f"task {cfg.name!r}: the {src.split!r} split is empty: {description} holds no examples")
    _refuse_empty(examples, rows, where, description, src)
    if chat:
        for ex in examples:
            if "messages" not in ex:
                ex["messages"] = [{"role": "user", "content": ex["prompt"]}]
            if cfg.system_prompt is not None and ex["messages"][0]["role"] != "system":
                ex["messages"] = [{"role": "system", "content": cfg.system_prompt}] + ex["messages"]
    return LoadedSplit(examples, [where(row) for row in rows], description)


def _refuse_empty(examples: list[dict], rows: list[Row], where, description: str, src: SplitSource) -> None:
    for key, what in (("answer", "answer"), ("prompt", "prompt")):
        empty = [i for i, ex in enumerate(examples) if not ex[key].strip()]
        if empty:
            more = f" ({len(empty) - 1} more in {description})" if len(empty) > 1 else ""
            field = "the last assistant turn" if src.format == "messages" and key == "answer" else \
                f"field {src.answer_field if key == 'answer' else src.prompt_field!r}"
            raise CairnError(f"{where(rows[empty[0]])}: empty {what} ({field}){more}; an empty {what} "
                             f"cannot be learnt or scored: fill it in or drop the example")


def _describe(value: Any) -> str:
    kind = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)
    return kind


def _from_fields(row: Row, where: str, src: SplitSource, cfg: TaskConfig) -> dict:
    value = row.value
    if not isinstance(value, dict):
        raise CairnError(f"{where}: expected an object with fields {src.prompt_field!r} and {src.answer_field!r}, "
                         f"got {_describe(value)}")
    for key, setting in ((src.prompt_field, "prompt_field"), (src.answer_field, "answer_field")):
        if key not in value:
            fields = ", ".join(map(str, value)) or "none"
            raise CairnError(f"{where}: no {key!r} field (fields: {fields}); set the task's `{setting}` "
                             f"(or train_/test_{setting}) to the field that holds it")
        if not isinstance(value[key], str):
            raise CairnError(f"{where}: field {key!r} is {_describe(value[key])}, not a string")
    ex = {"prompt": value[src.prompt_field], "answer": value[src.answer_field]}
    if cfg.type_field and cfg.type_field in value:
        ex["type"] = value[cfg.type_field]
    return ex


def _from_messages(row: Row, where: str, cfg: TaskConfig) -> dict:
    value = row.value
    key = cfg.messages_field
    if not isinstance(value, dict):
        raise CairnError(f"{where}: expected an object with a {key!r} list of turns, got {_describe(value)}")
    if key not in value:
        raise CairnError(f"{where}: no {key!r} field (fields: {', '.join(map(str, value)) or 'none'}); "
                         f"set the task's `messages_field`")
    turns = value[key]
    if not isinstance(turns, list) or not turns:
        raise CairnError(f"{where}: {key!r} must be a non-empty list of {{role, content}} turns, "
                         f"got {_describe(turns) if turns != [] else 'an empty list'}")
    clean = []
    for n, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise CairnError(f"{where}: turn {n} must be an object with 'role' and 'content'")
        if turn["role"] not in ROLES:
            raise CairnError(f"{where}: turn {n} has role {turn['role']!r}; roles are {', '.join(ROLES)}")
        if not isinstance(turn["content"], str):
            raise CairnError(f"{where}: turn {n}: 'content' is {_describe(turn['content'])}, not a string")
        clean.append({"role": turn["role"], "content": turn["content"]})
    if clean[-1]["role"] != "assistant":
        raise CairnError(f"{where}: the last turn is {clean[-1]['role']!r}; the last turn must be the assistant's "
                         f"answer (the one the model learns and is scored on)")
    users = [t for t in clean[:-1] if t["role"] == "user"]
    if not users:
        raise CairnError(f"{where}: no user turn before the answer; a conversation needs a prompt")
    ex = {"prompt": users[-1]["content"], "answer": clean[-1]["content"], "messages": clean[:-1]}
    if cfg.type_field and cfg.type_field in value:
        ex["type"] = value[cfg.type_field]
    return ex


# ------------------------------------------------------------------------------------- Hugging Face


def _hf_rows(cfg: TaskConfig, src: SplitSource, cache: dict):
    try:
        import datasets
    except ImportError:
        raise CairnError("format: hf needs the `datasets` package: pip install 'cairn-lm[datasets]'") from None
    ds = _load_hf(datasets, cfg, src.location, cache)
    if isinstance(ds, datasets.Dataset):  # a single saved split
        ds = datasets.DatasetDict({src.source_split: ds})
    if src.source_split not in ds:
        raise CairnError(f"task {cfg.name!r}: dataset {src.location!r} has no split {src.source_split!r} "
                         f"(it has: {', '.join(ds)}); set `split_map: {{{src.split}: <one of them>}}`")
    data = ds[src.source_split]
    label = f"dataset {src.location!r} [{src.source_split}]"
    rows = [Row(dict(item), i) for i, item in enumerate(data, 1)]
    return rows, (lambda row: f"{label} row {row.line}"), label


def _load_hf(datasets, cfg: TaskConfig, location: str, cache: dict):
    key = (location, cfg.subset, cfg.revision)
    if key in cache:
        return cache[key]
    path = Path(location).expanduser()
    saved = path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())
    try:
        if saved:
            if cfg.subset or cfg.revision:
                raise CairnError(f"task {cfg.name!r}: {path} was saved with `save_to_disk`: it has no subsets "
                                 f"or revisions; drop `subset`/`revision`")
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(location, name=cfg.subset, revision=cfg.revision)
    except CairnError:
        raise
    except Exception as exc:  # no network, unknown id or subset, bad revision: all user-fixable
        what = " ".join(filter(None, [repr(location), cfg.subset and f"subset {cfg.subset!r}",
                                      cfg.revision and f"revision {cfg.revision!r}"]))
        raise CairnError(f"task {cfg.name!r}: cannot load Hugging Face dataset {what}: "
                         f"{type(exc).__name__}: {exc}") from None
    cache[key] = ds
    return ds
