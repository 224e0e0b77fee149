"""cairn's greedy loop (finished rows leave the batch) gives exactly ``model.generate``'s outputs.

A tiny randomly initialised Llama and a byte-level BPE tokenizer trained in memory. Outputs are
compared as strings: both compute the same greedy argmax from the same model, so they must agree
token for token (a dropped row changes the batch size of later matmuls; the argmax margin of this
model is far above float rounding, so any difference is a bug, not noise).
"""

from __future__ import annotations

import pytest
import torch

from cairn.eval.generation import cut_at_stop, generate

PROMPTS = ["The quick brown", "Question: the fox\nAnswer:", "A", "The lazy dog jumps over the quick",
           "fox jumps", "Answer: B C D A B C", "dog.", "over the lazy dog. Question: A"]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog. Question: Answer: A B C D"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


def plain_generate(model, tokenizer, prompts, max_new_tokens, batch_size, stop):
    """The baseline a user writes: left-padded batches through ``model.generate`` with ``stop_strings``."""
    tokenizer.padding_side = "left"
    outs = []
    for s in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[s:s + batch_size], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, stop_strings=stop or None,
                                 tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id)
        outs += [cut_at_stop(tokenizer.decode(r, skip_special_tokens=True), stop)
                 for r in out[:, enc["input_ids"].shape[1]:]]
    return outs


def test_equals_plain_generate_without_stop(model, tokenizer):
    got = generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=8)
    assert got == [plain_generate(model, tokenizer, [p], 10, 1, [])[0] for p in PROMPTS]


def test_rows_leaving_the_batch_do_not_change_the_others(model, tokenizer):
    free = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=8)
    # stop strings taken from some rows' free-running text, so those rows finish early and leave
    stop = sorted({f[2:4] for f in free[::3] if len(f) > 4})
    assert stop, "the tiny model must produce text to take stop strings from"
    got = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=8, stop=stop)
    ref = [plain_generate(model, tokenizer, [p], 12, 1, stop)[0] for p in PROMPTS]
    assert got == ref
    assert sum(g != f for g, f in zip(got, free)) >= 1  # some rows really stopped early
    # and batched in input order (a different padding) as plain generate does it
    assert plain_generate(model, tokenizer, PROMPTS, 12, 8, stop) == ref


def test_eos_ends_a_row(model, tokenizer):
    # a model whose bias makes EOS the argmax after a few tokens for every prompt: rows end at EOS
    with torch.no_grad():
        lm = model.lm_head
        saved = lm.weight.clone()
        lm.weight[tokenizer.eos_token_id] = lm.weight.mean(0) + 0.5 * lm.weight[tokenizer.eos_token_id]
    try:
        got = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=4)
        ref = [plain_generate(model, tokenizer, [p], 12, 1, [])[0] for p in PROMPTS]
    finally:
        with torch.no_grad():
            lm.weight.copy_(saved)
    assert got == ref


def test_peft_wrapped_model(model, tokenizer):
    # evaluation after a LoRA round runs on a PeftModel: the loop must pass the cache through it
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    try:
        got = generate(peft, tokenizer, PROMPTS[:4], max_new_tokens=8, batch_size=4)
        ref = [plain_generate(peft, tokenizer, [p], 8, 1, [])[0] for p in PROMPTS[:4]]
        assert got == ref
        with peft.disable_adapter():  # the adapter really changes the output, so it was applied
            assert generate(peft, tokenizer, PROMPTS[:4], max_new_tokens=8, batch_size=4) != got
    finally:
        peft.unload()


def _stops(model, tokenizer):
    """Stop strings taken from some rows' free-running text, so those rows end early (answers of mixed length)."""
    free = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=8)
    stop = sorted({f[2:4] for f in free[::3] if len(f) > 4})
    assert stop, "the tiny model must produce text to take stop strings from"
    return stop


class _Forwards:
    """Counts decode steps (one-token forwards) and prefills of a model."""

    def __init__(self, model):
        self.decode = self.prefill = 0
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if kwargs["input_ids"].shape[1] == 1:
            self.decode += 1
        else:
            self.prefill += 1


def test_continuous_batching_refills_slots_with_identical_outputs(model, tokenizer, monkeypatch):
    from cairn.eval import continuous

    stop = _stops(model, tokenizer)
    joins = []
    real_join = continuous._Batch.join
    monkeypatch.setattr(continuous._Batch, "join", lambda self, other: joins.append(len(other.rows)) or
                        real_join(self, other))
    counted = _Forwards(model)
    try:
        got = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3, stop=stop)
        steps, prefills = counted.decode, counted.prefill
        counted.decode = counted.prefill = 0
        one_batch_at_a_time = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3, stop=stop,
                                       continuous=False)
    finally:
        counted.handle.remove()
    assert joins, "finished rows' slots must be refilled from the pending prompts"
    assert got == [plain_generate(model, tokenizer, [p], 12, 1, stop)[0] for p in PROMPTS]
    assert one_batch_at_a_time == got
    # the point of it: fewer decode steps than running fixed batches until their longest row ends
    # (more prefills: each refill is one)
    assert steps < counted.decode and prefills > counted.prefill


