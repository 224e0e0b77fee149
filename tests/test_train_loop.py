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


class _Interrupt(Exception):
    pass


def _train_until_interrupted(model, tokenizer, cfg, ckpt, step: int) -> None:
    """Train with checkpoints into ``ckpt`` and stop as if killed when ``step`` begins."""
    def stop(at):
        if at == step:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(model, tokenizer, EXAMPLES, cfg, seed=1, checkpoint_dir=ckpt, progress=False, log=lambda s: None,
              on_step=stop)


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

    ckpt = tmp_path / "ckpt"
    _train_until_interrupted(fresh(), char_tokenizer, cfg, ckpt, step=5)
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


def test_output_layer_bypass_is_exact_and_undone(char_tokenizer):
    """The model runs with its output layer bypassed (it returns the final hidden states) and the
    layer is applied to the answer positions only: the loss equals the stock loss for a tied head
    and for a model that scales its logits after the layer (Granite), to float32 rounding (1e-6);
    the layer's own forward is back afterwards, also when the forward raises."""
    from transformers import GraniteConfig, GraniteForCausalLM

    from cairn.train.loop import answer_only_loss

    batch = collate([encode_example(char_tokenizer, ex, 32) for ex in EXAMPLES[:5]], char_tokenizer.pad_token_id)
    torch.manual_seed(0)
    granite = GraniteForCausalLM(GraniteConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               logits_scaling=4.0, pad_token_id=0, eos_token_id=1, bos_token_id=2))
    tied = make_tiny_llama()
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    for model in (granite, tied):
        model.eval()
        stock = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        ours, outputs = answer_only_loss(model, batch)
        assert torch.allclose(ours, stock, atol=1e-6), (type(model).__name__, float(ours), float(stock))
        assert outputs.logits is None  # the hidden states are not handed out as logits
        assert "forward" not in model.lm_head.__dict__
    broken = dict(batch, input_ids=batch["input_ids"] + 1000)  # out of the vocabulary: the forward raises
    with pytest.raises(IndexError):
        answer_only_loss(tied, broken)
    assert "forward" not in tied.lm_head.__dict__


