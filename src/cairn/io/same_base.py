"""The one same-base check: is a model (or expert) really fine-tuned from the given base?

Fine-tuning moves weights by a small fraction of their norm, so a tensor's relative distance
‖θ − θ0‖ / ‖θ0‖ above a limit means the base is very likely not the model's base; task vectors and
experts against a wrong base are meaningless. Merging checks every tensor as it streams them
(:mod:`cairn.combine.merge_models`); FFT MoE mixing checks one attention tensor up front
(:mod:`cairn.combine.moe_fft`). Both raise the same error.
"""

from __future__ import annotations

import math

import torch

from cairn.errors import CairnError


def relative_distance(delta_sq: float, base_sq: float) -> float:
    """‖θ − θ0‖ / ‖θ0‖ from the squared norms (0 when the base tensor is 0)."""
    return math.sqrt(delta_sq) / math.sqrt(base_sq) if base_sq > 0 else 0.0


def tensor_distance(base: torch.Tensor, other: torch.Tensor) -> float:
    base, other = base.float(), other.float()
    return relative_distance(float((other - base).pow(2).sum()), float(base.pow(2).sum()))


def check_same_base(rel: float, limit: float | None, *, model: str, base: str, tensor: str, raise_hint: str) -> None:
    """A CairnError when ``rel`` exceeds ``limit`` (None: no check), naming the model, the base and the tensor."""
    if limit is not None and rel > limit:
        raise CairnError(
            f"model {model} does not look fine-tuned from the base {base}: its tensor {tensor} differs by "
            f"{rel:.2f}x the base tensor's norm (limit {limit}; fine-tunes differ by far less): the base is "
            f"probably not the model's base, and task vectors or experts against it would be meaningless. "
            f"Give the model's actual base, or {raise_hint} if the differences are really this large")
