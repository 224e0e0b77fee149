"""The input embedding's gradient added in place after backward, not through a dense buffer.

Why: torch's embedding backward builds a dense ``vocab x hidden`` zero tensor on every backward and
scatters the few looked-up rows into it; with the output layer tied to the embedding (SmolLM2,
Qwen2-0.5B, Gemma, ...) autograd then sums that tensor with the output layer's gradient out of
place. For SmolLM2-135M that is two fresh 113 MB float32 tensors a step, and on a CPU fresh memory
of that size costs page faults: 360 ms of a 3.2 s full fine-tuning step, measured with the torch
profiler (``aten::zeros`` 163 ms and ``aten::add`` 197 ms under ``EmbeddingBackward0``).

Here the lookup's backward only records ``(token ids, gradient rows)``; after each micro-batch's
backward the training loop calls :meth:`DeferredEmbeddingGrad.flush`, which adds the rows to
``weight.grad`` with ``index_add_`` (creating it when nothing else wrote one, as for an untied
embedding). The gradient is the same sum, added in a different order: equal up to float rounding
(tested against torch's own backward, tied and untied, with a padding index and accumulation).

Only in one process and unsharded: DDP all-reduces ``weight.grad`` while the backward runs, before
the deferred rows are added, and FSDP/DeepSpeed own the gradient buffers. Embeddings with
``max_norm``, ``scale_grad_by_freq`` or ``sparse`` keep torch's own backward.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class _LookupDeferringGrad(torch.autograd.Function):
    """``F.embedding(ids, weight)`` whose weight gradient goes to ``sink`` instead of autograd."""

    @staticmethod
    def forward(ctx, ids, weight, sink):
        ctx.ids, ctx.sink = ids, sink
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        ctx.sink.pending.append((ctx.ids, grad))
        return None, None, None


class DeferredEmbeddingGrad:
    """Records one embedding's gradient rows during backward; :meth:`flush` adds them to ``.grad``."""

    def __init__(self, module: nn.Embedding):
        self.module = module
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _LookupDeferringGrad.apply(ids, self.module.weight, self)

    def flush(self) -> None:
        weight = self.module.weight
        for ids, grad in self.pending:
            ids, rows = ids.reshape(-1), grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
            if self.module.padding_idx is not None:  # torch's backward gives the padding row no gradient
                keep = ids != self.module.padding_idx
                ids, rows = ids[keep], rows[keep]
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            weight.grad.index_add_(0, ids, rows)
        self.pending.clear()


def deferrable(module: nn.Module) -> bool:
    return (type(module) is nn.Embedding and module.weight.requires_grad and module.max_norm is None
            and not module.scale_grad_by_freq and not module.sparse)


@contextlib.contextmanager
def deferred_embedding_grad(model: nn.Module, enabled: bool = True) -> Iterator[list[DeferredEmbeddingGrad]]:
    """While inside, the trainable input embeddings of ``model`` defer their weight gradient; yields
    the sinks to :meth:`~DeferredEmbeddingGrad.flush` after every backward (none when not enabled)."""
    sinks = [DeferredEmbeddingGrad(m) for m in model.modules() if deferrable(m)] if enabled else []
    for sink in sinks:
        sink.module.forward = sink.forward  # the instance attribute shadows nn.Embedding.forward
    try:
        yield sinks
    finally:
        for sink in sinks:
            del sink.module.forward
            sink.pending.clear()
