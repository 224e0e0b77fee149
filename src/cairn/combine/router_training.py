"""Router training for MoE mixtures: only the routers learn; experts and base stay frozen.

The seed paper (Lee & Wynter 2024) notes that the routers of a mixture can be trained on a small
router dataset that need not be any expert's training data; moetify (Lee et al. 2024, arXiv
2408.17280) and mergekit-moe ship no router training. This module gives the one training loop what
it needs for both kinds of mixture:

- :func:`freeze_all_but_routers` / :func:`router_parameters` select the trainable parameters.
- Extra-loss parts (objects with ``extra_loss(model, batch, outputs) -> dict[str, Tensor]``):
  :class:`MixtralAuxLoss` for FFT mixtures (Mixtral's own auxiliary load-balancing loss,
  ``outputs.aux_loss``), :class:`RoutedLoRAAuxLoss` for LoRA mixtures (the same Switch-Transformer
  loss, Fedus et al. 2021, arXiv 2101.03961, on the routers' recorded probabilities), and
  :class:`RouterLabelLoss` for LoRA mixtures whose router examples each belong to one expert
  (supervised routing: cross-entropy of every routed module's router logits against that expert).

Deviation noted: transformers' Mixtral pools all layers' tokens before forming the Switch loss; the
LoRA version here forms it per routed module and averages over modules (the Switch paper's per-layer
form), because LoRA modules of one layer see different inputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cairn.routed_lora import RoutedLoRALinear, routed_layers
from cairn.errors import CairnError


def _is_router_module(module: nn.Module) -> bool:
    # transformers >= 5 Mixtral-style routers are *TopKRouter modules owning `weight`.
    return type(module).__name__.endswith("TopKRouter") and isinstance(getattr(module, "weight", None), nn.Parameter)


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The router weights of an FFT (Mixtral) or LoRA mixture, in model order."""
    params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, RoutedLoRALinear):
            params.append(module.router.weight)
        elif _is_router_module(module):
            params.append(module.weight)
    return params


def freeze_all_but_routers(model: nn.Module) -> list[nn.Parameter]:
    """Set requires_grad=False on every parameter except the routers; return the routers."""
    routers = router_parameters(model)
    if not routers:
        raise CairnError("the model has no MoE routers; router training needs a mixture (FFT Mixtral or LoRA MoE)")
    keep = {id(p) for p in routers}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return routers


def require_router_data(examples, name: str = "router dataset") -> None:
    """Raise a CairnError when the router dataset is empty (router training would do nothing)."""
    if examples is None or len(examples) == 0:
        raise CairnError(f"the {name} is empty; router training needs at least one example")


