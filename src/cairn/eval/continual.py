"""Continual-learning figures computed from the results matrix R.

Indexing (used by every function here):

- ``R[0]`` is the base model; ``R[k]`` (k = 1..K) is the model after round k; ``R[k][i]`` is its
  score in [0, 1] on task i (0-based); ``None`` means "not evaluated".
- Tasks are in curriculum order: task i is learned in round i + 1, so ``R[i + 1][i]`` is the score
  right after learning task i, ``R[i][i]`` the score just before, and ``R[K][i]`` the final score.
- A run may stop early (K < number of tasks); figures then use only the rounds that exist.

Definitions follow the seed paper, Lee & Wynter 2024, "Collaboratively adding new knowledge to an
LLM" (arXiv:2410.13699), whose Tables 1-4 this module reproduces (checked in the tests on the
paper's own numbers):

- *gain from base* of task i (the "gain base" row of Tables 1-4, one per column):
  ``100 * (R[K][i] - R[0][i]) / R[0][i]`` percent. It is undefined when the base scores 0 (common
  for new knowledge: a base model knows none of it); we return ``None`` there rather than an
  infinite or arbitrary number, and also report the absolute change in points
  (:func:`gain_from_base_points`), which is always defined.
- The "AVE" column of the gain row is computed two ways in the paper: Tables 1/2 (old knowledge)
  show the mean of the per-task gains (:func:`mean_gain_from_base`, -7% = mean of -12.03% ...
  -2.91%), Tables 3/4 (new knowledge) show the gain of the average score (:func:`gain_of_average`,
  60% = 0.5628 vs 0.352). We offer both and say in the report which one a table uses.
- *BWT* as in the paper (the "BWT" row of Tables 3/4): "the percentage change in performance
  directly after training on the task vs. after all rounds of training have completed",
  ``100 * (R[K][i] - R[i+1][i]) / R[i+1][i]`` for each task learned before the last round
  (:func:`bwt_paper`). The paper gives no mean; :func:`bwt_paper_mean` averages the defined entries.
- The paper has no per-round gain row (its gain row compares the last row with the base), so none
  is computed here; :func:`relative_change` gives the whole matrix of changes from base for plots.

Standard figures (Lopez-Paz & Ranzato 2017, GEM, arXiv:1706.08840), in score units, not percent:

- ``bwt(R) = mean_{i : i+1 < K} (R[K][i] - R[i+1][i])``
- ``fwt(R) = mean_{1 <= i <= min(N-1, K)} (R[i][i] - R[0][i])``: the score on task i just before it
  is learned, relative to the base model (GEM uses a randomly initialised model; a pretrained base
  is the natural reference for adding knowledge to an LLM).
- ``average_accuracy(R) = mean_{k=1..K} mean_{i < min(k, N)} R[k][i]`` (tasks seen so far).
- ``last_average(R) = mean_i R[K][i]``; ``acquisition(R)[i] = R[i+1][i]`` (paper Fig. 5).

Means skip ``None`` entries; a figure with no defined term is ``None``.

Several seeds (:func:`summarize_seeds`): every figure is computed on each seed's matrix, then given
as mean and sample standard deviation (n - 1) over the seeds where it is defined; figures are not
computed on the mean matrix (a mean of ratios is not the ratio of means).
"""

from __future__ import annotations

import math
from typing import Sequence

from cairn.errors import CairnError

Matrix = Sequence[Sequence[float | None]]


def check_matrix(R: Matrix) -> tuple[int, int]:
    """Validate ``R`` and return (K rounds, N tasks); raise :class:`CairnError` if it is malformed."""
    if not R or not R[0]:
        raise CairnError("results matrix is empty; it needs a base row R[0] with one score per task.")
    n = len(R[0])
    for k, row in enumerate(R):
        if len(row) != n:
            raise CairnError(
                f"results matrix row {k} has {len(row)} scores but row 0 has {n}; every row needs "
                "one entry per task (null for 'not evaluated')."
            )
        for i, v in enumerate(row):
            if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise CairnError(f"results matrix entry [{k}][{i}] is {v!r}; expected a number or null.")
    return len(R) - 1, n


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _pct(new: float | None, old: float | None) -> float | None:
    if new is None or old is None or old == 0:
        return None
    return 100.0 * (new - old) / old


