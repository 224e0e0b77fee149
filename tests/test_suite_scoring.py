"""The batched scorer and the batched generator agree with the plain one-at-a-time computation.

A tiny randomly initialised Llama (2 layers, hidden 32) and a byte-level BPE tokenizer trained in
memory on one sentence (GPT-2-style spaces, so the context/continuation split is exercised).
"""

from __future__ import annotations

import pytest
import torch

from cairn.eval.generation import cut_at_stop, generate
from cairn.eval.multiple_choice import encode_pair, score_pairs
from cairn.eval.suites import OLD_KNOWLEDGE_TASKS


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

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """One pair, one unpadded row, full logits: the computation lm-evaluation-harness does."""
    ctx, cont = encode_pair(tokenizer, context, continuation, tokenizer.eos_token_id)
    with torch.no_grad():
        logits = model(torch.tensor([(ctx + cont)[:-1]])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return float(sum(logprobs[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))


QUESTIONS = [
    [("Question: the fox\nAnswer:", " A"), ("Question: the fox\nAnswer:", " B"), ("Question: the fox\nAnswer:", " C lazy")],
    [("The quick ", "brown fox"), ("The quick ", "lazy dog jumps")],  # trailing space moves into the continuation
    [("The fox", " jumps over the dog"), ("The dog", " jumps over the dog")],  # WinoGrande-style: contexts differ
    [("", "dog"), ("", "fox jumps")],  # empty context: the prefix token stands in
    [("Answer:", " the quick brown fox jumps over the lazy dog")],
]


def test_encode_pair_splits_like_lm_eval(tokenizer):
    ctx, cont = encode_pair(tokenizer, "The quick ", "brown", tokenizer.eos_token_id)
    assert ctx == tokenizer("The quick")["input_ids"]
    assert ctx + cont == tokenizer("The quick brown")["input_ids"]
    assert encode_pair(tokenizer, "", "dog", 7) == ([7], tokenizer("dog", add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("batch_size", [1, 3, 16])
@pytest.mark.parametrize("share_prefix", [True, False])
def test_batched_scorer_equals_one_pair_at_a_time(model, tokenizer, batch_size, share_prefix):
    expected = [[reference_loglikelihood(model, tokenizer, c, x) for c, x in q] for q in QUESTIONS]
    got = score_pairs(model, tokenizer, QUESTIONS, batch_size=batch_size, share_prefix=share_prefix)
    assert [len(q) for q in got] == [len(q) for q in QUESTIONS]
    for qe, qg in zip(expected, got):
        for e, g in zip(qe, qg):
            assert g == pytest.approx(e, abs=1e-4)
    assert all(v < 0 for q in got for v in q)


def test_tiny_logits_budget_still_scores_everything(model, tokenizer):
    expected = score_pairs(model, tokenizer, QUESTIONS, batch_size=16)
    got = score_pairs(model, tokenizer, QUESTIONS, batch_size=16, max_logits=1)  # one row per forward
    for qe, qg in zip(expected, got):
        assert qg == pytest.approx(qe, abs=1e-4)


def test_winogrande_doc_scores_through_the_scorer(model, tokenizer):
    d = OLD_KNOWLEDGE_TASKS["winogrande"].to_doc(
        {"sentence": "The fox jumps over the dog because _ is quick.", "option1": "the fox", "option2": "the dog",
         "answer": "2"})
    [got] = score_pairs(model, tokenizer, [d.pairs], batch_size=4)
    for (c, x), g in zip(d.pairs, got):
        assert g == pytest.approx(reference_loglikelihood(model, tokenizer, c, x), abs=1e-4)


def test_generate_batched_equals_unbatched(model, tokenizer):
    prompts = ["The quick brown", "Question: the fox\nAnswer:", "A", "The lazy dog jumps over the quick"]
    single = [generate(model, tokenizer, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    batched = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=4)
    assert batched == single
    assert all(isinstance(s, str) and s for s in batched)
    # and it is the greedy continuation: the first new token is the argmax of the prompt's last logits
    ids = tokenizer(prompts[0])["input_ids"]
    with torch.no_grad():
        first = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    assert batched[0].startswith(tokenizer.decode([first]))


def test_generate_stops_at_stop_string(model, tokenizer):
    free = generate(model, tokenizer, ["The quick brown"], max_new_tokens=12, batch_size=1)[0]
    assert len(free) > 2
    stop = free[1:3]  # a string the free-running output contains
    cut = generate(model, tokenizer, ["The quick brown"], max_new_tokens=12, batch_size=1, stop=[stop])[0]
    assert cut == free.split(stop)[0]
    assert cut_at_stop("abc Question: d", ["Question:", "</s>"]) == "abc "
