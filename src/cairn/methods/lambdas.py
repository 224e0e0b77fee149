"""Penalty weights (λ) of the regularised continual-learning methods, validated once.

O-LoRA (Wang et al. 2023, arXiv 2310.14152) and N-LoRA (Yang et al. 2024, arXiv 2410.10179) each
weight an extra loss term by a λ that may differ per round: the seed paper (Lee & Wynter 2024)
notes that the O-LoRA weight "can be adjusted for each sequential training". A config therefore
gives either one number (every round) or a list with one number per round; a negative, NaN or
infinite λ would turn a penalty into a reward or poison the loss, so it is a :class:`CairnError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from cairn.errors import CairnError


def check_lambda(value: object, name: str = "lambda") -> float:
    """Return ``value`` as a float if it is a finite number >= 0, else raise :class:`CairnError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CairnError(f"{name} must be a number >= 0, got {value!r} ({type(value).__name__}); "
                         f"set it to e.g. 0.5")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise CairnError(f"{name} must be a finite number >= 0, got {value!r}; a negative weight "
                         f"would reward the very overlap/density the penalty is meant to reduce")
    return value


def lambda_for_round(spec: float | Sequence[float], round_index: int, name: str = "lambda") -> float:
    """The λ of round ``round_index`` (0-based) from one number or a per-round list.

    A list must have an entry for every round that uses it; a too-short list is an error rather
    than silently reusing its last value, because the user evidently meant per-round values.
    """
    if isinstance(spec, (list, tuple)):
        if round_index < 0 or round_index >= len(spec):
            raise CairnError(f"{name} lists {len(spec)} value(s) but round {round_index} (0-based) "
                             f"needs one; give one value per round or a single number for all rounds")
        return check_lambda(spec[round_index], f"{name}[{round_index}]")
    return check_lambda(spec, name)


def check_lambdas(spec: object, where: str) -> None:
    """At config load: one number or a list of numbers, each >= 0 (the message names ``where``)."""
    values = spec if isinstance(spec, list) else [spec]
    if any(v is not None and v is not False and v < 0 for v in values):
        raise CairnError(f"{where} must be >= 0, got {spec}")
