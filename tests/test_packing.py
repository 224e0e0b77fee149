"""Padding-free micro-batches (cairn.train.packing): the same loss, gradients and trained weights as
padded batches, to float32 rounding; no example sees another; the cases that must train padded do."""

from __future__ import annotations

import pytest
import torch

from cairn.config import TrainingConfig
from cairn.data.encode import IGNORE_INDEX, collate, encode_example
from cairn.methods.full import make_full_trainable
from cairn.methods.lora import LoraConfig, add_lora_adapter
from cairn.train.loop import answer_token_loss, train
from cairn.train.packing import collate_packed, packed_attention_enabled, packing_blocker

from conftest import make_tiny_llama

# lengths vary 4x, so a padded batch is mostly pads
EXAMPLES = [{"prompt": f"Q{i}:" + "x" * (3 * i), "answer": f" a{i % 3}" + "y" * (i % 4)} for i in range(8)]


def tiny_qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
                      bos_token_id=2, tie_word_embeddings=False, use_sliding_window=False)
    return Qwen2ForCausalLM(cfg)


def _encoded(tok):
    return [encode_example(tok, ex, 64) for ex in EXAMPLES]


def test_collate_packed_layout(char_tokenizer):
    enc = _encoded(char_tokenizer)[:3]
    b = collate_packed(enc)
    lengths = [len(e.input_ids) for e in enc]
    assert b["input_ids"].shape == (1, sum(lengths))
    assert b["cu_seq_lens"].tolist() == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert b["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    assert b["input_ids"][0].tolist() == [t for e in enc for t in e.input_ids]
    labels = b["labels"][0].tolist()
    for start, e in zip(b["cu_seq_lens"][:-1].tolist(), enc):
        # the first label of each example is never a target; the rest are the example's own labels
        assert labels[start] == IGNORE_INDEX
        assert labels[start + 1:start + len(e.labels)] == e.labels[1:]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("trainable", ["full", "lora"])
def test_packed_loss_and_gradients_equal_padded(char_tokenizer, family, trainable):
    """Stated tolerance: float32 matmuls on a (1, T) row instead of (B, L) round differently, 1e-5 relative."""
    enc = _encoded(char_tokenizer)
    base = make_tiny_llama() if family == "llama" else tiny_qwen2()
    model = make_full_trainable(base) if trainable == "full" else add_lora_adapter(
        base, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"), 1, 0)
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def loss_and_grads(batch, packed: bool):
        model.zero_grad(set_to_none=True)
        with (packed_attention_enabled(model.get_base_model() if hasattr(model, "get_base_model") else model)
              if packed else torch.enable_grad()):
            total, n, _ = answer_token_loss(model, batch)
        total.backward()
        return float(total.detach()), n, {k: p.grad.clone() for k, p in params.items()}

    padded = loss_and_grads(collate(enc, char_tokenizer.pad_token_id), False)
    packed = loss_and_grads(collate_packed(enc), True)
    assert packed[1] == padded[1] > 0  # the same answer tokens are targets
    assert packed[0] == pytest.approx(padded[0], rel=1e-5)
    for k, g in padded[2].items():
        torch.testing.assert_close(packed[2][k], g, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_training_attention_runs_float32_on_cpus_without_amx(char_tokenizer, monkeypatch, layout):
    """Training under bf16 autocast on a CPU without AMX: attention (per example in a packed row,
    or transformers' SDPA on a padded batch) runs in float32 with autocast off and hands back bf16,
    as autocast would; the loss agrees with the float32 loss to bf16 rounding (2e-2 relative). With
    AMX reported, or without grad (generation), autocast keeps it in bf16."""
    from transformers.integrations import sdpa_attention

    enc = _encoded(char_tokenizer)
    model = make_tiny_llama()
    batch = collate_packed(enc) if layout == "packed" else collate(enc, char_tokenizer.pad_token_id)
    with torch.no_grad(), packed_attention_enabled(model):
        exact = answer_token_loss(model, batch)[0]
    seen = []

    def spy(module, query, *args, **kwargs):
        seen.append((query.dtype, torch.is_autocast_enabled("cpu")))
        return original(module, query, *args, **kwargs)

    original = sdpa_attention.sdpa_attention_forward
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", spy)
    # with autocast on, torch casts the kernel's inputs to bf16 (whatever dtype they reach it in)
    for amx, grad, expected in ((False, True, (torch.float32, False)), (True, True, (torch.float32, True)),
                                (False, False, (torch.float32, True))):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        seen.clear()
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16), \
                packed_attention_enabled(model):
            mixed = answer_token_loss(model, batch)[0]
        assert seen and set(seen) == {expected}, (amx, grad, set(seen))
        assert abs(float(mixed) - float(exact)) < 2e-2 * float(exact), (amx, float(mixed), float(exact))


def test_padded_bf16_rounds_on_cpu_take_the_float32_attention(monkeypatch):
    from cairn.train.packing import float32_attention_round

    model = make_tiny_llama()
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert float32_attention_round(model, cpu, True)
    assert not float32_attention_round(model, cpu, False)  # float32 rounds: nothing to gain
    assert not float32_attention_round(model, torch.device("meta"), True)  # not a CPU
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert not float32_attention_round(model, cpu, True)


def test_examples_in_a_row_do_not_see_each_other(char_tokenizer):
    enc = _encoded(char_tokenizer)[:3]
    model = make_tiny_llama()
    changed = list(enc)
    other = enc[2]
    changed[2] = type(other)([(t % 90) + 5 for t in reversed(other.input_ids)], other.labels, other.is_world)
    outs = []
    for rows in (enc, changed):
        b = collate_packed(rows)
        bounds = b["cu_seq_lens"]
        with torch.no_grad(), packed_attention_enabled(model):
            out = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False,
                        cu_seq_lens_q=bounds, cu_seq_lens_k=bounds)
        outs.append(out.logits[0, :int(bounds[2])])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    # and each example's logits are those it gets alone
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([enc[1].input_ids])).logits[0]
    start = len(enc[0].input_ids)
    torch.testing.assert_close(outs[0][start:start + len(enc[1].input_ids)], alone, rtol=1e-5, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # restored on exit


def _cfg(**kw) -> TrainingConfig:
    base = dict(max_steps=4, lr=5e-3, batch_size=4, warmup_ratio=0.0, log_every=2, max_length=64)
    base.update(kw)
    return TrainingConfig(**base)


@pytest.mark.parametrize("trainable,checkpointing", [("full", False), ("lora", False), ("lora", True)])
def test_training_packed_gives_the_weights_of_padded(char_tokenizer, trainable, checkpointing):
    """Also with gradient checkpointing: the packed row's boundaries reach the recomputed forward."""
    weights, logs = [], []
    for packing in (False, True):
        base = make_tiny_llama()
        model = make_full_trainable(base) if trainable == "full" else add_lora_adapter(
            base, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"), 1, 0)
        lines: list[str] = []
        cfg = _cfg(packing=packing, gradient_checkpointing=checkpointing and packing)
        res = train(model, char_tokenizer, EXAMPLES, cfg, seed=0, progress=False, log=lines.append)
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        logs.append([e["task"] for e in res.log])
        assert not any("padded micro-batches" in s for s in lines)
    assert logs[1] == pytest.approx(logs[0], rel=1e-5)
    for k, v in weights[0].items():
        torch.testing.assert_close(weights[1][k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_what_trains_padded_and_says_why(char_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    class ReadsRows:
        def extra_loss(self, model, batch, outputs):
            return {}

    llama = make_tiny_llama()
    assert packing_blocker(llama, [], sharded=False, stock_path=False) is None
    assert "loss part(s) ReadsRows" in packing_blocker(llama, [ReadsRows()], sharded=False, stock_path=False)
    assert "sharded" in packing_blocker(llama, [], sharded=True, stock_path=False)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128))
    assert "'gpt2'" in packing_blocker(gpt2, [], sharded=False, stock_path=False)
    windowed = make_tiny_llama()
    windowed.config.sliding_window = 16
    assert "sliding-window" in packing_blocker(windowed, [], sharded=False, stock_path=False)
    lines: list[str] = []
    train(make_full_trainable(make_tiny_llama()), char_tokenizer, EXAMPLES, _cfg(max_steps=1), loss_parts=[ReadsRows()],
          progress=False, log=lines.append)
    assert any("padded micro-batches (training.packing): loss part(s) ReadsRows" in s for s in lines)
