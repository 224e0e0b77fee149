"""Score a model on curriculum tasks: batched greedy generation, then each task's own metric.

Generation is :func:`cairn.eval.generation.generate` (left padding, KV cache, length-sorted batches);
metrics come from :mod:`cairn.eval.metrics`. Predictions are returned with the scores so a run can
keep them next to its results for inspection.
"""

from __future__ import annotations

from cairn.data.tasks import Task
from cairn.eval.generation import generate
from cairn.eval.metrics import get_metric


def evaluate_task(model, tokenizer, task: Task, batch_size: int = 16, progress: bool = True) -> tuple[float, list[dict]]:
    examples = task.test
    prompts = [ex["prompt"] for ex in examples]
    refs = [ex["answer"] for ex in examples]
    preds = generate(model, tokenizer, prompts, max_new_tokens=task.generation_budget(tokenizer),
                     batch_size=batch_size, stop=task.stop, progress=progress, desc=f"eval {task.name}")
    score = get_metric(task.metric)(preds, refs, prompts)
    records = [{"prompt": p, "reference": r, "prediction": y} for p, r, y in zip(prompts, refs, preds)]
    return float(score), records


def evaluate_tasks(model, tokenizer, tasks: list[Task], batch_size: int = 16,
                   progress: bool = True) -> tuple[list[float], dict[str, list[dict]]]:
    """Scores in task order, and the predictions per task."""
    scores, predictions = [], {}
    for task in tasks:
        score, records = evaluate_task(model, tokenizer, task, batch_size, progress)
        scores.append(score)
        predictions[task.name] = records
    return scores, predictions