def test_a_longer_prompt_joins_a_narrower_running_batch(model, tokenizer):
    # generate admits prompts longest first, so a joining prompt is never wider than the running
    # batch; admitted shortest first, the running batch is the one left-padded to make room
    from cairn.eval.continuous import can_join, greedy_stream
    from cairn.eval.generation import _forward_kwargs

    assert can_join(model)
    encoded = [tokenizer(p)["input_ids"] for p in PROMPTS]
    stream = sorted(range(len(PROMPTS)), key=lambda i: len(encoded[i]))
    stop = _stops(model, tokenizer)
    finished = lambda row: row[-1] == tokenizer.eos_token_id or len(row) >= 12 or any(  # noqa: E731
        s in tokenizer.decode(row, skip_special_tokens=True) for s in stop)
    news = greedy_stream(model, encoded.__getitem__, stream, 2, finished, tokenizer.pad_token_id,
                         _forward_kwargs(model), joinable=True)
    got = [cut_at_stop(tokenizer.decode(news[i], skip_special_tokens=True), stop) for i in range(len(PROMPTS))]
    assert got == [plain_generate(model, tokenizer, [p], 12, 1, stop)[0] for p in PROMPTS]



def test_shared_prefix_computed_once(model, tokenizer, monkeypatch):
    # few-shot prompts start with the same examples: their KV is computed once and every prefill
    # computes only the prompt's own tokens after it (a masked hole between the two in each row)
    from cairn.eval import continuous

    header = "Question: A B C D\nAnswer: the quick brown fox jumps over the lazy dog.\n\n" * 2
    prompts = [header + p for p in PROMPTS]
    shared = []
    real_init = continuous.SharedPrefix.__init__
    monkeypatch.setattr(continuous.SharedPrefix, "__init__", lambda self, model, tokens, fwd: shared.append(
        len(tokens)) or real_init(self, model, tokens, fwd))
    stop = _stops(model, tokenizer)
    got = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=3, stop=stop)
    assert shared and shared[0] >= 16
    assert got == [plain_generate(model, tokenizer, [p], 12, 1, stop)[0] for p in prompts]
    assert generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=3, stop=stop, continuous=False) == got


def test_max_prompt_tokens_keeps_the_last_tokens(tiny_llama, char_tokenizer):
    # TRACE's max_prompt_len: a longer prompt keeps its last N tokens (the question at its end),
    # a shorter one is unchanged (the character tokenizer makes token = character + a leading BOS)
    model, tok = tiny_llama, char_tokenizer
    prompts = ["a long meeting transcript, then the question: Summary:", "short: "]
    n = 20
    got = generate(model, tok, prompts, max_new_tokens=6, batch_size=2, max_prompt_tokens=n)
    for prompt, text in zip(prompts, got):
        ids = tok(prompt)["input_ids"][-n:]
        assert len(ids) == min(n, len(prompt) + 1)
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert text == tok.decode(out[0, len(ids):], skip_special_tokens=True)
    whole = generate(model, tok, prompts, max_new_tokens=6, batch_size=2)
    assert whole[1] == got[1] and whole[0] != got[0]  # only the long prompt was cut, and that mattered
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        generate(model, tok, prompts, max_new_tokens=6, batch_size=2, max_prompt_tokens=0)


def test_roomy_cache_grows_past_its_room(model, tokenizer, monkeypatch):
    # decode steps write into spare columns of the cache's buffers; with 3 spare columns the buffers
    # fill up every few steps (and at every prefill), so moving to a new buffer is exercised often
    from cairn.eval import continuous

    monkeypatch.setattr(continuous, "ROOM", 3)
    header = "Question: A B C D\nAnswer: the quick brown fox jumps over the lazy dog.\n\n" * 2
    stop = _stops(model, tokenizer)
    for prompts in (PROMPTS + [header + p for p in PROMPTS[:3]], [header + p for p in PROMPTS]):  # 2nd: shared prefix
        got = generate(model, tokenizer, prompts, max_new_tokens=20, batch_size=3, stop=stop)
        assert got == [plain_generate(model, tokenizer, [p], 20, 1, stop)[0] for p in prompts]


def test_packed_prefill_lays_out_the_padded_batch(model, tokenizer, monkeypatch):
    """Prompts of unequal length are prefilled padding-free (one row, each prompt attending to
    itself) and re-laid as the left-padded batch: the same keys/values at every real column and the
    same last logits as the padded prefill, to float rounding; the outputs equal plain generate's."""
    from cairn.eval import continuous
    from cairn.eval.generation import _forward_kwargs

    assert continuous.can_prefill_packed(model)
    encoded = [tokenizer(p)["input_ids"] for p in PROMPTS[:4]]
    fwd = _forward_kwargs(model)
    args = (model, encoded.__getitem__, list(range(4)), tokenizer.pad_token_id, torch.device("cpu"), fwd)
    with torch.no_grad():
        padded, logits_padded = continuous._prefill(*args, roomy=True)
        packed, logits_packed = continuous._prefill(*args, roomy=True, packed=True)
    torch.testing.assert_close(logits_packed, logits_padded, rtol=1e-4, atol=1e-5)
    assert torch.equal(packed.mask, padded.mask) and torch.equal(packed.pos, padded.pos)
    real = padded.mask.bool()
    for a, b in zip(packed.cache.layers, padded.cache.layers):
        assert a.keys.shape == b.keys.shape
        for t_a, t_b in ((a.keys, b.keys), (a.values, b.values)):
            torch.testing.assert_close(t_a.transpose(1, 2)[real], t_b.transpose(1, 2)[real], rtol=1e-4, atol=1e-5)
            assert t_a.transpose(1, 2)[~real].abs().sum() == 0  # pad columns: masked zeros

    calls = []
    real_packed = continuous._packed_prefill
    monkeypatch.setattr(continuous, "_packed_prefill", lambda *a, **k: calls.append(1) or real_packed(*a, **k))
    stop = _stops(model, tokenizer)
    got = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=4, stop=stop)
    assert calls, "prompts of unequal length must be prefilled padding-free"
    assert got == [plain_generate(model, tokenizer, [p], 12, 1, stop)[0] for p in PROMPTS]
