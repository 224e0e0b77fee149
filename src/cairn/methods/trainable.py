"""What is trainable in a round: the full model (FFT) or a fresh LoRA adapter (PEFT).

LoRA (Hu et al. 2021, arXiv 2106.09685) is PEFT's implementation, unchanged. Sequential LoRA has two
modes (:class:`cairn.config.LoraConfig.sequential`):
- ``merge`` (the seed paper, Lee & Wynter 2024, arXiv 2410.13699): after each round the adapter is
  saved, then merged into the weights; the next round adds a fresh adapter on the merged model.
- ``stack`` (O-LoRA's original code): earlier adapters stay in the model as frozen adapters, all
  active; only the newest adapter trains.
"""

from __future__ import annotations

import torch

from cairn.config import LoraConfig


def adapter_name(round_index: int) -> str:
    return f"round{round_index}"


def make_full_trainable(model):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _peft_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    target = cfg.target_modules
    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target,
                          bias="none", task_type="CAUSAL_LM")


def add_lora_adapter(model, cfg: LoraConfig, round_index: int, seed: int):
    """Add a fresh adapter for ``round_index``; earlier adapters (stack mode) stay frozen and active."""
    from peft import PeftModel, get_peft_model

    name = adapter_name(round_index)
    torch.manual_seed(seed * 7919 + round_index)  # the adapter's A init is seeded per round
    if isinstance(model, PeftModel):
        model.add_adapter(name, _peft_config(cfg))
        names = list(model.peft_config)
        model.base_model.set_adapter(names)
    else:
        model = get_peft_model(model, _peft_config(cfg), adapter_name=name)
    for n, p in model.named_parameters():
        p.requires_grad_(f".{name}." in n)
    return model


def active_adapters(model) -> list[str]:
    from peft import PeftModel

    return list(model.peft_config) if isinstance(model, PeftModel) else []


def merge_adapters(model):
    """Merge every adapter into the base weights and return the plain transformers model."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def save_adapter(model, round_index: int, out) -> None:
    """Save one round's adapter as a PEFT adapter directory that vanilla PEFT loads."""
    model.save_pretrained(str(out), selected_adapters=[adapter_name(round_index)])
