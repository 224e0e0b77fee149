"""Per-item scores of a saved run, for bootstrap intervals and paired tests.

A round directory ``<run>/rounds/NN-<label>/`` holds ``predictions.json``: ``{task: [{"prompt",
"reference", "prediction"}, ...]}``, one record per test item in a fixed order; the base model's is
``<experiment>/base/predictions.json``. Re-scoring each record with the task's metric
(:func:`cairn.eval.metrics.item_scores`) gives the per-item scores whose mean is the table's cell.

Optional: ``old_knowledge_items.json`` next to it, ``{suite task: [per-item score]}``, lets old
knowledge use paired tests too; without it old knowledge falls back to the saved standard errors.

Which model's items stand for a method's *final* score: the last round; for a one-round method the
task's own model (round i + 1 for task i, the diagonal), as in the seed paper's one-round bars.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from cairn.report.runs import Run
from cairn.rundir import OLD_KNOWLEDGE_ITEMS


def task_metric(results: dict, i: int) -> str | None:
    """The metric of task ``i`` whose value the matrix holds (the first of ``metrics`` when several)."""
    t = results["tasks"][i]
    if not isinstance(t, dict):
        return None
    if t.get("metric"):
        return t["metric"]
    metrics = t.get("metrics") or []
    return metrics[0] if metrics else None


def round_dir(run: Run, k: int) -> Path:
    """Directory of row ``k`` of a single-seed run (``k == 0``: the experiment's shared base)."""
    if k == 0:
        for cand in (run.path.parent / "base", run.path.parent.parent / "base", run.path / "base"):
            if (cand / "predictions.json").is_file():
                return cand
        return run.path.parent / "base"
    return run.path / "rounds" / f"{k:02d}-{run.results['rows'][k]}"


@lru_cache(maxsize=512)
def _read(path: str) -> dict | None:
    p = Path(path)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


@lru_cache(maxsize=4096)
def _scores(path: str, task: str, metric: str) -> tuple[float, ...] | None:
    from cairn.errors import CairnError
    from cairn.eval.metrics import item_scores

    preds = _read(path)
    if not preds or task not in preds or not preds[task]:
        return None
    recs = preds[task]
    try:
        return tuple(item_scores(metric, [r["prediction"] for r in recs], [r["reference"] for r in recs],
                                 [r.get("prompt", "") for r in recs]))
    except (CairnError, KeyError, TypeError):
        return None


def cell_items(run: Run, k: int, i: int) -> list[float] | None:
    """Per-item scores of task ``i`` at row ``k`` of a single-seed run, or ``None`` if not saved."""
    metric = task_metric(run.results, i)
    if metric is None or k >= len(run.results["rows"]):
        return None
    got = _scores(str(round_dir(run, k) / "predictions.json"), run.task_names[i], metric)
    return list(got) if got is not None else None


def final_row_index(run: Run, i: int) -> int:
    """Row of the model whose score on task ``i`` is the method's final one (diagonal if one-round)."""
    return i + 1 if run.one_round else len(run.results["matrix"]) - 1


def _mean_over_seeds(per_seed: list[list[float] | None]) -> list[float] | None:
    if not per_seed or any(p is None for p in per_seed) or len({len(p) for p in per_seed}) != 1:
        return None
    return [sum(vals) / len(vals) for vals in zip(*per_seed)]


def final_items(run: Run) -> dict[str, list[float]] | None:
    """``{task: per-item scores of the final model}``, averaged over seeds; ``None`` if incomplete."""
    out = {}
    for i, name in enumerate(run.task_names):
        k = final_row_index(run, i)
        items = _mean_over_seeds([cell_items(r, k, i) for r in run.replicas])
        if items is None:
            return None
        out[name] = items
    return out


def base_items(run: Run) -> dict[str, list[float]] | None:
    out = {}
    for i, name in enumerate(run.task_names):
        items = cell_items(run.replicas[0], 0, i)
        if items is None:
            return None
        out[name] = items
    return out


def old_items(run: Run, k: int) -> dict[str, list[float]] | None:
    """Per-item old-knowledge scores at row ``k`` (mean over seeds), when the runner saved them."""
    per_seed = []
    for r in run.replicas:
        got = _read(str(round_dir(r, k) / OLD_KNOWLEDGE_ITEMS))
        if not got:
            return None
        per_seed.append(got)
    tasks = list(per_seed[0])
    out = {}
    for t in tasks:
        items = _mean_over_seeds([p.get(t) for p in per_seed])
        if items is None:
            return None
        out[t] = items
    return out
