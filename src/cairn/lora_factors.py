"""Find the LoRA factors (A, B, scaling) of one named adapter in a PEFT model, by stable module name.

Shared by O-LoRA (which penalises the overlap of A matrices across rounds), N-LoRA (which
penalises the density of ΔW = scaling·B·A) and the round diagnostics. The module names are the
names *inside the wrapped transformer* (``model.layers.0.self_attn.q_proj`` for a Llama), found by
walking the transformer itself rather than by stripping strings from PEFT's parameter names, so
they are the same whether the model is a ``PeftModel``, its ``LoraModel``, a model with adapters
injected directly, a DDP/``torch.compile`` wrapper of any of these, or — after
``merge_and_unload()`` — the plain transformer that the next round wraps again.

Orientation: PEFT stores ``lora_A.weight`` as (r, d_in) and ``lora_B.weight`` as (d_out, r) for
every linear layer, also for GPT-2-style ``Conv1D`` layers (``fan_in_fan_out=True``) whose base
weight is stored (d_in, d_out); for embeddings ``lora_embedding_A`` is (r, num_embeddings) and
``lora_embedding_B`` is (dim, r). So ``B @ A`` is always the update in the (d_out, d_in)
orientation of ``y = W x``, and the factors here need no transposition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cairn.errors import CairnError


@dataclass(frozen=True)
class LoraFactors:
    """The live factors of one adapted module (tensors share storage with the model's parameters)."""

    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scaling: float  # lora_alpha / r (or / sqrt(r) with rsLoRA)
    fan_in_fan_out: bool  # the base weight is stored (d_in, d_out)
    dora: bool  # DoRA adapters also rescale by a magnitude vector: scaling·B·A is not their full update
    embedding: bool = False  # an nn.Embedding LoRA: its base weight is stored (num_embeddings, dim)


def transformer_root(model: nn.Module) -> nn.Module:
    """The transformer inside any PEFT / DDP / torch.compile wrapping (names are taken from here)."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    seen = 0
    while seen < 8:  # wrappers nest a few levels at most; the bound guards against odd cycles
        seen += 1
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, PeftModel):
            model = model.base_model
        elif isinstance(model, BaseTuner):
            model = model.model
        else:
            break
    return model


def adapter_names(model: nn.Module) -> list[str]:
    """All LoRA adapter names present anywhere in ``model`` (sorted)."""
    from peft.tuners.lora import LoraLayer

    names: set[str] = set()
    for module in transformer_root(model).modules():
        if isinstance(module, LoraLayer):
            names.update(module.lora_A.keys())
            names.update(module.lora_embedding_A.keys())
    return sorted(names)


def lora_factors(model: nn.Module, adapter_name: str) -> dict[str, LoraFactors]:
    """Module name -> live :class:`LoraFactors` of adapter ``adapter_name``, in module order.

    Raises :class:`CairnError` when no module carries the adapter (listing the adapters that do
    exist) or when the adapter sits on a layer type whose update is not a matrix (convolutions).
    """
    from peft.tuners.lora import LoraLayer

    found: dict[str, LoraFactors] = {}
    for name, module in transformer_root(model).named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if adapter_name in module.lora_A:
            a_mod, b_mod = module.lora_A[adapter_name], module.lora_B[adapter_name]
            if not isinstance(a_mod, nn.Linear) or a_mod.weight.dim() != 2:
                raise CairnError(
                    f"module {name!r}: adapter {adapter_name!r} is a {type(a_mod).__name__} LoRA; "
                    f"cairn's O-LoRA/N-LoRA/diagnostics handle linear and embedding layers only; "
                    f"remove this module from target_modules")
            A, B, embedding = a_mod.weight, b_mod.weight, False
        elif adapter_name in module.lora_embedding_A:
            A, B = module.lora_embedding_A[adapter_name], module.lora_embedding_B[adapter_name]
            embedding = True
        else:
            continue
        found[name] = LoraFactors(
            A=A,
            B=B,
            scaling=float(module.scaling[adapter_name]),
            fan_in_fan_out=bool(getattr(module, "fan_in_fan_out", False)),
            dora=bool(getattr(module, "use_dora", {}).get(adapter_name, False)),
            embedding=embedding,
        )
    if not found:
        present = adapter_names(model)
        raise CairnError(f"no LoRA layer carries adapter {adapter_name!r}; adapters present: "
                         f"{present or 'none'}; pass one of these names (PEFT's default is 'default')")
    return found
