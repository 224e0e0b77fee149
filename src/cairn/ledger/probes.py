"""Probe sets: a contributor's held-out questions that stay with the project.

A probe set is a JSONL file of {"prompt", "answer"} rows plus a metric name from
:mod:`cairn.eval.metrics`. Answers are generated greedily and cut at the first newline when no
reference answer spans lines (as for the demo tasks: one-line answers). Its rows are stored in the artifact store; every later release is scored
on it item by item (greedy generation, :func:`cairn.eval.generation.generate`) so that the gate can
compare releases on the same items.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cairn.errors import CairnError


def read_probe_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise CairnError(f"probe set {path} does not exist; pass a JSONL file of {{\"prompt\", \"answer\"}} rows")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CairnError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("answer"), str):
            raise CairnError(f"{path}:{i}: each row needs string fields 'prompt' and 'answer'")
        rows.append({"prompt": row["prompt"], "answer": row["answer"]})
    if not rows:
        raise CairnError(f"probe set {path} has no rows; add JSONL lines {{\"prompt\": ..., \"answer\": ...}}")
    return rows


def check_metric(metric: str | None, where: str) -> str:
    from cairn.eval.metrics import get_metric

    if not metric:
        raise CairnError(f"{where}: the probe set needs a metric (--probe-metric NAME, e.g. exact_match)")
    get_metric(metric)  # raises with the list of known names
    return metric


def rows_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()


def fingerprint_rows(rows: list[dict]) -> str:
    return hashlib.sha256(rows_bytes(rows)).hexdigest()


def score_items(model, tokenizer, rows: list[dict], metric: str, batch_size: int = 16) -> list[float]:
    """Per-item scores of ``model`` on ``rows`` (the metric applied to each item alone)."""
    from cairn.eval.generation import generate
    from cairn.eval.metrics import get_metric

    fn = get_metric(metric)
    budget = min(max(len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in rows) + 4, 512)
    prompts = [r["prompt"] for r in rows]
    stop = [] if any("\n" in r["answer"] for r in rows) else ["\n"]
    preds = generate(model, tokenizer, prompts, max_new_tokens=budget, batch_size=batch_size, stop=stop,
                     progress=False)
    return [float(fn([p], [r["answer"]], [r["prompt"]])) for p, r in zip(preds, rows)]


def score_predictions(records: list[dict], metric: str) -> list[float]:
    """Per-item scores from stored predictions ({prompt, reference, prediction}, a run's predictions.json)."""
    from cairn.eval.metrics import get_metric

    fn = get_metric(metric)
    return [float(fn([r["prediction"]], [r["reference"]], [r["prompt"]])) for r in records]
