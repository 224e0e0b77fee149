"""LoRAMoE training parts (cairn.methods.loramoe): layers, localized balancing loss, save/reload."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

from cairn.combine.moe_lora import LoRAMoELinear, load_lora_moe, lora_moe_layers, save_lora_moe
from cairn.errors import CairnError
from cairn.methods.loramoe import LoRAMoELoss, apply_loramoe, localized_balance_loss

IDS = torch.tensor([[2, 3, 4, 5, 6, 0], [7, 8, 9, 10, 11, 12]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _sample_var_over_mean_sq(values: list[float]) -> float:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)  # sample variance, as the reference's torch.var()
    return var / (mean**2 + 1e-10)


def test_balance_loss_equals_hand_computed_value():
    # 2 examples x 3 tokens x 4 experts; example 0's last token is padding
    w = torch.tensor([
        [[0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.2, 0.2], [0.9, 0.05, 0.03, 0.02]],
        [[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1], [0.0, 0.0, 0.5, 0.5]],
    ])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    wk = torch.tensor([True, False])
    d = 0.2
    q0 = [0.6, 0.3, 0.5, 0.6]  # example 0, padding excluded
    q1 = [0.95, 0.35, 0.85, 0.85]
    # world-knowledge example: experts 0,1 weighted 1+d; downstream example: experts 2,3 weighted 1+d
    z = [q0[0] * 1.2, q0[1] * 1.2, q0[2] * 0.8, q0[3] * 0.8, q1[0] * 0.8, q1[1] * 0.8, q1[2] * 1.2, q1[3] * 1.2]
    got = localized_balance_loss(w, mask, wk, delta=d)
    assert got.item() == pytest.approx(_sample_var_over_mean_sq(z), rel=1e-5)
    # no mask: every token counts (the reference code's behaviour)
    q0_all = [1.5, 0.35, 0.53, 0.62]
    z_all = [q0_all[0] * 1.2, q0_all[1] * 1.2, q0_all[2] * 0.8, q0_all[3] * 0.8] + z[4:]
    assert localized_balance_loss(w, None, wk, delta=d).item() == pytest.approx(_sample_var_over_mean_sq(z_all), rel=1e-5)
    # n_world=1: only expert 0 is in the world group
    z_one = [q0[0] * 1.2, q0[1] * 0.8, q0[2] * 0.8, q0[3] * 0.8, q1[0] * 0.8, q1[1] * 1.2, q1[2] * 1.2, q1[3] * 1.2]
    assert localized_balance_loss(w, mask, wk, delta=d, n_world=1).item() == pytest.approx(_sample_var_over_mean_sq(z_one), rel=1e-5)


def test_apply_loramoe_structure_and_initial_identity():
    model = tiny_model()
    with torch.no_grad():
        want = model(IDS, attention_mask=MASK).logits
    apply_loramoe(model, num_experts=4, rank=2, alpha=8)
    layers = lora_moe_layers(model)
    assert len(layers) == 2 * 3 and all(n.rpartition(".")[2] in ("gate_proj", "up_proj", "down_proj") for n in layers)
    assert all(l.num_experts == 4 and l.rank == 2 and torch.equal(l.scaling, torch.full((4,), 4.0)) for l in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B", "router.weight")) for n in trainable)
    with torch.no_grad():  # B starts at zero: the model is unchanged
        assert torch.equal(model(IDS, attention_mask=MASK).logits, want)
    weights = next(iter(layers.values())).last_routing_weights
    assert weights.shape == (2, 6, 4) and torch.allclose(weights.sum(-1), torch.ones(2, 6))  # dense softmax


def test_training_updates_experts_only_and_balance_reaches_routers():
    model = tiny_model()
    apply_loramoe(model, num_experts=4, rank=2, dropout=0.0)
    loss_part = LoRAMoELoss(beta=0.5, delta=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = {"input_ids": IDS, "attention_mask": MASK, "is_world_knowledge": torch.tensor([True, False])}
    outputs = model(input_ids=IDS, attention_mask=MASK)
    terms = loss_part.extra_loss(model, batch, outputs)
    assert set(terms) == {"loramoe_balance"} and torch.isfinite(terms["loramoe_balance"])
    expected = 0.5 * sum(localized_balance_loss(l.last_routing_weights, MASK, batch["is_world_knowledge"], 0.1)
                         for l in lora_moe_layers(model).values())
    torch.testing.assert_close(terms["loramoe_balance"], expected)
    terms["loramoe_balance"].backward()
    assert all(l.router.weight.grad is not None and l.router.weight.grad.abs().sum() > 0 for l in lora_moe_layers(model).values())
    model.zero_grad()

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.train()
    for _ in range(2):
        outputs = model(input_ids=IDS, attention_mask=MASK, labels=IDS.masked_fill(MASK == 0, -100))
        (outputs.loss + sum(loss_part.extra_loss(model, batch, outputs).values())).backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]) or n.endswith("lora_A"), n  # B and routers move
        else:
            assert torch.equal(p, before[n]), n


def test_top_k_option_routes_k_experts():
    model = tiny_model()
    apply_loramoe(model, num_experts=4, rank=2, top_k=2)
    model(IDS)
    for layer in lora_moe_layers(model).values():
        assert (layer.last_routing_weights > 0).sum(-1).eq(2).all()


def test_save_reload_and_experts_are_peft_adapters(tmp_path):
    model = tiny_model()
    apply_loramoe(model, num_experts=2, rank=2)
    with torch.no_grad():  # pretend training happened
        for layer in lora_moe_layers(model).values():
            layer.lora_B.normal_(0, 0.1)
        want = model.eval()(IDS).logits
    out = save_lora_moe(model, tmp_path / "loramoe")
    reloaded = load_lora_moe(out, tiny_model())
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, want)
    assert isinstance(reloaded.model.layers[0].mlp.up_proj, LoRAMoELinear)
    peft_model = PeftModel.from_pretrained(tiny_model(), out / "experts" / "1")
    layer = lora_moe_layers(model)["model.layers.0.mlp.down_proj"]
    assert torch.equal(peft_model.base_model.model.model.layers[0].mlp.down_proj.lora_B["default"].weight, layer.lora_B[1])


def test_bad_inputs():
    with pytest.raises(CairnError, match="is_world_knowledge"):
        model = apply_loramoe(tiny_model(), num_experts=2)
        LoRAMoELoss().extra_loss(model, {"input_ids": IDS}, model(IDS))
    with pytest.raises(CairnError, match="top_k=3"):
        apply_loramoe(tiny_model(), num_experts=2, top_k=3)
    with pytest.raises(CairnError, match="no linear layer"):
        apply_loramoe(tiny_model(), target=("not_a_module",))


def test_resumed_loramoe_rebuilds_layers_with_the_configured_dropout(tmp_path, tiny_model_dir):
    """A LoRAMoE run resumed between rounds gets the same dropout and the same weights back."""
    from cairn.config import config_from_dict
    from cairn.experiment import Runner
    from cairn.routed_lora import routed_layers

    cfg = config_from_dict({
        "name": "t", "model": str(tiny_model_dir),
        "tasks": [{"name": t, "format": "demo", "path": t, "entities": 2, "max_new_tokens": 4,
                   "world_knowledge": t == "zoology"} for t in ("zoology", "geography")],
        "methods": [{"name": "moe", "trainable": "loramoe", "loramoe": {"experts": 2, "rank": 2, "dropout": 0.3}}],
        "training": {"max_steps": 1, "batch_size": 4, "max_length": 64}, "evaluation": {"batch_size": 8},
    })
    runner = Runner(cfg, tmp_path / "exp", progress=False, echo=False)
    runner.run()
    method = runner.methods["moe"]
    ctx = runner.context(cfg.methods[0], 1, lambda s: None)
    restored = method.restore(ctx, 1)
    layers = routed_layers(restored)
    assert layers and all(layer.dropout_p == 0.3 for layer in layers.values())
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "exp/moe/rounds/01-zoology/loramoe/experts/0/adapter_model.safetensors"))
    name, layer = next(iter(layers.items()))
    assert torch.equal(layer.lora_A[0], saved[f"base_model.model.{name}.lora_A.weight"])  # bit-equal: a copy