def gain_from_base(R: Matrix) -> list[float | None]:
    """Per task, ``100 * (R[K][i] - R[0][i]) / R[0][i]``; ``None`` where the base is 0 or missing."""
    K, n = check_matrix(R)
    return [_pct(R[K][i], R[0][i]) for i in range(n)]


def gain_from_base_points(R: Matrix) -> list[float | None]:
    """Per task, ``100 * (R[K][i] - R[0][i])``: the change from base in points (always defined)."""
    K, n = check_matrix(R)
    return [None if R[K][i] is None or R[0][i] is None else 100.0 * (R[K][i] - R[0][i]) for i in range(n)]


def mean_gain_from_base(R: Matrix) -> float | None:
    """Mean of the defined per-task gains (the AVE column of the paper's Tables 1/2)."""
    return _mean(gain_from_base(R))


def gain_of_average(R: Matrix) -> float | None:
    """Relative change of the average score, in percent (the AVE column of the paper's Tables 3/4).

    Averages over the tasks scored both at base and in the last round.
    """
    K, n = check_matrix(R)
    both = [i for i in range(n) if R[0][i] is not None and R[K][i] is not None]
    if not both:
        return None
    return _pct(sum(R[K][i] for i in both) / len(both), sum(R[0][i] for i in both) / len(both))


def relative_change(R: Matrix) -> list[list[float | None]]:
    """``100 * (R[k][i] - R[0][i]) / R[0][i]`` for every round k (row 0 is all zeros where defined)."""
    check_matrix(R)
    return [[_pct(v, b) for v, b in zip(row, R[0])] for row in R]


def acquisition(R: Matrix) -> list[float | None]:
    """``R[i+1][i]``: the score on each task right after its own round (``None`` if not reached)."""
    K, n = check_matrix(R)
    return [R[i + 1][i] if i + 1 <= K else None for i in range(n)]


def bwt_paper(R: Matrix) -> list[float | None]:
    """The paper's BWT per task: ``100 * (R[K][i] - R[i+1][i]) / R[i+1][i]`` for i + 1 < K.

    Tasks learned in the last round (and tasks not reached) get ``None``, like the blank last cell
    of the paper's BWT rows; so do tasks whose score right after learning is 0.
    """
    K, n = check_matrix(R)
    return [_pct(R[K][i], R[i + 1][i]) if i + 1 < K else None for i in range(n)]


def bwt_paper_mean(R: Matrix) -> float | None:
    """Mean of the defined entries of :func:`bwt_paper`."""
    return _mean(bwt_paper(R))


def bwt(R: Matrix) -> float | None:
    """Absolute backward transfer, ``mean_{i+1<K} (R[K][i] - R[i+1][i])`` in score units."""
    K, n = check_matrix(R)
    terms = []
    for i in range(n):
        if i + 1 < K and R[K][i] is not None and R[i + 1][i] is not None:
            terms.append(R[K][i] - R[i + 1][i])
    return _mean(terms)


def fwt(R: Matrix) -> float | None:
    """Forward transfer, ``mean_{1<=i<=min(N-1,K)} (R[i][i] - R[0][i])`` in score units."""
    K, n = check_matrix(R)
    terms = []
    for i in range(1, min(n - 1, K) + 1):
        if R[i][i] is not None and R[0][i] is not None:
            terms.append(R[i][i] - R[0][i])
    return _mean(terms)


