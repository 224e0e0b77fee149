"""The fused LoRA linear (cairn.train.fused_lora) against PEFT's own forward, on hand-built models.

Same products in the same precision, in another order: float32 values agree to 1e-5 (relative);
under bf16 autocast the fused values are no further from the float32 ones than PEFT's own bf16
values are (within 1.5x of PEFT's distance).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from cairn.train.fused_lora import _FusedLoraLinear, fused_lora_linears
from conftest import make_tiny_llama
from test_packing import tiny_qwen2


def lora_model(base, *, r=4, alpha=8, dropout=0.0, seed=1, **extra):
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear",
                                            **extra), adapter_name="one")
    for name, p in model.named_parameters():  # B starts at zero in PEFT: make the adapter matter
        if "lora_B" in name:
            with torch.no_grad():
                p.normal_(0, 0.05)
    return model


def loss_and_grads(model, ids, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits
    loss = logits.float().pow(2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_close(got, want, rel):
    loss_g, grads_g = got
    loss_w, grads_w = want
    assert torch.allclose(loss_g, loss_w, rtol=rel, atol=0), (loss_g, loss_w)
    assert grads_g.keys() == grads_w.keys() and grads_g
    for name in grads_w:
        scale = grads_w[name].abs().max().clamp_min(1e-12)
        err = (grads_g[name] - grads_w[name]).abs().max() / scale
        assert err < rel, (name, float(err))


def spy_calls(monkeypatch):
    calls = []
    original = _FusedLoraLinear.apply

    def apply(*args):
        calls.append(args[1].shape)
        return original(*args)

    monkeypatch.setattr(_FusedLoraLinear, "apply", apply)
    return calls


@pytest.mark.parametrize("alpha", [8, 6])  # scaling 2 (a power of two) and 1.5
def test_matches_peft_float32(alpha, monkeypatch):
    model = lora_model(make_tiny_llama(), alpha=alpha)
    model.train()
    ids = torch.randint(3, 128, (2, 11))
    want = loss_and_grads(model, ids)
    calls = spy_calls(monkeypatch)
    with fused_lora_linears(model) as n:
        got = loss_and_grads(model, ids)
    assert n == 2 * 7 and len(calls) == n  # every adapted linear of both layers took the fused node
    assert_close(got, want, 1e-5)
    assert all("forward" not in m.__dict__ for m in model.modules())  # PEFT's forward is back


def test_under_bf16_autocast_with_a_biased_base_no_further_from_float32_than_peft():
    """bf16 rounds differently in another order, so compare each bf16 path with the float32 values:
    the fused node must be as close to them as PEFT's own bf16 forward is (it accumulates the adapter
    into the output inside the matmul, so it is usually closer)."""
    model = lora_model(tiny_qwen2(), alpha=16)  # qwen2's q/k/v projections carry a bias
    model.train()
    ids = torch.randint(3, 128, (2, 13))
    exact = loss_and_grads(model, ids)
    peft = loss_and_grads(model, ids, autocast=True)
    with fused_lora_linears(model) as n:
        fused = loss_and_grads(model, ids, autocast=True)
    assert n == 14
    assert all(g.dtype == torch.float32 for g in fused[1].values())  # adapters stay float32, as their grads

    def error(got):
        return max(float((got[1][k] - exact[1][k]).norm() / exact[1][k].norm()) for k in exact[1])

    assert fused[1].keys() == exact[1].keys()
    assert abs(float(fused[0] - exact[0])) <= 1.5 * abs(float(peft[0] - exact[0])) + 1e-2 * float(exact[0])
    assert error(fused) <= 1.5 * error(peft) + 1e-3, (error(fused), error(peft))
    assert error(peft) < 0.1  # the comparison means something: bf16 itself is this close


def test_stacked_adapters_one_frozen_with_its_own_rank_and_scale(monkeypatch):
    model = lora_model(make_tiny_llama(), r=4, alpha=8)
    torch.manual_seed(5)
    model.add_adapter("two", LoraConfig(r=2, lora_alpha=3, target_modules="all-linear"))
    model.base_model.set_adapter(["one", "two"])
    for name, p in model.named_parameters():
        p.requires_grad_(".two." in name)
        if "lora_B.two" in name:
            with torch.no_grad():
                p.normal_(0, 0.05)
    model.train()
    ids = torch.randint(3, 128, (2, 9))
    want = loss_and_grads(model, ids)
    calls = spy_calls(monkeypatch)
    with fused_lora_linears(model):
        got = loss_and_grads(model, ids)
    assert len(calls) == 14 and all(".two." in n for n in got[1])
    assert_close(got, want, 1e-5)


def test_input_without_grad_and_no_grad_forward():
    layer = lora_model(nn.Sequential(nn.Linear(8, 6)), r=2, alpha=4)
    x = torch.randn(3, 8)
    want = layer(x)
    with fused_lora_linears(layer) as n, torch.no_grad():
        got = layer(x)
    assert n == 1
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["dropout", "merged", "disabled", "dora", "hooked", "mixed-dtypes"])
def test_falls_back_to_peft_where_it_would_differ(case, monkeypatch):
    model = lora_model(make_tiny_llama(), dropout=0.1 if case == "dropout" else 0.0,
                       use_dora=case == "dora")
    model.train()
    ids = torch.randint(3, 128, (1, 7))
    if case == "merged":
        model.merge_adapter()
    if case == "hooked":
        for m in model.modules():
            if hasattr(m, "lora_A"):
                m.lora_A["one"].register_forward_hook(lambda *a: None)
    if case == "mixed-dtypes":  # bf16 base, float32 adapters, no autocast: PEFT's casting rules
        for m in model.modules():
            if hasattr(m, "base_layer") and isinstance(m.base_layer, nn.Linear):
                m.base_layer.to(torch.bfloat16)
    calls = spy_calls(monkeypatch)
    with fused_lora_linears(model):
        if case == "disabled":
            with model.disable_adapter():
                model(input_ids=ids)
        elif case != "mixed-dtypes":
            model(input_ids=ids)
        else:
            layer = next(m for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A"))
            layer(torch.randn(1, 7, layer.in_features, dtype=torch.bfloat16))
    assert calls == []


def test_forward_restored_when_the_body_raises():
    model = lora_model(make_tiny_llama())
    with pytest.raises(RuntimeError, match="boom"):
        with fused_lora_linears(model) as n:
            assert n > 0
            raise RuntimeError("boom")
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_trains_like_peft_over_steps():
    """Three AdamW steps through cairn's loop path and through PEFT's: same adapter to float32 rounding."""
    ids = torch.randint(3, 128, (2, 12))
    finals = []
    for fused in (False, True):
        model = lora_model(make_tiny_llama())
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        with fused_lora_linears(model) if fused else torch.enable_grad():
            for _ in range(3):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
        finals.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, want in finals[0].items():
        torch.testing.assert_close(finals[1][name], want, rtol=1e-4, atol=1e-5)


def test_under_gradient_checkpointing(monkeypatch):
    """Checkpointed layers run the forward again in backward: the fused node there too, same grads."""
    model = lora_model(make_tiny_llama())
    model.train()
    ids = torch.randint(3, 128, (2, 10))
    want = loss_and_grads(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    calls = spy_calls(monkeypatch)
    with fused_lora_linears(model):
        got = loss_and_grads(model, ids)
    assert len(calls) == 2 * 14  # 14 adapted linears, each run in the forward and again in the recompute
    assert_close(got, want, 1e-5)
