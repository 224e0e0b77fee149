"""The routed-LoRA layer: a frozen linear plus K LoRA experts mixed by a per-token router.

Shared by the two things built from it, which differ only in where the experts come from:
- **LoRAMoE**, the training method (Dou et al. 2023, arXiv 2312.09979; :mod:`cairn.methods.loramoe`):
  fresh experts and routers that train with the model's backbone frozen;
- **LoRA-MoE mixing**, the combiner (moetify, Lee et al. 2024, arXiv 2408.17280;
  :mod:`cairn.combine.moe_lora`): K already-trained PEFT adapters become the experts.

Each layer computes ``y = W0·x + Σ_e g_e(x) · s_e · B_e·A_e·dropout(x)``, ``g(x) = normalise(W_r·x)``,
batched over tokens and experts (two matmuls of a rank-K·r LoRA plus the router). Hand-written:
PEFT has no routed mixture of LoRA experts.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from cairn.errors import CairnError

NORMALISATIONS = ("softmax", "sigmoid")
#: Attribute of a model holding its mixture's description (experts, routing, manifest fields).
MIXTURE_ATTR = "cairn_lora_moe"


# ----------------------------------------------------------------------------- routing (pure)


def routing_weights(logits: torch.Tensor, top_k: int | None, normalisation: str) -> torch.Tensor:
    """Gate of every expert per token, (..., K) float32; unchosen experts get exactly 0.

    softmax: p = softmax(logits); with top_k, keep the k largest and divide by their sum.
    sigmoid: g = sigmoid(logits); with top_k, keep the k largest as they are.
    """
    logits = logits.float()
    if normalisation == "softmax":
        gates = logits.softmax(dim=-1)
    elif normalisation == "sigmoid":
        gates = logits.sigmoid()
    else:
        raise CairnError(f"unknown router normalisation {normalisation!r}; choose softmax or sigmoid")
    if top_k is None or top_k >= gates.shape[-1]:
        return gates  # dense; top-K of K keeps (softmax: renormalises to) the same gates
    values, index = gates.topk(top_k, dim=-1)
    if normalisation == "softmax":
        values = values / values.sum(dim=-1, keepdim=True)
    return torch.zeros_like(gates).scatter(-1, index, values)


# ----------------------------------------------------------------------------- the layer


class RoutedLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus K routed LoRA experts (stacked, batched; no loop over tokens).

    Attributes read by losses after each forward: ``last_router_logits`` and
    ``last_routing_weights``, both (..., K) with the input's leading shape.
    """

    def __init__(
        self,
        base: nn.Linear,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: torch.Tensor,
        router_weight: torch.Tensor | None = None,
        top_k: int | None = None,
        normalisation: str = "softmax",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        k, r, d_in = lora_A.shape
        if lora_B.shape != (k, base.out_features, r) or d_in != base.in_features:
            raise ValueError(f"expert shapes A{tuple(lora_A.shape)} B{tuple(lora_B.shape)} do not fit {base}")
        if normalisation not in NORMALISATIONS:
            raise CairnError(f"unknown router normalisation {normalisation!r}; choose softmax or sigmoid")
        if top_k is not None and not 1 <= top_k <= k:
            raise CairnError(f"top_k={top_k} must be between 1 and the number of experts ({k})")
        self.base = base
        dtype, device = base.weight.dtype, base.weight.device
        self.lora_A = nn.Parameter(lora_A.to(device=device, dtype=dtype), requires_grad=False)
        self.lora_B = nn.Parameter(lora_B.to(device=device, dtype=dtype), requires_grad=False)
        self.register_buffer("scaling", scaling.to(device=device, dtype=torch.float32).reshape(k))
        self.router = nn.Linear(base.in_features, k, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            if router_weight is None:
                self.router.weight.zero_()
            else:
                self.router.weight.copy_(router_weight)
        self.top_k = top_k
        self.normalisation = normalisation
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.train(base.training)  # a layer swapped into an eval-mode model must not switch its dropout on
        self.experts_enabled = True
        self.last_router_logits: torch.Tensor | None = None
        self.last_routing_weights: torch.Tensor | None = None

    @property
    def dropout_p(self) -> float:
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0

    @property
    def num_experts(self) -> int:
        return self.lora_A.shape[0]

    @property
    def rank(self) -> int:
        return self.lora_A.shape[1]

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # so code that inspects `module.weight` (dtype, device) still works
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.experts_enabled:
            return out
        k, r, d_in = self.lora_A.shape
        logits = self.router(x)
        gates = routing_weights(logits, self.top_k, self.normalisation)
        self.last_router_logits = logits
        self.last_routing_weights = gates
        h = F.linear(self.dropout(x), self.lora_A.reshape(k * r, d_in))  # (..., K·r): all experts at once
        h = h.unflatten(-1, (k, r)) * (gates * self.scaling).to(h.dtype).unsqueeze(-1)
        b = self.lora_B.permute(1, 0, 2).reshape(self.out_features, k * r)  # (d_out, K·r)
        return out + F.linear(h.flatten(-2), b)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, rank={self.rank}, top_k={self.top_k}, normalisation={self.normalisation}"


def routed_layers(model: nn.Module) -> dict[str, RoutedLoRALinear]:
    """Every RoutedLoRALinear of ``model`` by module name (in model order)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, RoutedLoRALinear)}


@contextmanager
def experts_disabled(model: nn.Module) -> Iterator[None]:
    """Run the mixture as its plain base model (used to read base hidden states)."""
    layers = list(routed_layers(model).values())
    for layer in layers:
        layer.experts_enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.experts_enabled = True
