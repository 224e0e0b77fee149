"""Checks of a task's data against its metrics and the model's tokenizer, before anything trains.

- At load (:func:`check_metrics`): a metric that cannot score the task's answers is an error (a
  GSM8K-style metric on an answer without a number; ``numeric_accuracy`` on answers none of which
  is a number); TRACE's first-character ``accuracy`` on labels that share a first character
  (World / Sports / Business / Science or Technology) is a warning naming the colliding labels and
  the metric to use instead. Metric names and number parsing come from :mod:`cairn.data.answers`
  (the data layer does not import :mod:`cairn.eval`).
- Once the tokenizer is loaded, before the model (:func:`check_task_inputs`): chat formatting needs a
  chat template; training examples longer than ``max_length`` lose prompt tokens from the left (a
  warning saying how many, in which file, and what happens); an example whose answer alone fills
  ``max_length`` would keep no prompt token at all: an error naming it.

Warnings are issued with :func:`warnings.warn` as :class:`DataWarning` and also returned (or kept in
``Task.warnings``) so a runner can write them to its log.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable

from cairn.errors import CairnError

LABEL_SET_MAX = 32  # more distinct answers than this is free text, not a label set


class DataWarning(UserWarning):
    """A problem with a task's data that does not stop the run."""


def warn(message: str) -> str:
    warnings.warn(message, DataWarning, stacklevel=3)
    return message


def _label(answer: str) -> str:
    """The label of a TRACE-style answer: its first line (ScienceQA answers are "B\\n<explanation>")."""
    return answer.strip().split("\n", 1)[0].strip()


def label_collisions(answers: list[str]) -> dict[str, list[str]]:
    """First character -> the distinct labels starting with it, where there are several (label sets only)."""
    labels = sorted({_label(a) for a in answers})
    if len(labels) > LABEL_SET_MAX:
        return {}
    by_first: dict[str, list[str]] = defaultdict(list)
    for label in labels:
        if label:
            by_first[label[0]].append(label)
    return {c: ls for c, ls in sorted(by_first.items()) if len(ls) > 1}


def check_metrics(task) -> list[str]:
    """Errors for metrics that cannot score the task's test answers; warnings for ambiguous ones."""
    from cairn.data.answers import check_metric_name, extract_final_number, parse_number

    test = task.test
    origins = task.origins.get(task.test_split) or [f"test example {i + 1}" for i in range(len(test))]
    refs = [ex["answer"] for ex in test]
    found: list[str] = []
    for name in task.metrics:
        try:
            check_metric_name(name)  # an unknown name fails here, before any training
        except CairnError as exc:
            raise CairnError(f"task {task.name!r}: {exc}") from None
        if name.startswith("gsm8k"):
            for ex, where in zip(test, origins):
                if extract_final_number(ex["answer"]) is None:
                    raise CairnError(f"{where}: task {task.name!r}: metric {name!r} compares final numbers, but this "
                                     f"answer has no number: {ex['answer'][:80]!r}; point the answer field at the "
                                     f"solution (GSM8K's ends with '#### <number>') or use a text metric "
                                     f"(exact_match, rouge_l)")
        if name == "numeric_accuracy" and not any(parse_number(r) is not None for r in refs):
            raise CairnError(f"task {task.name!r}: metric 'numeric_accuracy' compares numbers, but none of the "
                             f"{len(refs)} test answers ({task.sources.get(task.test_split, 'test split')}) is a "
                             f"number (e.g. {refs[0][:40]!r}); use exact_match or accuracy")
        if name == "accuracy":
            answers = refs + [ex["answer"] for ex in task.splits.get(task.train_split, [])]
            for first, labels in label_collisions(answers).items():
                found.append(warn(
                    f"task {task.name!r}: metric 'accuracy' compares only the first character (TRACE's label "
                    f"accuracy), and the labels {', '.join(map(repr, labels))} all start with {first!r}, so it "
                    f"cannot tell them apart; use `metric: exact_match` (whole label) for this task"))
    return found


def check_task_inputs(tasks, tokenizer, max_length: int | Iterable[int] | None = None,
                      model: str | None = None) -> list[str]:
    """Checks that need the tokenizer: chat templates and over-long training examples. Returns the warnings.

    ``max_length`` may list every value the methods train with (each distinct one is checked); ``model``
    is the model as the user named it, for the messages.
    """
    from cairn.data.chat import require_chat_template

    lengths = [] if max_length is None else sorted({max_length} if isinstance(max_length, int) else set(max_length))
    found: list[str] = []
    for task in tasks:
        if task.prompt_format == "chat":
            require_chat_template(tokenizer, model, task.name)
        for n in lengths:
            found.extend(check_lengths(task, tokenizer, n))
    return found


def check_lengths(task, tokenizer, max_length: int) -> list[str]:
    """Warn about training examples cut to ``max_length``; refuse those that would keep no prompt token."""
    from cairn.data.encode import prompt_and_answer_ids

    split = task.train_split
    rows = task.splits.get(split, [])
    origins = task.origins.get(split) or [f"{split} example {i + 1}" for i in range(len(rows))]
    source = task.sources.get(split, f"the {split!r} split")
    cut, longest = [], 0
    for i, ex in enumerate(rows):
        prompt_ids, answer_ids = prompt_and_answer_ids(tokenizer, ex)
        total = len(prompt_ids) + len(answer_ids)
        if len(answer_ids) >= max_length:
            raise CairnError(f"{origins[i]}: task {task.name!r}: the answer alone is {len(answer_ids)} tokens "
                             f"(with EOS), max_length is {max_length}: no prompt token would be left to learn "
                             f"from; raise training.max_length or shorten/drop this example")
        if total > max_length:
            cut.append(i)
            longest = max(longest, total)
    if not cut:
        return []
    first = ", ".join(origins[i].rsplit(", ", 1)[-1] for i in cut[:5]) + (", ..." if len(cut) > 5 else "")
    return [warn(f"task {task.name!r}: {len(cut)} of {len(rows)} training examples in {source} are longer than "
                 f"max_length={max_length} tokens (longest {longest}; {first}); their prompts are cut from the "
                 f"left at training (the answer is kept whole), while evaluation sees whole prompts; raise "
                 f"training.max_length to keep them")]
