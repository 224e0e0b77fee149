"""Tasks: a named body of knowledge with train/eval/test examples and one metric.

Loaders:
- ``trace``: a folder with ``train.json``, ``eval.json``, ``test.json``, each a JSON list of
  ``{"prompt", "answer"}`` objects (the TRACE benchmark's layout, Wang et al. 2023, arXiv 2310.06762).
- ``jsonl``: a folder with ``train.jsonl`` / ``eval.jsonl`` / ``test.jsonl`` (field names configurable).
- ``hf``: a Hugging Face dataset id (needs the ``datasets`` package and network or a local cache).
- ``demo``: a built-in generated domain of fictional facts (:mod:`cairn.data.demo`).

An example is a plain dict with ``prompt`` and ``answer`` strings (and optionally ``type``:
"world" or "downstream", used by LoRAMoE). Splits are loaded lazily and validated on load.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from cairn.config import TaskConfig
from cairn.errors import CairnError

Example = dict


@dataclass
class Task:
    name: str
    metric: str
    splits: dict[str, list[Example]] = field(repr=False)
    world_knowledge: bool = False
    max_new_tokens: int | None = None
    train_split: str = "train"
    test_split: str = "test"
    stop: list[str] = field(default_factory=list)

    @property
    def train(self) -> list[Example]:
        return self.split(self.train_split)

    @property
    def test(self) -> list[Example]:
        return self.split(self.test_split)

    def split(self, name: str) -> list[Example]:
        if name not in self.splits:
            raise CairnError(f"task {self.name!r} has no {name!r} split (it has: {', '.join(self.splits) or 'none'})")
        return self.splits[name]

    def generation_budget(self, tokenizer) -> int:
        """Tokens to generate at evaluation: configured, or the longest reference answer + margin."""
        if self.max_new_tokens:
            return self.max_new_tokens
        answers = [ex["answer"] for ex in self.test] or [ex["answer"] for ex in self.train]
        longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
        return min(longest + 4, 512)


def _check_examples(rows: list, where: str, prompt_field: str, answer_field: str, type_field: str | None) -> list[Example]:
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise CairnError(f"{where}: item {i + 1} is not an object")
        for key in (prompt_field, answer_field):
            if key not in row:
                raise CairnError(f"{where}: item {i + 1} has no {key!r} field (fields: {', '.join(row)})")
            if not isinstance(row[key], str):
                raise CairnError(f"{where}: item {i + 1}: field {key!r} must be a string")
        ex = {"prompt": row[prompt_field], "answer": row[answer_field]}
        if type_field and type_field in row:
            ex["type"] = row[type_field]
        out.append(ex)
    return out


def _read_json_list(path: Path, cfg: TaskConfig) -> list[Example]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CairnError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(rows, list):
        raise CairnError(f"{path}: expected a JSON list of {{prompt, answer}} objects")
    return _check_examples(rows, str(path), cfg.prompt_field, cfg.answer_field, cfg.type_field)


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSONL file; a malformed line is an error naming the file and line."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise CairnError(f"{path}, line {lineno}: malformed JSON ({exc.msg}, column {exc.colno})") from None
    return rows


def _load_folder(folder: Path, cfg: TaskConfig, ext: str) -> dict[str, list[Example]]:
    if not folder.is_dir():
        raise CairnError(f"task {cfg.name!r}: folder {folder} does not exist")
    splits = {}
    for split in ("train", "eval", "test", "validation"):
        path = folder / f"{split}.{ext}"
        if not path.is_file():
            continue
        if ext == "json":
            splits[split] = _read_json_list(path, cfg)
        else:
            splits[split] = _check_examples(read_jsonl(path), str(path), cfg.prompt_field, cfg.answer_field, cfg.type_field)
    if not splits:
        raise CairnError(f"task {cfg.name!r}: {folder} has no train/eval/test.{ext} files")
    return splits


def _load_hf(cfg: TaskConfig) -> dict[str, list[Example]]:
    try:
        import datasets
    except ImportError:
        raise CairnError("format: hf needs the `datasets` package: pip install 'cairn-lm[datasets]'") from None
    try:
        ds = datasets.load_dataset(cfg.path)
    except Exception as exc:  # network, unknown id, ...: all user-fixable
        raise CairnError(f"task {cfg.name!r}: cannot load Hugging Face dataset {cfg.path!r}: {exc}") from None
    return {split: _check_examples(list(ds[split]), f"{cfg.path}[{split}]", cfg.prompt_field, cfg.answer_field,
                                   cfg.type_field) for split in ds}


def _subsample(rows: list[Example], n: int | None, seed: int) -> list[Example]:
    if n is None or n >= len(rows):
        return rows
    idx = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in idx]


def load_task(cfg: TaskConfig, data_dir: str | Path | None = None, seed: int = 0) -> Task:
    """Build a :class:`Task` from its config; relative paths resolve against ``data_dir``."""
    from cairn.data import demo
    from cairn.eval.metrics import get_metric

    if cfg.format == "demo":
        domain = cfg.path or cfg.name.removeprefix("demo-")
        splits = demo.generate_domain(domain, seed=cfg.seed, entities=cfg.entities)
        metric = cfg.metric or "exact_match"
        stop = cfg.stop or ["\n"]
    else:
        if cfg.format == "hf":
            splits = _load_hf(cfg)
        else:
            folder = Path(cfg.path).expanduser()
            if not folder.is_absolute() and data_dir is not None:
                folder = Path(data_dir).expanduser() / folder
            splits = _load_folder(folder, cfg, "json" if cfg.format == "trace" else "jsonl")
        metric = cfg.metric
        stop = cfg.stop
    get_metric(metric)  # unknown metric names fail here, before any training
    for split in (cfg.train_split, cfg.test_split):
        if split in splits and not splits[split]:
            raise CairnError(f"task {cfg.name!r}: the {split!r} split is empty")
    if cfg.test_split not in splits:
        raise CairnError(f"task {cfg.name!r} has no {cfg.test_split!r} split to evaluate on "
                         f"(it has: {', '.join(splits)}); set test_split")
    splits[cfg.train_split] = _subsample(splits.get(cfg.train_split, []), cfg.max_train, seed)
    splits[cfg.test_split] = _subsample(splits[cfg.test_split], cfg.max_test, seed)
    if cfg.world_knowledge:
        for rows in splits.values():
            for ex in rows:
                ex.setdefault("type", "world")
    return Task(name=cfg.name, metric=metric, splits=splits, world_knowledge=cfg.world_knowledge,
                max_new_tokens=cfg.max_new_tokens, train_split=cfg.train_split, test_split=cfg.test_split, stop=stop)
