"""Tasks: a named body of knowledge with train/eval/test examples and one or more metrics.

Formats (see :mod:`cairn.data.sources` for where each split is read from):
- ``trace``: a folder with ``train.json``, ``eval.json``, ``test.json``, each a JSON list of
  ``{"prompt", "answer"}`` objects (the TRACE benchmark's layout, Wang et al. 2023, arXiv 2310.06762).
- ``jsonl``: a folder with ``train.jsonl`` / ``eval.jsonl`` / ``test.jsonl`` (field names configurable).
- ``messages``: JSONL of ``{"messages": [{"role", "content"}, ...]}``; the last assistant turn is the
  answer, the turns before it (system turns kept) the prompt, rendered with the chat template.
- ``hf``: a Hugging Face dataset (hub id, saved folder, or local data files; ``subset``, ``revision``,
  ``split_map``; needs the ``datasets`` package).
- ``demo``: a built-in generated domain of fictional facts (:mod:`cairn.data.demo`).

The train and test splits may come from different sources (``train_path`` / ``test_path``), as the seed
paper's math task (Lee & Wynter 2024): trained on MetaMathQA, tested on GSM8K.

An example is a plain dict with ``prompt`` and ``answer`` strings (optionally ``type``: "world" or
"downstream", used by LoRAMoE; and ``messages``, the turns before the answer, for chat-formatted tasks:
``prompt_format: chat`` or ``format: messages``). All data is read and checked when the task loads,
before a model loads or a run directory is written: files, lines, fields, empty splits or answers,
and whether each metric can score the answers (:mod:`cairn.data.checks`).
"""

from __future__ import annotations

import random
from pathlib import Path
from dataclasses import dataclass, field

from cairn.config import TaskConfig
from cairn.errors import CairnError

Example = dict
OPTIONAL_SPLITS = ("eval", "validation")


@dataclass
class Task:
    name: str
    metric: str  # the primary metric: the results matrix holds its score
    splits: dict[str, list[Example]] = field(repr=False)
    world_knowledge: bool = False
    max_new_tokens: int | None = None
    max_prompt_tokens: int | None = None  # evaluation prompts keep their last this-many tokens (TRACE's max_prompt_len)
    train_split: str = "train"
    test_split: str = "test"
    stop: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)  # every metric, the primary first
    prompt_format: str = "plain"  # "chat": examples carry ``messages`` rendered with the chat template
    origins: dict[str, list[str]] = field(default_factory=dict, repr=False)  # split -> "file, line N" per example
    sources: dict[str, str] = field(default_factory=dict)  # split -> the file or dataset it was read from
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.metrics:
            self.metrics = [self.metric]

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


def _subsample(rows: list, origins: list[str], n: int | None, seed: int) -> tuple[list, list[str]]:
    if n is None or n >= len(rows):
        return rows, origins
    idx = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in idx], [origins[i] for i in idx] if origins else []


def _load_sources(cfg: TaskConfig, data_dir, chat: bool):
    from cairn.data import sources as S

    splits, origins, described = {}, {}, {}
    cache: dict = {}
    for split, role in ((cfg.train_split, "training"), (cfg.test_split, "test")):
        src = S.resolve(cfg, split, data_dir)
        if src.format != "hf" and not S.file_exists(src):
            raise CairnError(S.missing_file_message(cfg, src, role))
        loaded = S.read_split(cfg, src, chat, cache)
        splits[split], origins[split], described[split] = loaded.examples, loaded.origins, loaded.description
    if cfg.path and cfg.format != "hf":  # extra splits of the task's folder (router data, inspection)
        for split in OPTIONAL_SPLITS:
            if split in splits:
                continue
            src = S.resolve(cfg, split, data_dir)
            if S.file_exists(src):
                loaded = S.read_split(cfg, src, chat, cache)
                splits[split], origins[split], described[split] = loaded.examples, loaded.origins, loaded.description
    return splits, origins, described


def load_task(cfg: TaskConfig, data_dir: str | Path | None = None, seed: int = 0) -> Task:
    """Build and check a :class:`Task` from its config; relative paths resolve against ``data_dir``."""
    from cairn.config import validate_task
    from cairn.data import demo
    from cairn.data.checks import check_metrics

    validate_task(cfg)
    chat = cfg.chat
    if cfg.format == "demo":
        domain = cfg.path or cfg.name.removeprefix("demo-")
        splits = demo.generate_domain(domain, seed=cfg.seed, entities=cfg.entities)
        origins, described = {}, {s: f"demo domain {domain!r}" for s in splits}
        metrics = cfg.metric_names or ["exact_match"]
        stop = cfg.stop or ["\n"]
        if chat:
            for rows in splits.values():
                for ex in rows:
                    ex["messages"] = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt
                                      is not None else []) + [{"role": "user", "content": ex["prompt"]}]
    else:
        splits, origins, described = _load_sources(cfg, data_dir, chat)
        metrics = cfg.metric_names
        stop = cfg.stop
    for split in (cfg.train_split, cfg.test_split):
        if not splits.get(split):
            raise CairnError(f"task {cfg.name!r}: the {split!r} split is empty ({described.get(split, 'no source')})")
    for split, n in ((cfg.train_split, cfg.max_train), (cfg.test_split, cfg.max_test)):
        splits[split], origins[split] = _subsample(splits[split], origins.get(split, []), n, seed)
    if cfg.world_knowledge:
        for rows in splits.values():
            for ex in rows:
                ex.setdefault("type", "world")
    task = Task(name=cfg.name, metric=metrics[0], splits=splits, world_knowledge=cfg.world_knowledge,
                max_new_tokens=cfg.max_new_tokens,
                max_prompt_tokens=cfg.max_prompt_tokens, train_split=cfg.train_split, test_split=cfg.test_split, stop=stop,
                metrics=metrics, prompt_format="chat" if chat else "plain", origins=origins, sources=described)
    task.warnings = check_metrics(task)
    return task
