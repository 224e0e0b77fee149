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

A round's LoRA adapter is ``rounds/NN-<label>/adapter/`` itself (a vanilla PEFT adapter folder; runs
made before kept it one level down, ``adapter/round<k>/``, which is still read), and every saved round
artifact carries ``cairn_parent.json``: what it applies to (the raw base, or the base with rounds
1..k-1 merged in / stacked as frozen adapters), the base recorded by its Hub id where it has one.
``cairn export`` writes the same record (:func:`parent_record`, one definition).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from cairn import atomic
from cairn.errors import CairnError, read_json_file

#: Version of results.json. 2: adds schema_version, strategy and seed.
SCHEMA_VERSION = 2

#: The side file saying what a round artifact applies to (not a key of adapter_config.json: PEFT warns
#: on keys it does not know).
PARENT_FILE = "cairn_parent.json"

#: Built-in model names -> the Hub id of the original weights (recorded as the base of artifacts).
BUILTIN_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}

#: Per-question old-knowledge scores of a round, ``{suite task: [score per question]}`` on each task's
#: primary metric, in the suite's subset order (round.json keeps only the aggregates). What paired
#: comparisons need: the report's bootstrap intervals and the ledger's gate on imported runs.
OLD_KNOWLEDGE_ITEMS = "old_knowledge_items.json"

#: Folders (or files) inside a round directory that hold a model someone can load, in preference order.
ARTIFACTS = ("model", "merged", "moe", "adapter", "lora-moe", "loramoe")


@dataclass
class RoundRecord:
    """round.json: one row of the results matrix and how it was obtained."""

    label: str
    scores: list[float]
    train: dict = field(default_factory=dict)
    eval_seconds: float = 0.0
    # task -> {"primary", "primary_stderr", "primary_metric", "n"}; in memory also "items" (per question),
    # which write_round moves to OLD_KNOWLEDGE_ITEMS
    old_knowledge: dict | None = None
    # task -> {metric: score}, every metric of each task (the primary first); absent in older round.json
    metrics: dict | None = None


@dataclass
class ExperimentStatus:
    """experiment.json: the steps of an experiment and how each ended ("ok" or "failed: why").

    With several seeds a step's status is ``{seed: "ok" | "failed: why"}`` (seed as a string key).
    """

    name: str
    methods: list[str]
    status: dict[str, str | dict[str, str]]
    seeds: list[int] | None = None


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
    if record.old_knowledge and any("items" in v for v in record.old_knowledge.values()):
        items = {t: v["items"] for t, v in record.old_knowledge.items() if "items" in v}
        atomic.write_json(Path(path) / OLD_KNOWLEDGE_ITEMS, items)
        record = dataclasses.replace(record, old_knowledge={
            t: {k: x for k, x in v.items() if k != "items"} for t, v in record.old_knowledge.items()})
    atomic.write_json(Path(path) / "round.json", dataclasses.asdict(record))  # last: marks the round done


def read_old_items(path: Path) -> dict[str, list[float]] | None:
    """A round directory's per-question old-knowledge scores, or None when the runner did not save them."""
    f = Path(path) / OLD_KNOWLEDGE_ITEMS
    if not f.is_file():
        return None
    data = read_json_file(f, "old-knowledge items")
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise CairnError(f"{f} is not {{task: [score per question]}}; delete it (the aggregates in round.json stay)")
    return data


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
    """The model of a round directory: a transformers folder, a PEFT adapter folder, or a full-fine-tuning
    ``model/`` stored as a delta (``model.delta``; load it with :func:`cairn.io.fft_round.load_round`)."""
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
                                status=data.get("status", {}), seeds=data.get("seeds"))


def status_ok(status: str | dict) -> bool:
    """Whether a step's status (a string, or one per seed) is "ok" everywhere."""
    return all(s == "ok" for s in status.values()) if isinstance(status, dict) else status == "ok"


# -- what an artifact applies to ---------------------------------------------------------------

def hub_id(model: str) -> str:
    """The id to record as an artifact's base: a built-in's Hub id, a local folder's absolute path, else as given."""
    if model in BUILTIN_HUB_IDS:
        return BUILTIN_HUB_IDS[model]
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def parent_record(base_model: str, k: int, mode: str | None, one_round: bool, run: Path | str | None = None,
                  method: str | None = None, seed: int | None = None) -> dict:
    """``cairn_parent.json`` of round ``k``'s artifact: what it applies to, and how to rebuild that.

    ``mode``: a LoRA method's ``sequential`` (``merge``: rounds 1..k-1 merged into the weights; ``stack``:
    active as frozen adapters), None for a full model (it is the whole model: it applies to nothing).
    """
    parents = [] if one_round or mode is None or k == 1 else list(range(1, k))
    if mode is None:
        applies = "nothing: a complete model"
    elif not parents:
        applies = "the raw base model"
    else:
        applies = (f"the base with rounds {parents[0]}..{parents[-1]} "
                   + ("merged into its weights (sequential: merge)" if mode == "merge"
                      else "active as frozen adapters (sequential: stack)"))
    record = {"base_model": hub_id(base_model), "merged_rounds_first": parents if mode == "merge" else [],
              "stacked_adapters_first": parents if mode == "stack" else [], "applies_to": applies,
              "run": str(Path(run).resolve()) if run is not None else None, "method": method, "round": k}
    if run is not None and method is not None:
        record["rebuild"] = (f"cairn export {record['run']} --method {method} --round {k}"
                             + (f" --seed {seed}" if seed is not None else "") + " --merge --out DIR")
    return record


def write_parent(folder: Path, record: dict) -> None:
    """Write ``cairn_parent.json`` into an artifact folder being built (inside ``atomic.atomic_dir``,
    whose rename publishes the whole folder at once: a plain write suffices there)."""
    (Path(folder) / PARENT_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def read_parent(folder: Path) -> dict | None:
    f = Path(folder) / PARENT_FILE
    return read_json_file(f, "artifact parent record") if f.is_file() else None


def require_standalone(folder: Path, what: str = "this command") -> None:
    """Refuse an artifact trained on top of earlier rounds (its parent is not the base it names).

    Such an adapter alone on the raw base is a model nobody trained; the message says how to get the
    model the run evaluated.
    """
    folder = Path(folder)
    record = read_parent(folder)
    if record is None and folder.name.startswith("round") and read_parent(folder.parent) is not None:
        record = read_parent(folder.parent)
    if not record or not (record.get("merged_rounds_first") or record.get("stacked_adapters_first")):
        return
    rebuild = record.get("rebuild") or "cairn export RUN --method M --round K --merge --out DIR"
    raise CairnError(
        f"{folder} was trained on {record.get('applies_to')}, not on the raw base: {what} would apply it to "
        f"a model it was not trained on. Evaluate the run's model with `cairn eval RUN_DIR/<method>` "
        f"(rebuilds rounds 1..{record.get('round')}), or write it as one model with `{rebuild}`")
