"""The old-knowledge suite inside the gate: per-question correctness on a fixed subset.

When the policy names ``old_knowledge: {tasks, limit, data_dir, seed}``, every new release and its
parent are scored with :func:`cairn.eval.suites.evaluate_suite` on the same seeded subset of each
task, and each question's score on the task's primary metric (acc, acc_norm or GSM8K's flexible
exact match; the suite's ``items``) joins the gate as the row ``old:<task>``, compared by the same paired
bootstrap as the probe sets. A release keeps its items in its settings so its children reuse them.
"""

from __future__ import annotations

from pathlib import Path

from cairn.errors import CairnError

KEYS = {"tasks", "limit", "data_dir", "seed", "batch_size"}


def check_spec(spec: dict | None, where: str) -> None:
    if spec is None:
        return
    if not isinstance(spec, dict) or not spec.get("tasks"):
        raise CairnError(f"{where}: old_knowledge must be a mapping with a non-empty 'tasks' list")
    unknown = set(spec) - KEYS
    if unknown:
        raise CairnError(f"{where}: unknown old_knowledge key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(KEYS))}")


def suite_items(spec: dict, model, tokenizer) -> dict[str, dict]:
    """{task: {"metric", "items"}} on the policy's seeded subset."""
    from cairn.eval.suites import evaluate_suite

    data_dir = Path(spec["data_dir"]).expanduser() if spec.get("data_dir") else None
    results = evaluate_suite(model, tokenizer, spec["tasks"], data_dir=data_dir, limit=spec.get("limit", 50),
                             seed=spec.get("seed", 1234), batch_size=spec.get("batch_size", 16), progress=False,
                             return_items=True)
    return {task: {"metric": r["primary_metric"], "items": r["items"]} for task, r in results.items()}


def gate_rows(parent: dict[str, dict], release: dict[str, dict]) -> list[dict]:
    return [{"probe": f"old:{task}", "metric": parent[task]["metric"], "parent": parent[task]["items"],
             "release": release[task]["items"]} for task in parent]
