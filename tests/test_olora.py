"""O-LoRA (arXiv 2310.14152): the overlap penalty, the A store, and the method part in both modes."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from cairn.errors import CairnError
from cairn.methods.lambdas import check_lambda, lambda_for_round
from cairn.methods.olora import (
    OLoRALoss,
    collect_lora_A,
    l2_penalty,
    load_A_store,
    olora_overlap_penalty,
    save_A_store,
)

TARGETS = ["q_proj", "v_proj"]
EXPECTED_MODULES = {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in TARGETS}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def lora_cfg(r: int = 4) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (2, 12), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.fixture(autouse=True)
def one_thread():
    # Several test processes share two cores: one intra-op thread avoids oversubscription (~20x here).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stack_model() -> torch.nn.Module:
    """A PeftModel with a frozen earlier adapter 'r0' (non-zero B) and a trainable new one 'r1'."""
    model = get_peft_model(tiny_llama(), lora_cfg(), adapter_name="r0")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B.r0" in n:
                p.normal_(0, 0.1)  # as if trained: the earlier round really changes the output
    torch.manual_seed(5)
    model.add_adapter("r1", lora_cfg())
    model.base_model.set_adapter(["r0", "r1"])  # both adapters active in the forward pass
    model.set_requires_grad("r0", requires_grad=False)
    return model


# ---- the pure penalty ------------------------------------------------------------------------

def test_penalty_hand_values():
    prev = [torch.tensor([[1.0, -1.0, 0.0]])]
    new = torch.tensor([[2.0, 3.0, 0.0], [0.0, 0.0, 5.0]])
    # A_prev·A_newᵀ = [[2 - 3, 0]] -> L1 = 1
    assert olora_overlap_penalty(prev, new).item() == pytest.approx(1.0)
    # summed over earlier rounds: a second round [[0, 0, 1], [1, 0, 0]] gives [[0, 5], [2, 0]] -> 7
    prev.append(torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    assert olora_overlap_penalty(prev, new).item() == pytest.approx(8.0)


def test_penalty_zero_for_orthogonal_and_positive_otherwise():
    eye = torch.eye(6)
    prev = [eye[:2], eye[2:3]]
    assert olora_overlap_penalty(prev, eye[3:6]).item() == 0.0
    assert olora_overlap_penalty(prev, eye[1:4]).item() == pytest.approx(2.0)  # rows e1 and e2 overlap
    assert olora_overlap_penalty([], eye[3:6]).item() == 0.0  # round 0: nothing to be orthogonal to


def test_penalty_gradient_reaches_only_the_new_A():
    prev = torch.randn(3, 8, requires_grad=True)
    new = torch.randn(2, 8, requires_grad=True)
    olora_overlap_penalty([prev], new).backward()
    assert prev.grad is None
    expected = torch.sign(prev.detach() @ new.detach().T).T @ prev.detach()  # d/dnew Σ|P newᵀ|
    assert torch.allclose(new.grad, expected)


def test_penalty_shape_mismatch_is_a_cairn_error():
    with pytest.raises(CairnError, match="same d_in"):
        olora_overlap_penalty([torch.zeros(2, 5)], torch.zeros(2, 6))


def test_l2_penalty_is_unsquared_norm_per_tensor():
    params = [torch.tensor([3.0, 4.0]), torch.tensor([[5.0], [12.0]])]
    assert l2_penalty(params).item() == pytest.approx(5.0 + 13.0)


# ---- lambdas ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.5", True, None])
def test_bad_lambda_is_a_cairn_error(bad):
    with pytest.raises(CairnError, match="lambda"):
        check_lambda(bad, "lambda")
    with pytest.raises(CairnError):
        OLoRALoss({}, lambda1=bad)


def test_lambda_per_round():
    assert lambda_for_round(0.5, 3) == 0.5
    assert lambda_for_round([0.5, 5, 0], 1) == 5.0
    with pytest.raises(CairnError, match="round 3"):
        lambda_for_round([0.5, 5], 3)
    with pytest.raises(CairnError, match=r"lambda1\[1\]"):
        lambda_for_round([0.5, -1], 1, "lambda1")


# ---- collecting A's and the store ------------------------------------------------------------

def test_collect_lora_A_names_match_across_merge_and_rewrap():
    model = get_peft_model(tiny_llama(), lora_cfg())
    first = collect_lora_A(model, "default")
    assert set(first) == EXPECTED_MODULES
    assert all(a.shape == (4, 32) and not a.requires_grad and a.device.type == "cpu" for a in first.values())
    assert set(collect_lora_A(model.base_model, "default")) == EXPECTED_MODULES  # the LoraModel too
    # the copies are frozen snapshots, not views of the live parameters
    live = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    snapshot = first["model.layers.0.self_attn.q_proj"].clone()
    with torch.no_grad():
        live.add_(1.0)
    assert torch.equal(first["model.layers.0.self_attn.q_proj"], snapshot)
    merged = model.merge_and_unload()
    again = collect_lora_A(get_peft_model(merged, lora_cfg()), "default")
    assert set(again) == set(first)


def test_collect_unknown_adapter_lists_present_ones():
    model = get_peft_model(tiny_llama(), lora_cfg(), adapter_name="round0")
    with pytest.raises(CairnError, match="round0"):
        collect_lora_A(model, "default")


def test_A_store_round_trip(tmp_path):
    store = {0: {"model.layers.0.self_attn.q_proj": torch.randn(4, 32)},
             2: {"model.layers.0.self_attn.q_proj": torch.randn(8, 32),
                 "model.layers.1.self_attn.v_proj": torch.randn(8, 32)}}
    path = tmp_path / "olora_A.safetensors"
    save_A_store(path, store)
    back = load_A_store(path)
    assert list(back) == [0, 2]
    for rnd in store:
        assert set(back[rnd]) == set(store[rnd])
        for m in store[rnd]:
            assert torch.equal(back[rnd][m], store[rnd][m])
    assert not list(tmp_path.glob(".tmp-*"))


def test_A_store_bad_inputs(tmp_path):
    with pytest.raises(CairnError, match="does not exist"):
        load_A_store(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CairnError, match="cannot read"):
        load_A_store(junk)
    with pytest.raises(CairnError, match="round keys"):
        save_A_store(tmp_path / "x.safetensors", {"0": {"m": torch.zeros(2, 2)}})


# ---- the method part -------------------------------------------------------------------------

def reference_code_orth(model, old: str, new: str) -> torch.Tensor:
    """The O-LoRA reference code's loop (matching names by the part before 'lora_A'), for comparison."""
    params = dict(model.named_parameters())
    total = torch.zeros(())
    for name, p in params.items():
        if f"lora_A.{old}." in name:
            total = total + torch.abs(torch.mm(p, params[name.replace(f".{old}.", f".{new}.")].T)).sum()
    return total