def test_output_layer_under_bf16_autocast(char_tokenizer):
    """A frozen tied head gets a bf16 copy for the round (autocast's values: 1e-3 of plain autocast,
    dropped on exit); a trainable head on CPU runs in float32 (1e-2 of the float32 loss, closer
    than autocast's bf16 logits need to be)."""
    from cairn.train.loop import answer_only_loss
    from cairn.train.setup import _BF16_HEADS, frozen_linears_in_bf16

    batch = collate([encode_example(char_tokenizer, ex, 32) for ex in EXAMPLES[:6]], char_tokenizer.pad_token_id)
    base = make_tiny_llama()
    base.config.tie_word_embeddings = True
    base.tie_weights()
    with torch.no_grad():
        exact, _ = answer_only_loss(base, batch)
    lora = add_lora_adapter(base, LoraConfig(r=4, alpha=8, dropout=0.0), 1, 0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain, _ = answer_only_loss(lora, batch)
        with frozen_linears_in_bf16(lora):
            assert len(_BF16_HEADS) == 1
            held, _ = answer_only_loss(lora, batch)
    assert len(_BF16_HEADS) == 0
    assert abs(float(plain) - float(held)) < 1e-3, (float(plain), float(held))
    full = make_full_trainable(make_tiny_llama())
    with torch.no_grad():
        exact, _ = answer_only_loss(full, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, _ = answer_only_loss(full, batch)
        mixed.backward()
    assert mixed.dtype == torch.float32 and full.lm_head.weight.grad.dtype == torch.float32
    assert abs(float(mixed) - float(exact)) < 1e-2 * float(exact)


def test_adapter_input_casts_off_is_exact_under_autocast(char_tokenizer):
    """Skipping PEFT's cast of bf16 activations to the float32 adapter dtype is an exact round trip
    under autocast: the same loss bit for bit, and PEFT's switch is restored afterwards."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from cairn.train.loop import answer_only_loss
    from cairn.train.setup import adapter_input_casts_off

    model = add_lora_adapter(make_tiny_llama(), LoraConfig(r=4, alpha=8, dropout=0.0), 1, 0)
    batch = collate([encode_example(char_tokenizer, ex, 32) for ex in EXAMPLES[:6]], char_tokenizer.pad_token_id)
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cast, _ = answer_only_loss(model, batch)
        with adapter_input_casts_off(model):
            assert not any(m.cast_input_dtype_enabled for m in layers)
            skipped, _ = answer_only_loss(model, batch)
    assert all(m.cast_input_dtype_enabled for m in layers)
    assert torch.equal(cast, skipped)


def test_log_fn_gets_every_term_lr_and_throughput(char_tokenizer):
    seen = []
    model = make_full_trainable(make_tiny_llama())
    train(model, char_tokenizer, EXAMPLES, _cfg(max_steps=4, log_every=2), progress=False, log=lambda s: None,
          log_fn=lambda metrics, step: seen.append((step, metrics)))
    assert [s for s, _ in seen] == [2, 4]
    for _, metrics in seen:
        assert {"task", "lr", "tokens_per_second"} <= set(metrics)
        assert metrics["tokens_per_second"] > 0 and metrics["task"] > 0


def test_nan_loss_raises_training_diverged_before_saving(tmp_path, char_tokenizer):
    from cairn.errors import CairnError, TrainingDiverged

    class Poison:
        def extra_loss(self, model, batch, outputs):
            return {"poison": torch.tensor(float("nan"))}

    model = make_full_trainable(make_tiny_llama())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ckpt = tmp_path / "ckpt"
    with pytest.raises(TrainingDiverged, match=r"step 1: loss term poison = nan") as info:
        train(model, char_tokenizer, EXAMPLES, _cfg(max_steps=3, save_every=1), checkpoint_dir=ckpt,
              loss_parts=[Poison()], progress=False, log=lambda s: None)
    assert isinstance(info.value, CairnError)
    assert not ckpt.exists()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # no optimizer step taken


def test_global_token_normalisation_with_accumulation(char_tokenizer):
    """batch 2 x accumulation 2 == batch 4 x accumulation 1: the loss is the mean over the answer
    tokens of the whole optimizer step, not a mean of micro-batch means (float tolerance 1e-6)."""
    finals = []
    for bs, accum in ((4, 1), (2, 2)):
        model = make_full_trainable(make_tiny_llama())
        train(model, char_tokenizer, EXAMPLES, _cfg(max_steps=3, batch_size=bs, grad_accum=accum, max_grad_norm=None),
              seed=2, progress=False, log=lambda s: None)
        finals.append(dict(model.named_parameters()))
    for n, p in finals[0].items():
        assert torch.allclose(p, finals[1][n], atol=1e-6), n


def test_bf16_frozen_base_cast_keeps_the_loss(char_tokenizer):
    """Holding frozen Linear weights in bf16 under autocast gives the matmuls the values autocast
    would give them: the loss agrees with plain autocast to bf16 rounding of the sum order (1e-3)."""
    from cairn.train.loop import answer_only_loss
    from cairn.train.setup import frozen_linears_in_bf16

    model = add_lora_adapter(make_tiny_llama(), LoraConfig(r=4, alpha=8, dropout=0.0), 1, 0)
    batch = collate([encode_example(char_tokenizer, ex, 32) for ex in EXAMPLES[:6]], char_tokenizer.pad_token_id)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain, _ = answer_only_loss(model, batch)
        with frozen_linears_in_bf16(model) as n:
            cast, _ = answer_only_loss(model, batch)
    assert n > 0
    assert abs(float(plain) - float(cast)) < 1e-3, (float(plain), float(cast))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # restored afterwards


def test_large_model_settings(char_tokenizer):
    from cairn.errors import CairnError

    model = add_lora_adapter(make_tiny_llama(), LoraConfig(r=4, alpha=8, dropout=0.0), 1, 0)
    cfg = _cfg(max_steps=2, gradient_checkpointing=True, attn_implementation="eager", base_dtype="bfloat16")
    result = train(model, char_tokenizer, EXAMPLES, cfg, progress=False, log=lambda s: None)
    assert result.steps == 2 and all(map(torch.isfinite, (torch.tensor(e["task"]) for e in result.log)))
    frozen = [p for p in model.parameters() if not p.requires_grad and p.dim() == 2]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert not model.get_base_model().is_activation_checkpointing  # undone after the round
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(CairnError, match="attn_implementation: flash_attention_2 needs the flash-attn"):
            train(make_full_trainable(make_tiny_llama()), char_tokenizer, EXAMPLES,
                  _cfg(max_steps=1, attn_implementation="flash_attention_2"), progress=False, log=lambda s: None)


def test_resumed_round_keeps_its_counters(tmp_path, char_tokenizer):
    """Tokens seen, the loss log and the loss sums since the last log survive a mid-round interruption: the
    resumed run's record equals the uninterrupted one (throughput aside). The checkpoint (step 4) falls
    between two logging steps (3 and 6), so step 4's loss must reach step 6's entry through it."""
    cfg = _cfg(max_steps=8, save_every=2, grad_accum=2, log_every=3)
    reference = train(make_full_trainable(make_tiny_llama()), char_tokenizer, EXAMPLES, cfg, seed=1, progress=False,
                      log=lambda s: None)

    ckpt = tmp_path / "ckpt"
    _train_until_interrupted(make_full_trainable(make_tiny_llama()), char_tokenizer, cfg, ckpt, step=5)
    resumed = train(make_full_trainable(make_tiny_llama()), char_tokenizer, EXAMPLES, cfg, seed=1,
                    checkpoint_dir=ckpt, progress=False, log=lambda s: None)

    def strip(log):
        return [{k: v for k, v in entry.items() if k != "tokens_per_second"} for entry in log]

    assert [e["step"] for e in resumed.log] == [3, 6, 8]
    # one process, same kernels, the same float sums in the same order: exactly equal
    assert strip(resumed.log) == strip(reference.log)
    assert resumed.tokens == reference.tokens > 0 and resumed.steps == reference.steps


def test_gradient_checkpointing_trains_the_same_weights(char_tokenizer):
    """Why the fingerprint may skip ``gradient_checkpointing``: recomputing the forward in the backward
    gives the same update. Same kernels on both sides, but the recomputed graph may be fused or ordered
    differently, so float32 rounding (1e-6 relative) is allowed rather than bit-equality."""
    weights = []
    for on in (False, True):
        torch.manual_seed(0)
        model = make_full_trainable(make_tiny_llama())
        train(model, char_tokenizer, EXAMPLES, _cfg(max_steps=3, gradient_checkpointing=on), seed=0, progress=False,
              log=lambda s: None)
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for k, v in weights[0].items():
        torch.testing.assert_close(weights[1][k], v, rtol=1e-6, atol=1e-7, msg=k)
