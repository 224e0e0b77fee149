"""A training round's LoRA linears as one autograd node each: base product and adapters fused.

LoRA (Hu et al. 2022, arXiv:2106.09685) computes ``y = x Wᵀ + b + Σᵢ sᵢ · (x Aᵢᵀ) Bᵢᵀ``. PEFT's
``lora.Linear.forward`` writes that as separate modules and tensor ops: the base product, then per
adapter ``lora_B(lora_A(x)) * scaling`` and an out-of-place add. Under autograd that is 5-6 nodes
per adapted layer, a scaling multiply of the whole ``(tokens, out)`` output forward and again
backward, an output-sized add, and the input gradient summed from two paths. Fusing them made a
LoRA bf16 forward + backward of SmolLM2-135M 1.035x faster on a 2-core CPU (16 alternating repeats
in one process; ~1.0-1.03x in float32): small, and exact to float rounding.

While a round trains, :func:`fused_lora_linears` gives each eligible PEFT ``lora.Linear`` a
forward that runs :class:`_FusedLoraLinear` instead, with the same math and explicit products:

- forward: ``z = (x Aᵀ)·s`` on the ``(tokens, r)`` factor (the scale applied to r columns, not to
  the output), ``y = x Wᵀ + b`` and ``y += z Bᵀ`` accumulated in place by the matmul (``addmm_``);
  several active adapters (stacked rounds) are one product: their A's and B's concatenated;
- backward: ``dz = (g B)·s``, ``dx = g W + dz A`` accumulated by one ``addmm_``, ``dA = dzᵀ x``,
  ``dB = gᵀ z``, each only where a gradient is needed (frozen adapters and base get none).

What stays exact: the same products in the same precision (autocast's dtype, else the tensors'
own), so values agree with PEFT's to float rounding (tested forward and backward, one and several
adapters, biased bases, bf16 autocast). The saved adapter is PEFT's own module and weights: only
the forward of the round is replaced, and restored on exit. Anything else takes PEFT's forward
unchanged: LoRA variants (DoRA), dropout that is active, LoRA biases, merged or disabled adapters,
non-``nn.Linear`` bases (GPT-2 ``Conv1D``, 4-bit), hooked modules, mixed dtypes outside autocast,
extra forward arguments. Hand-written because neither PEFT nor torch has this fused node for CPUs.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class _FusedLoraLinear(torch.autograd.Function):
    """``y = x Wᵀ + b + Σᵢ sᵢ (x Aᵢᵀ) Bᵢᵀ`` with an explicit backward (see the module docstring).

    Arguments: ``x, weight, bias, dtype, scales, n`` then ``n`` A factors then ``n`` B factors.
    ``weight`` and ``bias`` are frozen (the caller checks); A/B factors may be frozen or trainable.
    Every operand is cast to ``dtype`` (autocast's, or the tensors' own), so the ambient autocast
    has nothing left to cast; kept lean because it runs once per adapted layer per micro-batch.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, dtype, scales, n, *factors):
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        w = weight.to(dtype)
        if n == 1:
            a, b = factors[0].to(dtype), factors[1].to(dtype)  # (r, in), (out, r)
            ranks = (a.shape[0],)
        else:
            a = torch.cat([f.to(dtype) for f in factors[:n]], dim=0)  # (R, in)
            b = torch.cat([f.to(dtype) for f in factors[n:]], dim=1)  # (out, R)
            ranks = tuple(f.shape[0] for f in factors[:n])
        z = torch.mm(x2, a.t())
        _scale_columns(z, scales, ranks)
        y = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias.to(dtype), x2, w.t())
        y.addmm_(z, b.t())  # the adapter accumulated into the output by the matmul itself
        ctx.save_for_backward(x2, z, w, a, b)
        ctx.meta = (x.shape, x.dtype, scales, ranks, tuple(f.dtype for f in factors))
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, z, w, a, b = ctx.saved_tensors
        shape, x_dtype, scales, ranks, dtypes = ctx.meta
        n = len(ranks)
        needs = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1]).to(z.dtype)
        dz = torch.mm(g, b)  # (T, R)
        _scale_columns(dz, scales, ranks)
        dx = None
        if needs[0]:
            dx = torch.mm(g, w)
            dx.addmm_(dz, a)  # base and adapter input gradients summed inside one matmul
            dx = dx.view(shape).to(x_dtype)
        grads_a, grads_b, start = [], [], 0
        for i, r in enumerate(ranks):  # each adapter's columns of z and dz
            cols = slice(start, start + r)
            start += r
            grads_a.append(torch.mm(dz[:, cols].t(), x2).to(dtypes[i]) if needs[6 + i] else None)
            grads_b.append(torch.mm(g.t(), z[:, cols]).to(dtypes[n + i]) if needs[6 + n + i] else None)
        return (dx, None, None, None, None, None, *grads_a, *grads_b)


