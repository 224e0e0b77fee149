"""Error bars for the report: mean ± sd over seeds, per-item bootstrap intervals, paired tests.

The seed paper (Lee & Wynter 2024, arXiv:2410.13699) reports one run per setting without error
bars; a user of cairn needs to know whether a difference between two methods is larger than the
noise of a few seeds and a few hundred test questions. Three tools, hand-written because each is a
few lines of numpy (no statistics package is needed):

- :func:`mean_sd`: mean and sample standard deviation (n - 1) over seeds.
- :func:`bootstrap_ci`: percentile bootstrap interval of a mean score over test items, stratified by
  task (each task's items are resampled within the task, then the task means are averaged, as the
  tables average tasks). Used for single-seed runs, where seeds give no spread.
- :func:`paired_bootstrap`: the difference between two methods on the *same* test items, resampling
  items (stratified by task) and applying the same resample to both methods, so item difficulty
  cancels. Items' scores are first averaged over seeds (the test set is fixed across seeds), so the
  test covers item noise; seed noise is shown separately as ± sd. A difference is "not significant"
  when its 95% interval contains 0.

Resampling uses a fixed seed, so a report is reproducible. Intervals are 95% percentile intervals
with 2000 resamples by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


def mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample sd, n) of the defined values; sd is ``None`` with fewer than two."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None, 0
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, None, len(vals)
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)), len(vals)


@dataclass
class Interval:
    estimate: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def _check_tasks(tasks: Sequence[Sequence[float]]) -> list[np.ndarray]:
    kept = [np.asarray(t, dtype=np.float64) for t in tasks if len(t) > 0]
    if not kept:
        raise ValueError("no per-item scores to resample")
    return kept


def bootstrap_ci(tasks: Sequence[Sequence[float]], n_boot: int = N_BOOT, level: float = LEVEL,
                 seed: int = 0) -> Interval:
    """Interval of the mean over tasks of each task's mean item score (items resampled per task)."""
    arrays = _check_tasks(tasks)
    rng = np.random.default_rng(seed)
    boots = np.zeros(n_boot)
    for items in arrays:  # resample each task's items with replacement, average tasks equally
        idx = rng.integers(0, len(items), size=(n_boot, len(items)))
        boots += items[idx].mean(axis=1)
    boots /= len(arrays)
    a = (1 - level) / 2
    estimate = float(sum(float(t.mean()) for t in arrays) / len(arrays))
    return Interval(estimate, float(np.quantile(boots, a)), float(np.quantile(boots, 1 - a)))


def paired_bootstrap(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], n_boot: int = N_BOOT,
                     level: float = LEVEL, seed: int = 0) -> Interval:
    """Interval of mean(a) - mean(b) over the same items (per task; same resample for both)."""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        raise ValueError("paired bootstrap needs the same tasks and items for both methods")
    diffs = [np.asarray(ta, dtype=np.float64) - np.asarray(tb, dtype=np.float64) for ta, tb in zip(a, b) if len(ta)]
    return bootstrap_ci(diffs, n_boot, level, seed)


def normal_diff(mean_a: float, se_a: float, mean_b: float, se_b: float, level: float = LEVEL) -> Interval:
    """Interval of a - b from two independent means with standard errors (normal approximation).

    Used for old-knowledge scores, where a run keeps each task's standard error but not its items.
    """
    z = {0.95: 1.959963984540054, 0.9: 1.6448536269514722}.get(level, 1.959963984540054)
    d = mean_a - mean_b
    half = z * math.sqrt(se_a ** 2 + se_b ** 2)
    return Interval(d, d - half, d + half)