def test_stack_mode_matches_reference_code_and_reports_terms():
    model = stack_model()
    store = {0: collect_lora_A(model, "r0")}
    part = OLoRALoss(store, lambda1=0.5, lambda2=0.1, adapter_name="r1")
    b = batch()
    out = model(**b)
    terms = part.extra_loss(model, b, out)
    assert set(terms) == {"olora_orth", "olora_l2"}
    expected = reference_code_orth(model, "r0", "r1")
    assert expected.item() > 0
    assert terms["olora_orth"].item() == pytest.approx(0.5 * expected.item(), rel=1e-5)
    l2 = sum(torch.linalg.vector_norm(p).item() for n, p in model.named_parameters() if ".r1." in n)
    assert terms["olora_l2"].item() == pytest.approx(0.1 * l2, rel=1e-5)
    d = part.diagnostics()
    assert d["olora_orth_raw"] == pytest.approx(expected.item(), rel=1e-5)
    assert d["olora_prev_rounds"] == 1
    assert d["olora_penalty_to_task_ratio"] == pytest.approx(
        (terms["olora_orth"] + terms["olora_l2"]).item() / out.loss.item(), rel=1e-5)


def test_zero_lambda_term_is_skipped_but_still_reported():
    model = stack_model()
    part = OLoRALoss({0: collect_lora_A(model, "r0")}, lambda1=0.0, lambda2=0.0, adapter_name="r1")
    terms = part.extra_loss(model, batch(), model(**batch()))
    assert terms == {}
    assert part.diagnostics()["olora_orth_raw"] > 0
    assert part.diagnostics()["olora_l2_raw"] > 0


