"""Router initialisation for MoE mixing: from hidden states of the base model, or random.

moetify (Lee et al. 2024, arXiv 2408.17280) and mergekit-moe initialise each expert's router row
from "positive prompts": run the base model on prompts that characterise the expert and take the
hidden state the router will see. Choices made here:

- The vector is the *input of the routed module* (captured with a forward pre-hook): for an FFT
  mixture the input of each layer's MLP (the post-attention RMSNorm output, exactly what Mixtral's
  router reads); for a LoRA mixture the input of each adapted linear. mergekit reads the residual
  stream (``hidden_states[layer]``) instead, which is not what the router multiplies.
- ``"mean"`` (moetify): mean over each prompt's non-padding tokens, then mean over prompts (each
  prompt weighs the same whatever its length), then L2-normalised. ``"last"``: the last non-padding
  token of each prompt instead of the token mean (mergekit's "hidden" mode).
- mergekit also subtracts the mean of *negative* prompts; pass ``negative_prompts`` to do the same
  (the row becomes normalise(mean(pos) - mean(neg))).
- ``"data"`` initialisation is the same computation over a sample of each expert's training texts
  instead of hand-written prompts; the caller passes those texts.
- Random: N(0, std) with std 0.02 (the usual initializer_range), from a seeded generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cairn.errors import CairnError

ROUTER_INITS = ("random", "prompts", "last_token", "data", "zeros")


def random_router(num_experts: int, dim: int, std: float = 0.02, seed: int = 0) -> torch.Tensor:
    """A (num_experts, dim) router weight drawn from N(0, std²) with a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_experts, dim, generator=gen) * std


@torch.no_grad()
def module_input_means(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    module_names: Sequence[str],
    reduce: str = "mean",
    batch_size: int = 8,
    max_length: int = 512,
) -> dict[str, torch.Tensor]:
    """Average input of each named module over ``prompts`` (not normalised), float32.

    ``reduce="mean"`` averages over each prompt's non-padding tokens, ``"last"`` takes its last
    non-padding token; either way the result is then averaged over prompts.
    """
    if reduce not in ("mean", "last"):
        raise ValueError(f"reduce must be 'mean' or 'last', got {reduce!r}")
    prompts = [p for p in prompts if p and p.strip()]
    if not prompts:
        raise CairnError("router initialisation got no non-empty prompts; give at least one prompt per expert")
    modules = dict(model.named_modules())
    missing = [n for n in module_names if n not in modules]
    if missing:
        raise CairnError(f"router initialisation: modules not found in the model: {missing[:5]}")

    sums: dict[str, torch.Tensor] = {}
    current_mask: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(_module, args):
            x = args[0].detach().float()  # (batch, tokens, dim)
            mask = current_mask["m"].to(x.device, torch.float32)  # (batch, tokens)
            if reduce == "mean":
                per_prompt = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
            else:
                last = (mask.sum(1).long() - 1).clamp_min(0)  # right padding: last real token
                per_prompt = x[torch.arange(x.shape[0], device=x.device), last]
            total = per_prompt.sum(0).cpu()
            sums[name] = sums[name] + total if name in sums else total

        return hook

    handles = [modules[n].register_forward_pre_hook(make_hook(n)) for n in module_names]
    old_side = getattr(tokenizer, "padding_side", "right")
    tokenizer.padding_side = "right"
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(
                list(prompts[start : start + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            current_mask["m"] = enc["attention_mask"]
            model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
    finally:
        for h in handles:
            h.remove()
        tokenizer.padding_side = old_side
        model.train(was_training)
    return {n: sums[n] / len(prompts) for n in module_names}


def hidden_state_routers(
    model: nn.Module,
    tokenizer,
    prompts_per_expert: Sequence[Sequence[str]],
    module_names: Sequence[str],
    reduce: str = "mean",
    negative_prompts: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Router weights (num_experts, dim) per module: row e = normalise(mean input over expert e's prompts)."""
    per_expert = [module_input_means(model, tokenizer, p, module_names, reduce) for p in prompts_per_expert]
    negative = module_input_means(model, tokenizer, negative_prompts, module_names, reduce) if negative_prompts else None
    routers = {}
    for name in module_names:
        rows = torch.stack([m[name] for m in per_expert])
        if negative is not None:
            rows = rows - negative[name]
        routers[name] = nn.functional.normalize(rows, dim=-1)
    return routers


def check_router_prompts(router_init: str, router_prompts, num_experts: int) -> None:
    """Raise a CairnError unless ``router_prompts`` suits ``router_init`` for ``num_experts`` experts."""
    if router_init not in ROUTER_INITS:
        raise CairnError(f"unknown router_init {router_init!r}; choose one of {', '.join(ROUTER_INITS)}")
    if router_init in ("random", "zeros"):
        return
    if router_prompts is None:
        raise CairnError(
            f"router_init={router_init!r} needs router_prompts: one list of texts per expert "
            f"({num_experts} lists); or use router_init='random'"
        )
    if len(router_prompts) != num_experts:
        raise CairnError(f"router_prompts has {len(router_prompts)} lists but there are {num_experts} experts")
    for i, prompts in enumerate(router_prompts):
        if isinstance(prompts, str) or not any(p and str(p).strip() for p in prompts):
            raise CairnError(f"router_prompts[{i}] must be a non-empty list of non-empty texts")


def reduce_for(router_init: str) -> str:
    return "last" if router_init == "last_token" else "mean"