def _scale_columns(z: torch.Tensor, scales: tuple[float, ...], ranks: tuple[int, ...]) -> None:
    """Multiply each adapter's r columns of ``z`` by its scaling, in place."""
    if len(set(scales)) == 1:
        z.mul_(scales[0])
        return
    start = 0
    for s, r in zip(scales, ranks):
        z[:, start:start + r].mul_(s)
        start += r


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"))


def _eligible(module: nn.Module) -> bool:
    """Whether ``module`` is a plain PEFT LoRA linear this fused node reproduces exactly (static part)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    base = getattr(module, "base_layer", None)
    return (type(module) is LoraLinear and type(base) is nn.Linear and not _hooked(base)
            and not getattr(module, "fan_in_fan_out", False))


def _fused_call(module: nn.Module, x: torch.Tensor):
    """The fused node's output for ``module`` now, or None where PEFT's own forward must run."""
    if module.disable_adapters or module.merged or not torch.is_floating_point(x):
        return None
    active = [a for a in module.active_adapters if a in module.lora_A]
    if not active:
        return None
    base = module.base_layer
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    a_mods = [module.lora_A[a] for a in active]
    b_mods = [module.lora_B[a] for a in active]
    for name, am, bm in zip(active, a_mods, b_mods):
        if name in getattr(module, "lora_variant", {}) or type(am) is not nn.Linear or type(bm) is not nn.Linear:
            return None
        if am.bias is not None or bm.bias is not None or _hooked(am) or _hooked(bm):
            return None
        drop = module.lora_dropout[name]
        if module.training and not isinstance(drop, nn.Identity) and getattr(drop, "p", 1.0) != 0:
            return None
    factors = [m.weight for m in a_mods] + [m.weight for m in b_mods]
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = x.dtype
        if base.weight.dtype != dtype or any(f.dtype != dtype for f in factors):
            return None  # PEFT's own casting rules for mixed dtypes apply
    scales = tuple(float(module.scaling[a]) for a in active)
    return _FusedLoraLinear.apply(x, base.weight, base.bias, dtype, scales, len(active), *factors)


@contextlib.contextmanager
def fused_lora_linears(model: nn.Module) -> Iterator[int]:
    """While inside, eligible PEFT LoRA linears of ``model`` run :class:`_FusedLoraLinear`; yields
    how many. Each call still checks what can change during a round (merged, disabled, active
    adapters, dropout, dtypes) and falls back to PEFT's forward; on exit every forward is restored."""
    patched: list[nn.Module] = []

    def fused_forward(module, original):
        def forward(x, *args, **kwargs):
            out = None if (args or kwargs) else _fused_call(module, x)
            return original(x, *args, **kwargs) if out is None else out
        return forward

    try:
        for module in model.modules():
            if _eligible(module) and "forward" not in module.__dict__:
                module.forward = fused_forward(module, module.forward)
                patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)
