"""The run directory: every path an experiment writes, and its typed records, in one place.

Layout (the README section "Run directory")::

    runs/<exp>/config.yaml  log.txt  experiment.json  base/  report/
    runs/<exp>/<method>/             (single seed)   or   runs/<exp>/<method>/seed-<s>/   (several seeds)
        config.yaml log.txt results.json results.csv table.md checkpoints/
        rounds/NN-<label>/{round.json, predictions.json, round_data.json, <artifact>}

``base/`` is shared by every method and seed: the test sets do not depend on the training seed.
A round is done when its ``round.json`` exists (written last); a method is done when its
``results.json`` exists (written last). ``results.json`` carries ``schema_version``; version 1 (no
version key) is read as version 2 with ``strategy`` and ``seed`` unknown (None).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from cairn import atomic
from cairn.errors import CairnError, read_json_file

#: Version of results.json. 2: adds schema_version, strategy and seed.
SCHEMA_VERSION = 2

#: Folders (or files) inside a round directory that hold a model someone can load, in preference order.
ARTIFACTS = ("model", "merged", "moe", "adapter", "lora-moe", "loramoe")


@dataclass
class RoundRecord:
    """round.json: one row of the results matrix and how it was obtained."""

    label: str
    scores: list[float]
    train: dict = field(default_factory=dict)
    eval_seconds: float = 0.0
    old_knowledge: dict | None = None  # task -> {"primary", "primary_stderr", "primary_metric", "n"}


@dataclass
class ExperimentStatus:
    """experiment.json: the steps of an experiment and how each ended ("ok" or "failed: why")."""

    name: str
    methods: list[str]
    status: dict[str, str]


def read_round(path: Path) -> RoundRecord | None:
    """The record of a finished round directory, or None when the round has not finished."""
    f = Path(path) / "round.json"
    if not f.is_file():
        return None
    data = read_json_file(f, "round record")
    try:
        return RoundRecord(**data)
    except TypeError as exc:
        raise CairnError(f"{f} is not a round record ({exc}); delete it to rerun the round") from None


def write_round(path: Path, record: RoundRecord, predictions: dict) -> None:
    atomic.write_json(Path(path) / "predictions.json", predictions)
    atomic.write_json(Path(path) / "round.json", dataclasses.asdict(record))  # last: marks the round done


def read_results(path: Path) -> dict:
    """A results.json, upgraded to the current schema (older files lack version, strategy, seed)."""
    path = Path(path)
    data = read_json_file(path, "results file")
    if not isinstance(data, dict):
        raise CairnError(f"{path} is not a results record (a JSON object); delete it to recompute the method's results")
    version = data.get("schema_version", 1)
    if version > SCHEMA_VERSION:
        raise CairnError(f"{path} has results schema_version {version}; this cairn reads up to "
                         f"{SCHEMA_VERSION}: upgrade cairn")
    data.setdefault("strategy", None)
    data.setdefault("seed", None)
    data["schema_version"] = SCHEMA_VERSION
    return data


def write_results(path: Path, results: dict) -> None:
    atomic.write_json(Path(path), {"schema_version": SCHEMA_VERSION} | results)


@dataclass(frozen=True)
class MethodDir:
    """One method's (or combiner's) directory, for one seed."""

    path: Path

    def round(self, k: int, label: str) -> Path:
        return self.path / "rounds" / f"{k:02d}-{label}"

    def checkpoints(self, name: str) -> Path:
        return self.path / "checkpoints" / name

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def log(self) -> Path:
        return self.path / "log.txt"

    @property
    def results(self) -> Path:
        return self.path / "results.json"

    @property
    def csv(self) -> Path:
        return self.path / "results.csv"

    @property
    def table(self) -> Path:
        return self.path / "table.md"

    def rounds(self) -> list[Path]:
        """Round directories in round order (NN- prefix), finished or not."""
        folder = self.path / "rounds"
        if not folder.is_dir():
            return []
        return sorted((p for p in folder.iterdir() if p.is_dir()), key=_round_key)

    def is_method_dir(self) -> bool:
        return self.config.is_file() and (self.path / "rounds").is_dir()


def _round_key(p: Path) -> tuple[int, str]:
    head = p.name.split("-", 1)[0]
    return (int(head), p.name) if head.isdigit() else (10**9, p.name)


def round_artifact(round_dir: Path) -> Path | None:
    """The loadable model of a round directory: a transformers folder or a PEFT adapter folder."""
    for name in ARTIFACTS:
        path = Path(round_dir) / name
        if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
            return path
        if path.is_dir():  # adapter/<adapter name>/ (PEFT saves a selected adapter one level down)
            inner = [p for p in sorted(path.iterdir()) if (p / "adapter_config.json").is_file()]
            if inner:
                return inner[-1]
    return None


@dataclass(frozen=True)
class RunDir:
    """An experiment's directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def log(self) -> Path:
        return self.root / "log.txt"

    @property
    def experiment(self) -> Path:
        return self.root / "experiment.json"

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def report(self) -> Path:
        return self.root / "report"

    def method(self, name: str, seed: int | None = None) -> MethodDir:
        """``<method>/`` for a single-seed run, ``<method>/seed-<s>/`` when ``seed`` is given."""
        path = self.root / name
        return MethodDir(path if seed is None else path / f"seed-{seed}")

    def method_dirs(self, name: str) -> list[MethodDir]:
        """Every seed's directory of a method (one for a single-seed run), seeds in numeric order."""
        path = self.root / name
        seeds = sorted((p for p in path.glob("seed-*") if p.is_dir() and p.name[5:].lstrip("-").isdigit()),
                       key=lambda p: int(p.name[5:]))
        return [MethodDir(p) for p in seeds] or [MethodDir(path)]

    def write_status(self, status: ExperimentStatus) -> None:
        atomic.write_json(self.experiment, dataclasses.asdict(status))

    def read_status(self) -> ExperimentStatus | None:
        if not self.experiment.is_file():
            return None
        data = read_json_file(self.experiment, "experiment status")
        if not isinstance(data, dict):
            raise CairnError(f"{self.experiment} is not an experiment status (a JSON object); it is not a file cairn wrote")
        return ExperimentStatus(name=data.get("name", self.root.name), methods=data.get("methods", []),
                                status=data.get("status", {}))
