"""Model settings a training round applies and undoes: attention kernel, gradient checkpointing,
the dtype of the frozen base (QLoRA-style fp32 adapters on a bf16 base, Dettmers et al. 2023,
arXiv:2305.14314).

Everything here calls transformers' own switches (``set_attn_implementation``,
``gradient_checkpointing_enable``); what is hand-written is only the checking (a clear
:class:`CairnError` naming the setting) and the bf16 holding of frozen Linear weights.
"""

from __future__ import annotations

import contextlib
import importlib.util
import weakref
from typing import Iterator

import torch
from torch import nn

from cairn.config import TrainingConfig
from cairn.errors import CairnError


def hf_model(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_attn_implementation(name: str) -> None:
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise CairnError("training.attn_implementation: flash_attention_2 needs the flash-attn package (and a "
                         "CUDA GPU); install it with `pip install flash-attn --no-build-isolation`, or use sdpa")


def apply_model_settings(model, cfg: TrainingConfig) -> dict:
    """Apply the round's attention kernel, checkpointing and base dtype; returns what to undo."""
    hf = hf_model(model)
    undo: dict = {}
    if cfg.attn_implementation != "auto":
        check_attn_implementation(cfg.attn_implementation)
        undo["attn"] = getattr(hf.config, "_attn_implementation", None)
        try:
            hf.set_attn_implementation(cfg.attn_implementation)
        except (ValueError, ImportError) as e:
            raise CairnError(f"training.attn_implementation: {cfg.attn_implementation} is not available for "
                             f"{type(hf).__name__}: {str(e).splitlines()[0]}") from None
    if cfg.gradient_checkpointing:
        if not getattr(hf, "supports_gradient_checkpointing", False):
            raise CairnError(f"training.gradient_checkpointing: {type(hf).__name__} does not support gradient "
                             f"checkpointing; set it to false")
        # non-reentrant: works when the inputs of a checkpointed block need no grad (frozen embeddings)
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5 name
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        undo["checkpointing"] = True
    if cfg.base_dtype == "bfloat16":
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point() and p.dtype != torch.bfloat16:
                p.data = p.data.to(torch.bfloat16)
    return undo


def restore_model_settings(model, undo: dict) -> None:
    hf = hf_model(model)
    if undo.get("checkpointing"):
        (getattr(hf, "activation_checkpointing_disable", None) or hf.gradient_checkpointing_disable)()
    if undo.get("attn"):
        hf.set_attn_implementation(undo["attn"])


# Output layers whose frozen float32 weight is tied to the input embedding, mapped to a bf16 copy
# held for the round by :func:`frozen_linears_in_bf16` (read by :func:`output_layer_weight`).
_BF16_HEADS: "weakref.WeakKeyDictionary[nn.Module, torch.Tensor]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def frozen_linears_in_bf16(model: nn.Module) -> Iterator[int]:
    """Hold frozen float32 ``nn.Linear`` weights in bf16 while inside; restore them on exit.

    Under bf16 autocast a Linear casts its weight to bf16 on every call, and autocast caches that
    cast only for weights that require grad, so a frozen base is re-cast every forward. Casting it
    once gives the matmuls the very same bf16 values. Weights shared with an embedding (tied output
    layer) are left alone: an embedding lookup is not autocast, so casting it would change values.
    Such a tied, frozen output layer gets a bf16 COPY for the round instead (vocab x hidden x 2
    bytes): re-casting SmolLM2's 49k x 576 head every micro-step took ~12% of a LoRA bf16 step on a
    2-core CPU. :func:`cairn.train.loop.answer_token_loss` multiplies by it, same values as autocast.
    """
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    heads: list[nn.Module] = []
    for module in model.modules():
        if type(module) is nn.Linear:
            for p in (module.weight, module.bias):
                if p is None or p.requires_grad or p.dtype != torch.float32:
                    continue
                if id(p) not in embedding_weights:
                    saved.append((p, p.data))
                    p.data = p.data.to(torch.bfloat16)
                elif p is module.weight:
                    _BF16_HEADS[module] = p.detach().to(torch.bfloat16)
                    heads.append(module)
    try:
        yield len(saved)
    finally:
        for p, original in saved:
            p.data = original
        for module in heads:
            _BF16_HEADS.pop(module, None)


def output_layer_weight(head: nn.Module) -> torch.Tensor:
    """The weight an output layer multiplies by now: its round-long bf16 copy, else its own."""
    return _BF16_HEADS.get(head, head.weight)


@contextlib.contextmanager
def adapter_input_casts_off(model: nn.Module) -> Iterator[None]:
    """Under bf16 autocast: PEFT adapters skip casting their input to the adapter's float32 dtype.

    Autocast casts every matmul input to bf16, so PEFT's cast of a bf16 activation (the input of
    ``o_proj``, ``down_proj``) to float32 is undone right after: an exact round trip costing two
    activation-sized copies forward and two backward per adapted layer. Only for autocast rounds:
    without autocast the cast is what makes a bf16 activation meet float32 adapter weights.
    """
    from peft.helpers import disable_input_dtype_casting

    with disable_input_dtype_casting(model):
        yield
