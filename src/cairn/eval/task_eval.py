"""Score a model on curriculum tasks: batched greedy generation, then each of the task's metrics.

Generation is :func:`cairn.eval.generation.generate` (left padding, KV cache, length-sorted batches);
metrics come from :mod:`cairn.eval.metrics`, looked up by name. A task may carry several metrics (the
first is its primary score, the one in the results matrix); generation runs once and every metric
scores the same predictions. A chat-formatted task's prompts are rendered with the tokenizer's chat
template by :func:`cairn.data.chat.prompt_text`, the very strings its training examples were encoded
from. Predictions are returned with the scores so a run can keep them next to its results.
"""

from __future__ import annotations

from cairn.data.chat import is_chat, prompt_text
from cairn.data.tasks import Task
from cairn.eval.generation import generate
from cairn.eval.metrics import get_metric


def evaluate_task_metrics(model, tokenizer, task: Task, batch_size: int = 16,
                          progress: bool = True) -> tuple[dict[str, float], list[dict]]:
    """Every metric of ``task`` (``{name: score}``, primary first) and the per-example records."""
    examples = task.test
    inputs = [prompt_text(tokenizer, ex) for ex in examples]
    sources = [ex["prompt"] for ex in examples]  # the task's own prompt text (SARI's source sentence)
    refs = [ex["answer"] for ex in examples]
    preds = generate(model, tokenizer, inputs, max_new_tokens=task.generation_budget(tokenizer),
                     batch_size=batch_size, stop=task.stop, progress=progress, desc=f"eval {task.name}",
                     max_prompt_tokens=task.max_prompt_tokens)
    scores = {name: float(get_metric(name)(preds, refs, sources)) for name in task.metrics}
    records = []
    for ex, model_input, ref, pred in zip(examples, inputs, refs, preds):
        record = {"prompt": ex["prompt"], "reference": ref, "prediction": pred}
        if is_chat(ex):
            record["input"] = model_input  # what the model was given: the chat-rendered prompt
        records.append(record)
    return scores, records


def evaluate_task(model, tokenizer, task: Task, batch_size: int = 16, progress: bool = True) -> tuple[float, list[dict]]:
    """The task's primary score and the per-example records."""
    scores, records = evaluate_task_metrics(model, tokenizer, task, batch_size, progress)
    return scores[task.metric], records


def evaluate_tasks_metrics(model, tokenizer, tasks: list[Task], batch_size: int = 16,
                           progress: bool = True) -> tuple[list[dict[str, float]], dict[str, list[dict]]]:
    """``{metric: score}`` per task (in task order, primary first), and the predictions per task."""
    all_scores, predictions = [], {}
    for task in tasks:
        scores, records = evaluate_task_metrics(model, tokenizer, task, batch_size, progress)
        all_scores.append(scores)
        predictions[task.name] = records
    return all_scores, predictions


def evaluate_tasks(model, tokenizer, tasks: list[Task], batch_size: int = 16,
                   progress: bool = True) -> tuple[list[float], dict[str, list[dict]]]:
    """Primary scores in task order, and the predictions per task."""
    all_scores, predictions = evaluate_tasks_metrics(model, tokenizer, tasks, batch_size, progress)
    return [s[t.metric] for s, t in zip(all_scores, tasks)], predictions