def average_accuracy(R: Matrix) -> float | None:
    """``mean_{k=1..K} mean_{i<min(k,N)} R[k][i]``: average over rounds of the tasks seen so far."""
    K, n = check_matrix(R)
    return _mean(_mean(R[k][i] for i in range(min(k, n))) for k in range(1, K + 1))


def last_average(R: Matrix) -> float | None:
    """``mean_i R[K][i]``: the final model's average over all tasks."""
    K, _ = check_matrix(R)
    return _mean(R[K])


def is_curriculum(task_names: Sequence[str], row_labels: Sequence[str] | None, rounds: int) -> bool:
    """Whether rows 1..K are rounds that each learned the next task of the curriculum.

    Without row labels we assume so. A run that evaluates one merged or jointly trained model has
    rows like ``["base", "merge-ties"]``: the diagonal means nothing there.
    """
    if row_labels is None:
        return rounds <= len(task_names)
    return list(row_labels[1:]) == list(task_names[:rounds])


def summarize(R: Matrix, task_names: Sequence[str], row_labels: Sequence[str] | None = None) -> dict:
    """Every figure above in one JSON-serialisable dict (per-task lists follow ``task_names``).

    Pass ``row_labels`` (``results.json``'s ``rows``) so that a non-curriculum run (rows that are
    not the tasks in order) gets ``None`` for the curriculum figures (acquisition, BWT, FWT,
    average accuracy) instead of numbers that read its rows as rounds.
    """
    K, n = check_matrix(R)
    if len(task_names) != n:
        raise CairnError(f"{len(task_names)} task names for a results matrix with {n} task columns.")
    if row_labels is not None and len(row_labels) != K + 1:
        raise CairnError(f"{len(row_labels)} row labels for a results matrix with {K + 1} rows.")
    seq = is_curriculum(task_names, row_labels, K)
    none_list = [None] * n
    return {
        "tasks": list(task_names),
        "rounds": K,
        "curriculum": seq,
        "base_average": _mean(R[0]),
        "last_average": last_average(R),
        "gain_from_base": gain_from_base(R),
        "gain_from_base_points": gain_from_base_points(R),
        "mean_gain_from_base": mean_gain_from_base(R),
        "gain_of_average": gain_of_average(R),
        "acquisition": acquisition(R) if seq else none_list,
        "bwt_paper": bwt_paper(R) if seq else none_list,
        "bwt_paper_mean": bwt_paper_mean(R) if seq else None,
        "bwt": bwt(R) if seq else None,
        "fwt": fwt(R) if seq else None,
        "average_accuracy": average_accuracy(R) if seq else None,
    }


def _mean_sd(values) -> dict:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "sd": None, "n": 0}
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return {"mean": m, "sd": sd, "n": len(vals)}


def summarize_seeds(matrices: Sequence[Matrix], task_names: Sequence[str],
                    row_labels: Sequence[str] | None = None) -> dict:
    """:func:`summarize` per seed, then ``{figure: {"mean", "sd", "n"}}`` (per-task lists: one per task).

    Every matrix must have the same shape (the same rounds and tasks); the per-seed summaries are
    kept under ``"seeds"``.
    """
    if not matrices:
        raise CairnError("no results matrices to summarise; give one per seed.")
    shapes = {check_matrix(R) for R in matrices}
    if len(shapes) != 1:
        raise CairnError(f"the seeds' results matrices differ in shape ({sorted(shapes)} as (rounds, tasks)); "
                         "every seed must run the same curriculum to the same round.")
    per = [summarize(R, task_names, row_labels) for R in matrices]
    out: dict = {"tasks": list(task_names), "rounds": per[0]["rounds"], "curriculum": per[0]["curriculum"],
                 "seeds": per}
    for key, value in per[0].items():
        if key in ("tasks", "rounds", "curriculum"):
            continue
        if isinstance(value, list):
            out[key] = [_mean_sd(p[key][i] for p in per) for i in range(len(value))]
        else:
            out[key] = _mean_sd(p[key] for p in per)
    return out