def test_penalty_is_zero_for_orthogonal_adapters_in_a_model():
    model = stack_model()
    with torch.no_grad():  # r0 uses input directions e0..e3, r1 uses e4..e7: exactly orthogonal
        for n, p in model.named_parameters():
            if "lora_A.r0" in n:
                p.copy_(torch.eye(32)[:4] * 0.3)
            elif "lora_A.r1" in n:
                p.copy_(torch.eye(32)[4:8] * -0.7)
    part = OLoRALoss({0: collect_lora_A(model, "r0")}, lambda1=5.0, adapter_name="r1")
    assert part.extra_loss(model, None, None)["olora_orth"].item() == 0.0


def test_round0_penalty_is_zero_with_a_reason():
    model = get_peft_model(tiny_llama(), lora_cfg())
    part = OLoRALoss({}, lambda1=0.5)
    terms = part.extra_loss(model, None, None)
    assert terms["olora_orth"].item() == 0.0
    assert part.diagnostics()["olora_prev_rounds"] == 0


def test_gradient_flows_only_into_new_adapter_and_earlier_stays_bit_identical():
    model = stack_model()
    r0_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".r0." in n}
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    part = OLoRALoss({0: collect_lora_A(model, "r0")}, lambda1=0.5, lambda2=0.01, adapter_name="r1")

    # even with the earlier adapter left trainable by mistake, the penalty does not reach it
    model.set_requires_grad("r0", requires_grad=True)
    sum(part.extra_loss(model, None, None).values()).backward()
    for n, p in model.named_parameters():
        if ".r0." in n:
            assert p.grad is None, n
    new_A = [p for n, p in model.named_parameters() if "lora_A.r1" in n]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in new_A)
    model.zero_grad(set_to_none=True)
    model.set_requires_grad("r0", requires_grad=False)

    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n in dict(model.named_parameters()) if ".r1." in n}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    r1_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".r1." in n}
    for step in range(3):
        b = batch(step)
        out = model(**b)
        loss = out.loss + sum(part.extra_loss(model, b, out).values())
        loss.backward()
        opt.step()
        opt.zero_grad()
    params = dict(model.named_parameters())
    for n, before in {**r0_before, **base_before}.items():
        assert torch.equal(params[n], before), n
    assert any(not torch.equal(params[n], before) for n, before in r1_before.items())


def test_merge_mode_penalty_uses_stored_As(tmp_path):
    round0 = get_peft_model(tiny_llama(), lora_cfg())
    with torch.no_grad():
        for n, p in round0.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    save_A_store(tmp_path / "A.safetensors", {0: collect_lora_A(round0, "default")})
    stored = load_A_store(tmp_path / "A.safetensors")
    merged = round0.merge_and_unload()
    torch.manual_seed(7)
    round1 = get_peft_model(merged, lora_cfg())
    part = OLoRALoss(stored, lambda1=1.0, adapter_name="default")
    got = part.extra_loss(round1, None, None)["olora_orth"].item()
    new = collect_lora_A(round1, "default")
    expected = sum((stored[0][m] @ new[m].T).abs().sum().item() for m in new)
    assert got == pytest.approx(expected, rel=1e-5)
    # a few penalty-only steps shrink the overlap: the term really steers the new A's
    opt = torch.optim.SGD([p for p in round1.parameters() if p.requires_grad], lr=0.05)
    for _ in range(20):
        part.extra_loss(round1, None, None)["olora_orth"].backward()
        opt.step()
        opt.zero_grad()
    assert part.extra_loss(round1, None, None)["olora_orth"].item() < 0.5 * got


def test_module_mismatch_is_a_cairn_error():
    model = get_peft_model(tiny_llama(), lora_cfg())
    part = OLoRALoss({0: {"model.layers.7.self_attn.q_proj": torch.zeros(4, 32)}}, lambda1=0.5)
    with pytest.raises(CairnError, match="target_modules"):
        part.extra_loss(model, None, None)
    part = OLoRALoss({0: {"model.layers.0.self_attn.q_proj": torch.zeros(4, 31)}}, lambda1=0.5)
    with pytest.raises(CairnError, match="d_in"):
        part.extra_loss(model, None, None)


def test_scale_warning_when_penalty_dwarfs_task_loss(caplog):
    model = stack_model()
    part = OLoRALoss({0: collect_lora_A(model, "r0")}, lambda1=1e4, adapter_name="r1")
    b = batch()
    part.extra_loss(model, b, model(**b))
    with caplog.at_level(logging.WARNING, logger="cairn.methods.olora"):
        assert part.diagnostics()["olora_penalty_to_task_ratio"] > 10
        part.diagnostics()
    assert sum("lambda1" in r.getMessage() for r in caplog.records) == 1  # warned once, not every step
