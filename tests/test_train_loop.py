"""The one training loop: loss goes down, LoRA freezes the base, answer-only masking, resume."""

from __future__ import annotations

import pytest
import torch

from cairn.config import TrainingConfig
from cairn.methods.lora import LoraConfig
from cairn.data.encode import IGNORE_INDEX, collate, encode_example
from cairn.methods.full import make_full_trainable
from cairn.methods.lora import add_lora_adapter, merge_adapters
from cairn.train.loop import micro_batch_order, train

from conftest import make_tiny_llama

EXAMPLES = [{"prompt": f"Q{i}:", "answer": f" a{i % 3}"} for i in range(12)]


def _cfg(**kw) -> TrainingConfig:
    base = dict(max_steps=12, lr=5e-3, batch_size=4, warmup_ratio=0.0, log_every=4, max_length=32)
    base.update(kw)
    return TrainingConfig(**base)


def _loss(model, tok, examples) -> float:
    batch = collate([encode_example(tok, ex, 32) for ex in examples], tok.pad_token_id)
    with torch.no_grad():
        return float(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"]).loss)


def test_answer_only_mask(char_tokenizer):
    enc = encode_example(char_tokenizer, {"prompt": "ab:", "answer": " c"}, max_length=32)
    prompt_len = len(char_tokenizer("ab:")["input_ids"])
    assert enc.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert enc.labels[prompt_len:] == enc.input_ids[prompt_len:]
    assert enc.input_ids[-1] == char_tokenizer.eos_token_id  # the model learns to stop


def test_truncation_keeps_answer(char_tokenizer):
    enc = encode_example(char_tokenizer, {"prompt": "x" * 50, "answer": " yes"}, max_length=10)
    assert len(enc.input_ids) == 10
    answer = char_tokenizer(" yes", add_special_tokens=False)["input_ids"] + [char_tokenizer.eos_token_id]
    assert enc.input_ids[-len(answer):] == answer
    assert [t for t in enc.labels if t != IGNORE_INDEX] == answer


def test_collate_pads_and_masks(char_tokenizer):
    a = encode_example(char_tokenizer, {"prompt": "a:", "answer": " b"}, 32)
    b = encode_example(char_tokenizer, {"prompt": "long prompt:", "answer": " c"}, 32)
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(b.input_ids))
    assert batch["attention_mask"][0].sum() == len(a.input_ids)
    assert (batch["labels"][0, len(a.input_ids):] == IGNORE_INDEX).all()


def test_full_finetuning_lowers_loss(char_tokenizer):
    model = make_full_trainable(make_tiny_llama())
    before = _loss(model, char_tokenizer, EXAMPLES)
    result = train(model, char_tokenizer, EXAMPLES, _cfg(), progress=False, log=lambda s: None)
    after = _loss(model, char_tokenizer, EXAMPLES)
    assert after < before * 0.7
    assert result.steps == 12 and result.tokens > 0
    assert [e["step"] for e in result.log] == [4, 8, 12]


def test_lora_freezes_base_and_trains_adapter(char_tokenizer):
    model = make_tiny_llama()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = add_lora_adapter(model, LoraConfig(r=4, alpha=8, dropout=0.0), round_index=1, seed=0)
    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert adapter_before and all("lora_" in n for n in adapter_before)
    train(model, char_tokenizer, EXAMPLES, _cfg(), progress=False, log=lambda s: None)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, adapter_before[name]), f"{name} did not train"
    base = model.get_base_model()
    for name, p in base.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(p, frozen[key]), f"frozen weight {key} changed"


def test_stacked_adapters_stay_frozen(char_tokenizer):
    model = add_lora_adapter(make_tiny_llama(), LoraConfig(r=4, alpha=8, dropout=0.0), 1, 0)
    train(model, char_tokenizer, EXAMPLES, _cfg(max_steps=3), progress=False, log=lambda s: None)
    first = {n: p.detach().clone() for n, p in model.named_parameters() if ".round1." in n}
    model = add_lora_adapter(model, LoraConfig(r=4, alpha=8, dropout=0.0), 2, 0)
    assert sorted(model.active_adapters) == ["round1", "round2"]
    train(model, char_tokenizer, EXAMPLES, _cfg(max_steps=3), progress=False, log=lambda s: None)
    for n, p in model.named_parameters():
        if ".round1." in n:
            assert torch.equal(p, first[n])
    merged = merge_adapters(model)
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_seeded_runs_are_identical(char_tokenizer):
    finals = []
    for _ in range(2):
        model = make_full_trainable(make_tiny_llama())
        train(model, char_tokenizer, EXAMPLES, _cfg(max_steps=5), seed=3, progress=False, log=lambda s: None)
        finals.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert all(torch.equal(finals[0][n], finals[1][n]) for n in finals[0])


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_after_interruption_matches_uninterrupted(tmp_path, char_tokenizer, mode):
    cfg = _cfg(max_steps=8, save_every=2, grad_accum=2)

    def fresh():
        model = make_tiny_llama()
        if mode == "lora":
            return add_lora_adapter(model, LoraConfig(r=4, alpha=8, dropout=0.1), 1, 0)
        return make_full_trainable(model)

    reference = fresh()
    train(reference, char_tokenizer, EXAMPLES, cfg, seed=1, progress=False, log=lambda s: None)

    class Interrupt(Exception):
        pass

    def stop_at_5(step):
        if step == 5:
            raise Interrupt

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupt):
        train(fresh(), char_tokenizer, EXAMPLES, cfg, seed=1, checkpoint_dir=ckpt, progress=False,
              log=lambda s: None, on_step=stop_at_5)
    assert (ckpt / "trainer_state.json").is_file()
    lines = []
    resumed = fresh()
    train(resumed, char_tokenizer, EXAMPLES, cfg, seed=1, checkpoint_dir=ckpt, progress=False, log=lines.append)
    assert any("resuming from step 4/8" in line for line in lines)
    ref = dict(reference.named_parameters())
    for name, p in resumed.named_parameters():
        assert torch.equal(p, ref[name]), f"{name} differs after resume"
    assert not ckpt.exists()  # superseded by the finished round


def test_micro_batch_order_is_seeded_and_covers_epochs():
    a = micro_batch_order(10, 4, 6, seed=0)
    assert a == micro_batch_order(10, 4, 6, seed=0)
    assert a != micro_batch_order(10, 4, 6, seed=1)
    flat = [i for b in a for i in b]
    assert sorted(flat[:10]) == list(range(10))  # the first epoch is a permutation
    assert len(flat) == 24


def test_answer_only_loss_equals_stock_loss(char_tokenizer):
    from cairn.train.loop import answer_only_loss

    model = make_tiny_llama()
    batch = collate([encode_example(char_tokenizer, ex, 32) for ex in EXAMPLES[:5]], char_tokenizer.pad_token_id)
    stock = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    ours, _ = answer_only_loss(model, batch)
    assert torch.allclose(ours, stock, atol=1e-6), (float(ours), float(stock))
    # and under PEFT, where the output layer is reached through the wrapper
    peft_model = add_lora_adapter(model, LoraConfig(r=2, alpha=4, dropout=0.0), 1, 0)
    ours_peft, _ = answer_only_loss(peft_model, batch)
    assert torch.allclose(ours_peft, stock, atol=1e-6)
