"""LoRAMoE training (Dou et al. 2023, arXiv 2312.09979): routed LoRA experts on a frozen backbone.

Every MLP linear (gate, up, down by default) gets N LoRA experts (8, rank 4, α 32, dropout 0.05 on
the experts' input) and a dense softmax router W_r (N × d_in, no bias):

    h = W0·x + Σ_i softmax(W_r·x)_i · (α/r) · B_i·A_i·x

(:class:`cairn.routed_lora.RoutedLoRALinear`, the layer the LoRA-MoE mixer also uses). Optional top-k
routing (softmax, top-k, renormalised) is offered although the paper routes densely.

Localized balancing constraint (paper eq. 9-11): for a batch of examples m and experts n,
Q[m, n] = Σ_tokens routing weight of expert n; I[m, n] = 1 + δ when expert n is in the group
matching the example's type (the first ``n_world`` experts for world-knowledge examples, the others
for downstream ones) and 1 − δ otherwise; L = β · Var(I∘Q) / Mean(I∘Q)², summed over routed modules.

Following the reference code (Ablustrund/LoRAMoE, ``peft/tuners/lora.py``, ``cv_squared``): the
variance is the *sample* variance (``torch.var`` default, Bessel-corrected) over all B·N entries of
I∘Q, the denominator is Mean² + 1e-10, and a single entry gives 0. Deviations, on purpose:
- padding tokens are excluded from Q (the reference sums the router weights of pad tokens too);
  pass ``attention_mask=None`` to reproduce the reference exactly;
- δ = β = 0.1 by default (non-zero): the released script ships δ = β = 0, which switches the
  constraint off and reduces LoRAMoE to plain multi-LoRA (its issue #13);
- ``n_world`` may differ from N/2 (the reference needs N even and splits in halves).
Which half is "world" is a convention (the reference gives 1 + δ to the first half for task type 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from cairn.config import setting
from cairn.errors import CairnError
from cairn.methods.registry import RoundContext, Section, freeze, register_section, register_trainable
from cairn.routed_lora import MIXTURE_ATTR, RoutedLoRALinear, routed_layers

DEFAULT_TARGETS = ("gate_proj", "up_proj", "down_proj")


def apply_loramoe(
    model: nn.Module,
    num_experts: int = 8,
    rank: int = 4,
    alpha: float = 32,
    dropout: float = 0.05,
    target: Sequence[str] = DEFAULT_TARGETS,
    top_k: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """Replace the targeted linears of ``model`` (in place) with trainable LoRAMoE layers.

    The backbone is frozen; each layer's experts (A kaiming-uniform, B zero, as PEFT/the reference)
    and router (kaiming-uniform, as the reference) are trainable. Save with
    :func:`cairn.combine.moe_lora.save_lora_moe` (each expert becomes a PEFT adapter directory).
    """
    if num_experts < 1 or rank < 1:
        raise CairnError(f"LoRAMoE needs num_experts >= 1 and rank >= 1 (got {num_experts}, {rank})")
    if top_k is not None and not 1 <= top_k <= num_experts:
        raise CairnError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
    if routed_layers(model):
        raise CairnError("the model already has LoRA-MoE layers")
    names = [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] in set(target)
    ]
    if not names:
        raise CairnError(f"no linear layer named {list(target)} found in the model; check the LoRAMoE target modules")
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for i, name in enumerate(names):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base: nn.Linear = getattr(parent, child)
        bound = 1.0 / math.sqrt(base.in_features)  # kaiming_uniform_(a=sqrt(5)) on a (·, d_in) weight
        A = (torch.rand(num_experts, rank, base.in_features, generator=gen) * 2 - 1) * bound
        B = torch.zeros(num_experts, base.out_features, rank)
        router = (torch.rand(num_experts, base.in_features, generator=gen) * 2 - 1) * bound
        scaling = torch.full((num_experts,), alpha / rank)
        layer = RoutedLoRALinear(base, A, B, scaling, router, top_k=top_k, normalisation="softmax", dropout=dropout)
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
        layer.router.weight.requires_grad_(True)
        setattr(parent, child, layer)
    setattr(model, MIXTURE_ATTR, _manifest(model, names, num_experts, rank, alpha, dropout, list(target), top_k))
    return model


def _manifest(model, names, num_experts, rank, alpha, dropout, target, top_k) -> dict[str, Any]:
    from peft import LoraConfig

    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target), task_type="CAUSAL_LM",
        base_model_name_or_path=base_name,
    ).to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    expert = {"source": "loramoe", "config": config, "ranks": {n: rank for n in names}, "dtype": dtype}
    return {
        "kind": "loramoe",
        "top_k": top_k,
        "normalisation": "softmax",
        "router_init": "random",
        "modules": list(names),
        "experts": [dict(expert, config=dict(config)) for _ in range(num_experts)],
        "train_loramoe": {"num_experts": num_experts, "rank": rank, "alpha": alpha, "dropout": dropout},
    }


def localized_balance_loss(
    routing_weights: torch.Tensor,
    attention_mask: torch.Tensor | None,
    is_world_knowledge: torch.Tensor,
    delta: float,
    n_world: int | None = None,
) -> torch.Tensor:
    """Var(I∘Q) / Mean(I∘Q)² for one routed module (β not applied), sample variance as the reference.

    routing_weights (batch, tokens, N); attention_mask (batch, tokens) or None (all tokens count);
    is_world_knowledge (batch,) bool. Experts [0, n_world) form the world-knowledge group.
    """
    b, _, n = routing_weights.shape
    n_world = n // 2 if n_world is None else n_world
    if not 0 <= n_world <= n:
        raise ValueError(f"n_world={n_world} must be between 0 and the number of experts {n}")
    weights = routing_weights.float()
    if attention_mask is not None:
        weights = weights * attention_mask.to(weights).unsqueeze(-1)
    q = weights.sum(dim=1)  # (batch, N): importance of each expert for each example
    wk = is_world_knowledge.to(device=q.device, dtype=torch.bool).reshape(b, 1)
    in_world_group = (torch.arange(n, device=q.device) < n_world).unsqueeze(0)  # (1, N)
    matches = in_world_group == wk  # (batch, N): expert in the group of the example's type
    importance = torch.where(matches, 1.0 + delta, 1.0 - delta) * q
    z = importance.flatten()
    if z.numel() < 2:
        return z.sum() * 0.0
    return z.var() / (z.mean() ** 2 + 1e-10)


class LoRAMoELoss:
    """The localized balancing constraint as an extra-loss part: β · Σ_modules localized_balance_loss.

    Reads ``batch["is_world_knowledge"]`` (bool tensor, one per example) and
    ``batch["attention_mask"]`` (optional), and the routing weights each LoRAMoE layer recorded in
    the forward pass that produced ``outputs``.
    """

    def __init__(self, beta: float = 0.1, delta: float = 0.1, n_world: int | None = None, name: str = "loramoe_balance"):
        self.beta = beta
        self.delta = delta
        self.n_world = n_world
        self.name = name

    def extra_loss(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> dict[str, torch.Tensor]:
        if "is_world_knowledge" not in batch:
            raise CairnError(
                "LoRAMoE balancing needs batch['is_world_knowledge'] (one bool per example); mark world-knowledge "
                "tasks with world_knowledge: true (or a type field) in the task config"
            )
        layers = [layer for layer in routed_layers(model).values() if layer.last_routing_weights is not None]
        if not layers:
            raise CairnError("LoRAMoELoss: no LoRAMoE routing weights recorded; call it after a forward pass")
        wk = torch.as_tensor(batch["is_world_knowledge"])
        mask = batch.get("attention_mask")
        total = sum(
            localized_balance_loss(l.last_routing_weights, mask, wk, self.delta, self.n_world) for l in layers
        )
        return {self.name: self.beta * total}


@dataclass
class LoRAMoEConfig:
    experts: int = setting("LoRA experts per MLP linear.", 8)
    rank: int = setting("Rank of each expert.", 4)
    alpha: float = setting("LoRA alpha of each expert.", 32.0)
    dropout: float = setting("Dropout on the experts' input.", 0.05)
    top_k: int | None = setting("Route each token to its top-k experts (null: dense softmax, the paper).", None)
    beta: float = setting("Weight of the localized balancing constraint.", 0.1)
    delta: float = setting("Importance up/down-weighting of the matching/other half of the experts.", 0.1)


class LoRAMoE:
    """LoRAMoE as a trainable: the experts are added once and keep learning every round.

    The round's artifact is the whole mixture (``loramoe/``, the mixer's format: each expert a PEFT
    adapter directory, plus routers and a manifest that records the dropout for resumed rounds).
    """

    name = "loramoe"
    persistent_params = True
    ingredient_kind = None  # a mixture is not an ingredient of merging or mixing

    def __init__(self, method) -> None:
        self.cfg: LoRAMoEConfig = method.sections["loramoe"]

    def prepare(self, model, ctx: RoundContext):
        if not routed_layers(model):
            c = self.cfg
            model = apply_loramoe(model, num_experts=c.experts, rank=c.rank, alpha=c.alpha, dropout=c.dropout,
                                  top_k=c.top_k, seed=ctx.seed)
        freeze(model)
        for layer in routed_layers(model).values():  # experts and routers train, the backbone never
            for p in (layer.lora_A, layer.lora_B, layer.router.weight):
                p.requires_grad_(True)
        return model

    def loss_parts(self):
        return [LoRAMoELoss(beta=self.cfg.beta, delta=self.cfg.delta)]

    def save(self, model, ctx: RoundContext):
        from cairn.combine.moe_lora import save_lora_moe

        if ctx.write:  # only the main process of a multi-process run writes the artifact
            save_lora_moe(model, ctx.rdir / "loramoe", overwrite=True)
        return model

    def restore(self, ctx: RoundContext, upto: int):
        from cairn.combine.moe_lora import load_lora_moe

        return load_lora_moe(ctx.round_dir(upto) / "loramoe", ctx.load_base())

    def ingredient(self, rdir: Path, k: int) -> Path:
        raise CairnError("a LoRAMoE method's rounds are not ingredients of merging or mixing; use a "
                         "one-round method with trainable: full or lora as the combine source")

    def updates(self, ctx: RoundContext, rdirs: list[Path]):
        return None  # no per-round weight update to compare: the same experts train every round


register_trainable("loramoe", LoRAMoE)
register_section(Section("loramoe", LoRAMoEConfig, default_on=True))
