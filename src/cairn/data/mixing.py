"""Training data of a round in the fully-cooperative setting: replay of earlier tasks, joint training.

Both follow the seed paper (Lee & Wynter 2024, "Collaboratively adding new knowledge to an LLM",
Section "fully-cooperative"):

* **Replay**: when training round t, add ``fraction`` (paper: 10%) of the *current* round's size
  from *each* earlier task; an earlier task smaller than that is upsampled (the paper's math round
  draws 39.5 K examples from each 5 K TRACE task). So the data grows with every round.
* **Joint**: all tasks at once; with ``upsample`` every task is brought to the size of the largest,
  so a drawn example is equally likely to come from any task (the paper's choice).

Exact rules implemented here:

* The number replayed per earlier task is ``n = floor(fraction · len(current) + 0.5)`` (half-up
  rounding, not Python's round-half-even), and at least 1 when ``fraction > 0`` — so replay on tiny
  demo tasks is never silently empty.
* Drawing n examples from a task of m: if n ≤ m, n distinct examples (sampling without
  replacement). If n > m, the task is **upsampled**: ``mode="balanced"`` (default) takes every
  example ⌊n/m⌋ times plus n mod m distinct ones, so each appears ⌊n/m⌋ or ⌈n/m⌉ times;
  ``mode="replacement"`` draws all n i.i.d. with replacement, which with n = 8m still leaves
  ~e⁻⁸ of the task unseen and makes some examples appear far more often — available for
  comparison, not the default.
* Randomness: one ``random.Random`` per earlier task seeded with ``f"{seed}:{task_index}"``, so a
  task's draw does not change when other tasks are added or resized, and results are the same on
  every platform and Python version (string seeds are hashed with SHA-512).
* Output order: the current examples (as given) followed by the replayed ones, task by task;
  ``record[k] == (task_index, example_index)`` describes ``examples[len(current) + k]``. Nothing is
  shuffled here: the training loop's sampler shuffles. Examples are opaque objects, never copied or
  modified; their origin is recorded only in the record.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any, Literal

from cairn.errors import CairnError

UpsampleMode = Literal["balanced", "replacement"]


def _check_fraction(fraction: object) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction) \
            or not 0.0 <= fraction <= 1.0:
        raise CairnError(f"replay fraction must be a number in [0, 1] (the paper uses 0.1), got {fraction!r}")
    return float(fraction)


def replay_count(fraction: float, current_size: int) -> int:
    """How many examples to replay from each earlier task (half-up rounding, at least 1 if fraction > 0)."""
    fraction = _check_fraction(fraction)
    if fraction == 0.0 or current_size == 0:
        return 0
    return max(1, math.floor(fraction * current_size + 0.5))


def sample_indices(size: int, n: int, rng: random.Random, mode: UpsampleMode = "balanced") -> list[int]:
    """``n`` indices into a list of ``size`` items: distinct when n ≤ size, else upsampled per ``mode``."""
    if mode not in ("balanced", "replacement"):
        raise CairnError(f"upsample mode must be 'balanced' or 'replacement', got {mode!r}")
    if n < 0:
        raise CairnError(f"cannot sample a negative number of examples ({n})")
    if n == 0:
        return []
    if size <= 0:
        raise CairnError(f"cannot sample {n} examples from an empty task")
    if n <= size:
        return rng.sample(range(size), n)
    if mode == "replacement":
        return [rng.randrange(size) for _ in range(n)]
    copies, rest = divmod(n, size)
    return list(range(size)) * copies + rng.sample(range(size), rest)


def replay_mix(current: Sequence[Any], earlier: Sequence[Sequence[Any]], fraction: float = 0.1,
               seed: int = 0, mode: UpsampleMode = "balanced") -> tuple[list[Any], list[tuple[int, int]]]:
    """The round's training examples: ``current`` plus a replay of each earlier task.

    Returns ``(examples, record)`` where ``record`` lists ``(task_index, example_index)`` of every
    replayed example in the order it was appended (task_index indexes ``earlier``).
    """
    n = replay_count(fraction, len(current))
    examples = list(current)
    record: list[tuple[int, int]] = []
    for t, task in enumerate(earlier):
        if n and len(task) == 0:
            raise CairnError(f"replay: earlier task #{t} has no training examples; remove it from the "
                             f"curriculum or give it a train split")
        rng = random.Random(f"{seed}:{t}")
        for i in sample_indices(len(task), n, rng, mode):
            examples.append(task[i])
            record.append((t, i))
    return examples, record


def joint_mix(tasks: Sequence[Sequence[Any]], upsample: bool = True, seed: int = 0,
              mode: UpsampleMode = "balanced") -> list[Any]:
    """All tasks' examples for one joint-training round.

    Without ``upsample`` this is the plain concatenation. With it, each task smaller than the
    largest is upsampled (per ``mode``) to the largest task's size, so every task contributes the
    same number of examples and a uniformly drawn example is equally likely to come from any task.
    """
    if not tasks:
        raise CairnError("joint training needs at least one task")
    for t, task in enumerate(tasks):
        if len(task) == 0:
            raise CairnError(f"joint training: task #{t} has no training examples; remove it or give it "
                             f"a train split")
    if not upsample:
        return [x for task in tasks for x in task]
    target = max(len(task) for task in tasks)
    out: list[Any] = []
    for t, task in enumerate(tasks):
        if len(task) == target:
            out.extend(task)  # the largest task is used as is, in its own order
            continue
        rng = random.Random(f"{seed}:{t}")
        out.extend(task[i] for i in sample_indices(len(task), target, rng, mode))
    return out
