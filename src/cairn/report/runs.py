"""Read saved runs back for reporting: single-method run directories and multi-method experiments.

A run directory holds ``results.json`` (and usually ``config.yaml``); an experiment directory holds
``experiment.json`` listing its methods, one run directory per method. The schema is the one the
experiment runner writes; this module only reads it and checks the keys a report needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cairn.errors import CairnError


@dataclass
class Run:
    """One method's saved results."""

    label: str
    path: Path
    results: dict
    config_text: str | None = None

    @property
    def task_names(self) -> list[str]:
        return task_names(self.results)


@dataclass
class Loaded:
    """Everything a report is built from."""

    runs: list[Run]
    # (method, status) for methods of an experiment that have no usable results
    skipped: list[tuple[str, str]] = field(default_factory=list)


def task_names(results: dict) -> list[str]:
    """Task names of a results dict; ``tasks`` entries may be ``{"name": ...}`` dicts or strings."""
    return [t["name"] if isinstance(t, dict) else str(t) for t in results["tasks"]]


def validate_results(results: dict, where: str) -> dict:
    """Check the keys and shapes a report relies on; raise a CairnError naming ``where``."""
    for key in ("tasks", "rows", "matrix"):
        if key not in results:
            raise CairnError(f"{where}: missing key {key!r}; results.json needs 'tasks', 'rows' and 'matrix'.")
    for i, t in enumerate(results["tasks"]):
        if isinstance(t, dict) and "name" not in t:
            raise CairnError(f"{where}: tasks[{i}] has no 'name'.")
    n, rows, matrix = len(results["tasks"]), results["rows"], results["matrix"]
    if len(matrix) != len(rows):
        raise CairnError(f"{where}: 'matrix' has {len(matrix)} rows but 'rows' names {len(rows)}.")
    for k, row in enumerate(matrix):
        if len(row) != n:
            raise CairnError(f"{where}: matrix row {k} ({rows[k]!r}) has {len(row)} scores for {n} tasks.")
    old = results.get("old_knowledge")
    if old:
        for key in ("tasks", "matrix"):
            if key not in old:
                raise CairnError(f"{where}: old_knowledge is missing {key!r}.")
        if len(old["matrix"]) != len(rows):
            raise CairnError(
                f"{where}: old_knowledge.matrix has {len(old['matrix'])} rows but 'rows' names {len(rows)} "
                "(use one row per entry of 'rows', null where not evaluated)."
            )
        for k, row in enumerate(old["matrix"]):
            if row is not None and len(row) != len(old["tasks"]):
                raise CairnError(f"{where}: old_knowledge.matrix row {k} has {len(row)} scores for {len(old['tasks'])} tasks.")
    return results


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CairnError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}.") from None
    except UnicodeDecodeError as exc:  # robust guard
        raise CairnError(f"{path}: not UTF-8 text (byte {exc.start}); it is not a file cairn wrote.") from None
    if not isinstance(data, dict):  # robust guard
        raise CairnError(f"{path}: expected a JSON object, got {type(data).__name__}.")
    return data


def load_run(path: Path, label: str | None = None) -> Run:
    path = Path(path)
    res_path = path / "results.json"
    results = validate_results(_read_json(res_path), str(res_path))
    cfg = path / "config.yaml"
    return Run(
        label=label or str(results.get("name") or path.name),
        path=path,
        results=results,
        config_text=cfg.read_text(encoding="utf-8") if cfg.is_file() else None,
    )


def load_runs(dirs: list[Path]) -> Loaded:
    """Load every run under ``dirs`` (run directories and experiment directories, in order)."""
    if not dirs:
        raise CairnError("no run directory given; pass one or more directories written by `cairn run`.")
    loaded = Loaded(runs=[])
    for d in map(Path, dirs):
        if not d.is_dir():
            raise CairnError(f"{d}: no such directory; pass a run directory written by `cairn run`.")
        if (d / "results.json").is_file():
            loaded.runs.append(load_run(d))
        elif (d / "experiment.json").is_file():
            exp = _read_json(d / "experiment.json")
            methods = exp.get("methods")
            if not isinstance(methods, list):
                raise CairnError(f"{d / 'experiment.json'}: needs a 'methods' list naming its run sub-directories.")
            status = exp.get("status") or {}
            for m in methods:
                sub = d / m
                st = str(status.get(m, "ok"))
                if (sub / "results.json").is_file() and st == "ok":
                    loaded.runs.append(load_run(sub, label=m))
                else:
                    loaded.skipped.append((m, st if st != "ok" else "no results.json"))
        else:
            raise CairnError(
                f"{d}: no results.json here. A run directory holds results.json (with 'tasks', 'rows' "
                "and 'matrix', written by `cairn run`); an experiment directory holds experiment.json "
                "and one run directory per method."
            )
    if not loaded.runs:
        detail = "; ".join(f"{m}: {s}" for m, s in loaded.skipped)
        raise CairnError(f"no method with results in {', '.join(map(str, dirs))} ({detail}).")
    labels = [r.label for r in loaded.runs]
    for r in loaded.runs:  # two runs with the same name (e.g. two seeds) need distinct labels
        if labels.count(r.label) > 1:
            r.label = f"{r.label} ({r.path.name})" if r.path.name != r.label else f"{r.label} ({r.path.parent.name})"
    return loaded
