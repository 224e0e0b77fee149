"""What the data layer knows about answers and metrics without importing the metrics themselves.

The data layer checks, when a task loads, that each of its metrics exists and can score its answers
(:mod:`cairn.data.checks`); the metric functions live above it, in :mod:`cairn.eval.metrics`, which
imports this module (never the reverse). So the two things those checks need sit here:

- :data:`METRIC_NAMES`, the names :data:`cairn.eval.metrics.METRICS` registers (that module asserts
  at import that its registry and this list agree, so a new metric cannot be forgotten here);
- the number parsing every numeric metric and the checks share (:func:`parse_number`,
  :func:`extract_final_number`, GSM8K's final-answer convention).
"""

from __future__ import annotations

import math
import re

from cairn.errors import CairnError

#: Every metric name a task may use (``metric:`` / ``metrics:``); kept equal to eval.metrics.METRICS.
METRIC_NAMES: tuple[str, ...] = (
    "accuracy", "numeric_accuracy", "exact_match", "rouge_l", "rouge_l_trace", "edit_similarity", "sari",
    "gsm8k", "gsm8k_strict", "gsm8k_flexible", "gsm8k_cot_strict", "gsm8k_cot_flexible",
)


def check_metric_name(name: str) -> str:
    """``name`` if it is a known metric; a :class:`CairnError` listing the known names otherwise."""
    if name not in METRIC_NAMES:
        raise CairnError(f"unknown metric {name!r}; available metrics: {', '.join(sorted(METRIC_NAMES))}. "
                         "Set the task's 'metric' to one of these.")
    return name


# a leading minus counts only when it does not follow a digit or letter ("16-3" is 16 and 3)
NUMBER_RE = re.compile(r"(?:(?<![\w.])-)?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def parse_number(text: str) -> float | None:
    """``text`` as a number if it is one (commas, a leading ``$`` and a trailing ``.`` allowed)."""
    t = text.strip().replace(",", "").replace("$", "").rstrip(".").strip()
    try:
        value = float(t)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def extract_final_number(text: str) -> float | None:
    """The final answer of a GSM8K-style solution.

    The first number after the last ``####`` if there is one (the GSM8K answer format), else the
    last number in the text. Commas, ``$`` and a trailing ``.`` are ignored.
    """
    if "####" in text:
        found = NUMBER_RE.findall(text.rsplit("####", 1)[1].replace("$", ""))
        candidate = found[0] if found else None
    else:
        found = NUMBER_RE.findall(text.replace("$", ""))
        candidate = found[-1] if found else None
    return None if candidate is None else parse_number(candidate)
