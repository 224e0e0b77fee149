"""Round diagnostics (collision, orthogonality, A-overlap, sparsity, nuclear norm) on hand-built updates."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from cairn.errors import CairnError
from cairn.eval.diagnostics import (
    collision_rate,
    lora_delta_weights,
    round_diagnostics,
    significant_mask,
    subspace_overlap,
    update_cosine,
    weight_deltas,
)

T = torch.tensor


def test_disjoint_supports_give_zero_collision_and_zero_cosine():
    x = T([[1.0, 0.0], [0.0, 0.0]])
    y = T([[0.0, 2.0], [0.0, 0.0]])
    assert collision_rate(x, y) == 0.0
    assert update_cosine(x, y) == 0.0
    assert subspace_overlap(x, y, "input") == 0.0  # row 0 reads input 0, the other input 1
    # ... but both write output 0: entry-disjoint updates can share an output direction
    assert subspace_overlap(x, y, "output") == pytest.approx(1.0)


def test_identical_updates_give_one():
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))  # full rank > 1
    assert collision_rate(x, x) == 1.0
    assert update_cosine(x, x) == pytest.approx(1.0)
    assert update_cosine(x, -2 * x) == pytest.approx(1.0)  # the same direction, opposite sign
    assert subspace_overlap(x, x, "input") == pytest.approx(1.0)
    assert subspace_overlap(x, x, "output") == pytest.approx(1.0)
    # the naive ‖XᵀX‖_F / ‖X‖_F² would not be 1 here: that is why it is not the definition
    assert torch.linalg.matrix_norm(x.T @ x) / torch.linalg.matrix_norm(x) ** 2 < 0.99


def test_hand_computed_pair():
    x = T([[1.0, 1.0], [0.0, 0.0]])
    y = T([[1.0, 0.0], [0.0, 1.0]])
    assert collision_rate(x, y) == pytest.approx(1 / 3)  # {(0,0)} of {(0,0), (0,1), (1,1)}
    assert update_cosine(x, y) == pytest.approx(1 / 2)  # <x,y> = 1, ‖x‖ = ‖y‖ = √2
    # ‖X Yᵀ‖ = ‖X‖ = √2, ‖X Xᵀ‖ = ‖diag(2, 0)‖ = 2, ‖Y Yᵀ‖ = ‖I‖ = √2 -> √2 / √(2√2) = 2^(-1/4)
    assert subspace_overlap(x, y, "input") == pytest.approx(2 ** -0.25)
    assert subspace_overlap(x, y, "output") == pytest.approx(2 ** -0.25)
    d = round_diagnostics([{"m": x}, {"m": y}], threshold=0.01, a_factors=None)
    u0, u1 = d["updates"]
    assert u0["sparsity"] == pytest.approx(0.5) and u1["sparsity"] == pytest.approx(0.5)
    assert u0["nuclear_norm"] == pytest.approx(math.sqrt(2))  # rank 1, σ = √2
    assert u1["nuclear_norm"] == pytest.approx(2.0)
    assert u0["l1"] == pytest.approx(2.0) and u1["frobenius_norm"] == pytest.approx(math.sqrt(2))
    (pair,) = d["pairs"]
    assert (pair["i"], pair["j"]) == ("0", "1")
    assert pair["collision_rate"] == pytest.approx(1 / 3)
    assert pair["collision_share"] == pytest.approx(1 / 4)
    assert pair["cosine"] == pytest.approx(0.5)


def test_overlap_of_larger_matrices_uses_either_gram_form_consistently():
    g = torch.Generator().manual_seed(3)
    tall_x, tall_y = torch.randn(9, 4, generator=g), torch.randn(9, 4, generator=g)
    # input overlap of tall matrices (computed via the 4x4 Grams) equals output overlap of their transposes
    assert subspace_overlap(tall_x, tall_y, "input") == pytest.approx(subspace_overlap(tall_x.T, tall_y.T, "output"))
    direct = torch.linalg.matrix_norm(tall_x @ tall_y.T) / math.sqrt(
        torch.linalg.matrix_norm(tall_x @ tall_x.T) * torch.linalg.matrix_norm(tall_y @ tall_y.T))
    assert subspace_overlap(tall_x, tall_y, "input") == pytest.approx(float(direct), rel=1e-6)


def test_thresholds():
    x = T([[0.4, 1.0], [0.0, 0.004]])
    assert significant_mask(x, 0.5, "absolute").tolist() == [[False, True], [False, False]]
    # relative: |x| > 0.01 · max|x| = 0.01
    assert significant_mask(x, 0.01, "relative").tolist() == [[True, True], [False, False]]
    assert not significant_mask(torch.zeros(2, 2)).any()
    with pytest.raises(CairnError, match="threshold"):
        round_diagnostics([{"m": x}], threshold=-1.0)
    with pytest.raises(CairnError, match="mode"):
        round_diagnostics([{"m": x}], mode="percentile")


def test_aggregation_pools_counts_and_averages_overlaps():
    m1 = ({"m": T([[1.0, 1.0], [0.0, 0.0]])}, {"m": T([[1.0, 0.0], [0.0, 1.0]])})  # inter 1, union 3
    m2 = ({"n": T([[1.0, 0.0]])}, {"n": T([[1.0, 0.0]])})  # inter 1, union 1, cosine 1
    only = {"o": T([[5.0]])}  # present in round 0 only: counted in its update, not in the pair
    d = round_diagnostics([{**m1[0], **m2[0], **only}, {**m1[1], **m2[1]}], per_module=True)
    (pair,) = d["pairs"]
    assert pair["modules"] == 2
    assert pair["collision_rate"] == pytest.approx(2 / 4)  # pooled (1+1)/(3+1), not the mean 2/3
    assert pair["collision_share"] == pytest.approx(2 / 6)
    assert pair["cosine"] == pytest.approx((0.5 + 1.0) / 2)  # mean over modules
    assert d["updates"][0]["modules"] == 3 and d["updates"][1]["modules"] == 2
    assert set(d["per_module"]) == {"m", "n", "o"}
    assert d["per_module"]["m"]["pairs"]["0-1"]["collision_rate"] == pytest.approx(1 / 3)
    json.dumps(d, allow_nan=False)


def test_three_rounds_give_three_pairs_with_labels_and_a_overlap():
    e = torch.eye(4)
    a = [{"m": e[:1]}, {"m": e[1:2]}, {"m": e[:1] * 3}]
    # ΔW = B·A with B = [[1],[1]]: rows read the same input as A
    updates = [{"m": torch.ones(2, 1) @ ai["m"]} for ai in a]
    d = round_diagnostics(updates, a_factors=a, labels=["fomc", "meeting", "py150"])
    pairs = {(p["i"], p["j"]): p for p in d["pairs"]}
    assert set(pairs) == {("fomc", "meeting"), ("fomc", "py150"), ("meeting", "py150")}
    assert pairs[("fomc", "meeting")]["a_overlap"] == 0.0
    assert pairs[("fomc", "meeting")]["a_overlap_l1"] == 0.0
    assert pairs[("fomc", "meeting")]["collision_rate"] == 0.0
    assert pairs[("fomc", "py150")]["a_overlap"] == pytest.approx(1.0)
    assert pairs[("fomc", "py150")]["a_overlap_l1"] == pytest.approx(3.0)  # |[1 0 0 0]·[3 0 0 0]ᵀ|
    assert pairs[("fomc", "py150")]["collision_rate"] == 1.0
    json.dumps(d, allow_nan=False)


def test_shape_mismatch_and_bad_lengths_are_cairn_errors():
    with pytest.raises(CairnError, match="same shape"):
        round_diagnostics([{"m": torch.ones(2, 3)}, {"m": torch.ones(3, 2)}])
    with pytest.raises(CairnError, match="labels"):
        round_diagnostics([{"m": torch.ones(2, 2)}], labels=["a", "b"])


def tiny_llama_peft():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                             lora_dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def test_lora_delta_weights_match_peft_and_merge():
    model = tiny_llama_peft()
    deltas = lora_delta_weights(model, "default")
    assert "model.layers.0.self_attn.k_proj" in deltas
    assert deltas["model.layers.0.self_attn.k_proj"].shape == (16, 32)  # (d_out, d_in) under GQA
    before = {n: p.detach().clone() for n, p in model.base_model.model.named_parameters() if "lora_" not in n}
    merged = model.merge_and_unload()
    after = dict(merged.named_parameters())
    for module, dw in deltas.items():
        key = module + ".weight"
        merged_delta = after[key].detach() - before[key.replace(".weight", ".base_layer.weight")]
        assert torch.allclose(merged_delta, dw, atol=1e-6), module


def test_lora_delta_weights_fan_in_fan_out_layout():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    model = get_peft_model(gpt2, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                            lora_dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    (name,) = lora_delta_weights(model, "default")
    out_in = lora_delta_weights(model, "default")[name]
    weight = lora_delta_weights(model, "default", layout="weight")[name]
    assert name == "transformer.h.0.attn.c_attn"
    assert out_in.shape == (48, 16)  # d_out = 3·n_embd, d_in = n_embd
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert weight.shape == layer.base_layer.weight.shape == (16, 48)  # Conv1D stores (d_in, d_out)
    assert torch.allclose(weight, layer.get_delta_weight("default"))
    assert torch.equal(weight, out_in.T)


def test_weight_deltas_for_full_fine_tuning():
    before = {"a.weight": torch.zeros(2, 2), "a.bias": torch.zeros(2)}
    after = {"a.weight": torch.ones(2, 2), "a.bias": torch.ones(2)}
    assert set(weight_deltas(before, after)) == {"a.weight"}  # matrices only by default
    assert torch.equal(weight_deltas(before, after)["a.weight"], torch.ones(2, 2))
    with pytest.raises(CairnError, match="missing"):
        weight_deltas(before, after, names=["b.weight"])


def test_lora_nuclear_norm_through_the_core_equals_full_svd():
    import torch

    from cairn.eval.round_updates import lora_nuclear_norm

    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(40, 3, generator=g), torch.randn(3, 24, generator=g)
    full = float(torch.linalg.svdvals(2.0 * B @ A).sum())
    assert abs(lora_nuclear_norm(B, A, 2.0) - full) < 1e-4 * full


def test_cached_grams_and_float32_agree_with_the_pairwise_float64_definition():
    # Tall, wide and square modules, four rounds: the per-update Gram cache must give exactly the
    # values of subspace_overlap pair by pair, and float32 products the same to 1e-5 relative.
    g = torch.Generator().manual_seed(0)
    shapes = {"tall": (48, 16), "wide": (16, 40), "square": (24, 24)}
    updates = [{m: torch.randn(*s, generator=g) * (k + 1) for m, s in shapes.items()} for k in range(4)]
    exact = round_diagnostics(updates, per_module=True)
    for pair in exact["pairs"]:
        i, j = int(pair["i"]), int(pair["j"])
        for side in ("input", "output"):
            want = sum(subspace_overlap(updates[i][m], updates[j][m], side) for m in shapes) / len(shapes)
            assert pair[f"{side}_overlap"] == pytest.approx(want, rel=1e-12)
    fast = round_diagnostics(updates, per_module=True, precision="float32")
    for a, b in zip(exact["pairs"], fast["pairs"]):
        for key in ("cosine", "input_overlap", "output_overlap", "collision_rate"):
            assert b[key] == pytest.approx(a[key], rel=1e-5)
    for a, b in zip(exact["updates"], fast["updates"]):
        assert b["frobenius_norm"] == pytest.approx(a["frobenius_norm"], rel=1e-6)
        assert b["l1"] == pytest.approx(a["l1"], rel=1e-6)
    with pytest.raises(CairnError, match="precision"):
        round_diagnostics(updates, precision="float16")
