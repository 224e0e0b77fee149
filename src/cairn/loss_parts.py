"""The loss-part protocol shared by the training loop and the methods' penalties.

A loss part is any object with ``extra_loss(model, batch, outputs) -> {name: tensor}`` (``model`` is
the unwrapped model); its terms are added to the task loss and logged separately. It lives below
both the loop and the methods so that neither imports the other for it.
"""

from __future__ import annotations

from typing import Protocol

import torch


class LossPart(Protocol):
    def extra_loss(self, model, batch: dict, outputs) -> dict[str, torch.Tensor]: ...


def task_loss_of(outputs) -> torch.Tensor | None:
    """The task loss carried by a forward's outputs (a ModelOutput or a mapping), if any."""
    task = getattr(outputs, "loss", None)
    if task is None and isinstance(outputs, dict):
        task = outputs.get("loss")
    return task if isinstance(task, torch.Tensor) else None
