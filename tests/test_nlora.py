"""N-LoRA (arXiv 2410.10179): the ℓ1 penalty on ΔW = scaling·B·A and its effect on sparsity."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from cairn.errors import CairnError
from cairn.eval.diagnostics import lora_delta_weights, round_diagnostics
from cairn.methods.nlora import NLoRALoss, nlora_l1_penalty


def tiny_peft(seed: int = 0, targets=("q_proj", "v_proj")):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    targets = targets if isinstance(targets, str) else list(targets)  # "all-linear" stays a string
    return get_peft_model(LlamaForCausalLM(cfg),
                          LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))


@pytest.fixture(autouse=True)
def one_thread():
    # Several test processes share two cores: one intra-op thread avoids oversubscription (~20x here).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_l1_hand_values_non_square():
    B = torch.tensor([[1.0], [2.0]])  # (d_out=2, r=1)
    A = torch.tensor([[1.0, -1.0, 3.0]])  # (r=1, d_in=3)
    # B·A = [[1, -1, 3], [2, -2, 6]] -> ‖·‖₁ = 15, times scaling 2
    assert nlora_l1_penalty(B, A, 2.0).item() == pytest.approx(30.0)


def test_l1_shape_mismatch_is_a_cairn_error():
    with pytest.raises(CairnError, match="same r"):
        nlora_l1_penalty(torch.zeros(4, 2), torch.zeros(3, 5), 1.0)


def test_l1_gradient():
    B = torch.tensor([[1.0], [-2.0]], requires_grad=True)
    A = torch.tensor([[1.0, -1.0]], requires_grad=True)
    nlora_l1_penalty(B, A, 0.5).backward()
    # d/dB Σ|s·B A| = s·sign(BA)·Aᵀ; sign(BA) = [[1, -1], [-1, 1]]
    assert torch.allclose(B.grad, torch.tensor([[1.0], [-1.0]]))
    assert torch.allclose(A.grad, torch.tensor([[1.5, -1.5]]))


def test_matches_peft_delta_weight_on_all_linear_modules():
    model = tiny_peft(targets="all-linear")  # includes the non-square k/v (32->16) and MLP modules
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    part = NLoRALoss(0.4)
    terms = part.extra_loss(model, None, None)
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 14  # 7 linear modules x 2 layers
    expected = sum(m.get_delta_weight("default").abs().sum().item() for m in layers)
    assert terms["nlora_l1"].item() == pytest.approx(0.4 * expected, rel=1e-5)
    assert part.diagnostics()["nlora_l1_raw"] == pytest.approx(expected, rel=1e-5)


def test_lambda_zero_reports_but_adds_nothing_and_negative_is_an_error():
    model = tiny_peft()
    part = NLoRALoss(0.0)
    assert part.extra_loss(model, None, None) == {}
    assert part.diagnostics()["nlora_l1_raw"] == 0.0  # B is zero at init: ΔW = 0
    with pytest.raises(CairnError, match="N-LoRA lambda"):
        NLoRALoss(-0.5)


def train(lambda_: float, steps: int = 15) -> tuple[dict, float, float]:
    """A few AdamW steps memorising 4 fixed sequences; returns ΔW stats and first/last task loss."""
    model = tiny_peft(seed=0)
    part = NLoRALoss(lambda_)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.0)
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        out = model(input_ids=ids, labels=ids)
        losses.append(out.loss.item())
        (out.loss + sum(part.extra_loss(model, None, out).values())).backward()
        opt.step()
        opt.zero_grad()
    stats = round_diagnostics([lora_delta_weights(model, "default")], threshold=0.05)["updates"][0]
    return stats, losses[0], losses[-1]


def hoyer(stats: dict) -> float:
    """Hoyer sparsity (0 dense .. 1 one-hot) from the ℓ1 and Frobenius norms of the whole update."""
    n = stats["entries"]
    return (math.sqrt(n) - stats["l1"] / stats["frobenius_norm"]) / (math.sqrt(n) - 1)


def test_nlora_makes_the_update_sparser_than_plain_lora_same_seed():
    plain, p0, p1 = train(0.0)
    sparse, s0, s1 = train(0.01)
    assert p0 == s0  # same seed, same model and data: only the penalty differs
    assert p1 < p0 and s1 < s0  # both still learn the task
    # measured here: sparsity 0.13 -> 0.49, Hoyer 0.25 -> 0.77
    assert sparse["sparsity"] > plain["sparsity"] + 0.15
    assert hoyer(sparse) > hoyer(plain) + 0.2