def switch_load_balancing_loss(
    router_logits: torch.Tensor, top_k: int | None, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """K · Σ_i f_i · P_i for one routed module (Switch Transformer eq. 4-6, Mixtral's form).

    ``router_logits`` (..., K); P_i = mean softmax probability of expert i over real tokens; f_i =
    fraction of real tokens that chose expert i among their top-k (top-1 for dense routing), summed
    over the k choices as Mixtral does. 1·top_k when perfectly balanced.
    """
    k = router_logits.shape[-1]
    probs = router_logits.float().softmax(-1).reshape(-1, k)
    chosen = probs.topk(top_k or 1, dim=-1).indices
    selected = torch.zeros_like(probs).scatter(-1, chosen, 1.0)
    if attention_mask is not None:
        mask = attention_mask.reshape(-1).to(probs)
        if mask.numel() != probs.shape[0]:
            raise ValueError(f"attention_mask has {mask.numel()} tokens but the router saw {probs.shape[0]}")
    else:
        mask = torch.ones(probs.shape[0], device=probs.device)
    n = mask.sum().clamp_min(1.0)
    f = (selected * mask[:, None]).sum(0) / n
    p = (probs * mask[:, None]).sum(0) / n
    return k * (f * p).sum()


class RoutedLoRAAuxLoss:
    """Switch-style load balancing for LoRA mixtures: coef · mean over routed modules."""

    def __init__(self, coef: float = 0.01, name: str = "router_aux") -> None:
        self.coef = coef
        self.name = name

    def extra_loss(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> dict[str, torch.Tensor]:
        layers = [l for l in routed_layers(model).values() if l.last_router_logits is not None]
        if not layers:
            raise CairnError("RoutedLoRAAuxLoss: the model has no LoRA-MoE router outputs; "
                             "call it after a forward pass")
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        terms = [switch_load_balancing_loss(l.last_router_logits, l.top_k, mask) for l in layers]
        return {self.name: self.coef * torch.stack(terms).mean()}


class RouterLabelLoss:
    """Supervised routing for LoRA mixtures: every real token of an example labelled with expert e should
    route to e. ``coef`` · mean over routed modules of the token-level cross-entropy of the router logits.

    The training loop hands loss parts the batch's token ids, not the examples; ``labels`` maps an
    example's encoded ids (``cairn.data.encode.encode_example`` with the round's ``max_length``, what the
    loop encodes) to its expert, so each row of a batch is looked up exactly. Rows not in ``labels``
    (or labelled ``-1``) do not count. :meth:`diagnostics` reports the share of labelled tokens whose
    largest router logit is their expert's, over modules, for the last batch.
    """

    def __init__(self, labels: dict[tuple[int, ...], int], coef: float = 1.0, name: str = "router_label") -> None:
        self.labels = labels
        self.coef = coef
        self.name = name
        self._acc: torch.Tensor | None = None

    def targets(self, batch: dict[str, Any]) -> torch.Tensor:
        """(batch, tokens) expert index per token; -1 for padding and unlabelled rows."""
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        per_row = [self.labels.get(tuple(ids[i][mask[i]].tolist()), -1) for i in range(ids.shape[0])]
        rows = torch.tensor(per_row, device=ids.device)[:, None].expand_as(ids)
        return torch.where(mask, rows, torch.full_like(rows, -1))

    def extra_loss(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> dict[str, torch.Tensor]:
        import torch.nn.functional as F

        layers = [l for l in routed_layers(model).values() if l.last_router_logits is not None]
        if not layers:
            raise CairnError("RouterLabelLoss: the model has no LoRA-MoE router outputs; call it after a forward pass")
        target = self.targets(batch).reshape(-1)
        keep = target >= 0
        if not bool(keep.any()):  # nothing labelled in this batch: a zero that keeps the graph
            return {self.name: layers[0].last_router_logits.sum() * 0.0}
        losses, right = [], []
        for layer in layers:
            logits = layer.last_router_logits.float().reshape(-1, layer.num_experts)[keep]
            losses.append(F.cross_entropy(logits, target[keep]))
            right.append((logits.detach().argmax(-1) == target[keep]).float().mean())
        self._acc = torch.stack(right).mean()  # read as a float at logging steps only (it syncs)
        return {self.name: self.coef * torch.stack(losses).mean()}

    def diagnostics(self) -> dict[str, float]:
        return {} if self._acc is None else {f"{self.name}_accuracy": float(self._acc)}


class MixtralAuxLoss:
    """Mixtral's auxiliary load-balancing loss as a named extra-loss term: coef · outputs.aux_loss.

    Call :meth:`prepare` once on the model: it makes the forward compute ``aux_loss``
    (``output_router_logits``) and zeroes the model's internal coefficient so ``outputs.loss`` (when
    the loop passes labels) does not count the term a second time.
    """

    def __init__(self, coef: float = 0.02, name: str = "router_aux") -> None:
        self.coef = coef
        self.name = name

    @staticmethod
    def prepare(model: nn.Module) -> nn.Module:
        if not hasattr(model.config, "output_router_logits"):
            raise CairnError("MixtralAuxLoss needs a Mixtral-style model (config.output_router_logits)")
        model.config.output_router_logits = True
        model.config.router_aux_loss_coef = 0.0
        if hasattr(model, "router_aux_loss_coef"):
            model.router_aux_loss_coef = 0.0
        return model

    def extra_loss(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> dict[str, torch.Tensor]:
        aux = getattr(outputs, "aux_loss", None)
        if aux is None or not torch.is_tensor(aux):
            raise CairnError(
                "MixtralAuxLoss: outputs.aux_loss is missing; call MixtralAuxLoss.prepare(model) before training"
            )
        return {self.name: self.coef * aux}


#: Former name (it is the LoRA-MoE mixer's loss, not LoRAMoE's localized balancing constraint).
LoRAMoEAuxLoss = RoutedLoRAAuxLoss
