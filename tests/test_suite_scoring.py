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


def test_near_tie_on_hand_built_scores():
    from cairn.eval.suites import near_tie

    # acc: choice 0 leads by 1.0 nat; each side may be off by 0.25 * sqrt(2) = 0.354 -> 0.707 < 1: safe
    assert not near_tie([-1.0, -2.0], [2, 2], ["aa", "aa"], tolerance=0.25)
    # same gap, 6 tokens each: 2 * 0.25 * sqrt(6) = 1.22 >= 1.0 -> could flip
    assert near_tie([-1.0, -2.0], [6, 6], ["aa", "aa"], tolerance=0.25)
    # acc is safe (gap 1.0 vs 0.2) but acc_norm is not: -1/1 = -1.0 vs -2/2 = -1.0 tie
    assert near_tie([-1.0, -2.0], [1, 1], ["a", "bb"], tolerance=0.1)
    # acc_norm gap -2/4 - (-3/2) = 1.0 against bounds 0.1/4 + 0.1/2: safe; acc gap 1.0 vs 0.2: safe
    assert not near_tie([-2.0, -3.0], [1, 1], ["abcd", "ab"], tolerance=0.1)
    assert near_tie([-1.0, -1.0], [1, 1], ["a", "b"], tolerance=1e-9)  # an exact tie is a near tie


def _docs():
    from cairn.eval.suites import MCDoc

    return [MCDoc(tuple(q), tuple(c.strip() or c for _, c in q), 0) for q in QUESTIONS if len(q) > 1]


def test_bf16_mode_keeps_float32_predictions(model, tokenizer):
    from cairn.eval.suites import _score_mc

    exact, exact_details = _score_mc(model, tokenizer, _docs(), 4, True, False, "t")
    mixed, details = _score_mc(model, tokenizer, _docs(), 4, True, False, "t", precision="bf16", bf16_tolerance=0.1)
    assert mixed == exact  # acc and acc_norm per question
    for a, b in zip(details, exact_details):
        assert (a["pred"], a["pred_norm"]) == (b["pred"], b["pred_norm"])
        if a["rescored"]:  # a near tie carries float32's own numbers
            assert a["loglikelihoods"] == b["loglikelihoods"]
        else:  # bf16 numbers: close to float32, but computed in bf16
            assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=0.5)
    # a random tiny model is unsure about everything: with a generous tolerance every question is re-scored
    _, all_details = _score_mc(model, tokenizer, _docs(), 4, True, False, "t", precision="bf16", bf16_tolerance=10.0)
    assert all(d["rescored"] for d in all_details)
    assert [d["loglikelihoods"] for d in all_details] == [d["loglikelihoods"] for d in exact_details]


def test_autocast_runs_the_forward_in_bf16(model, tokenizer):
    seen = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        bf = score_pairs(model, tokenizer, QUESTIONS, batch_size=4, autocast=torch.bfloat16)
    finally:
        hook.remove()
    assert seen and all(d == torch.bfloat16 for d in seen)
    fp = score_pairs(model, tokenizer, QUESTIONS, batch_size=4)
    assert bf != fp  # bf16 rounding shows
    assert [x for q in bf for x in q] == pytest.approx([x for q in fp for x in q], abs=0.5)


def test_bf16_precision_needs_float32_weights(tmp_path, model, tokenizer):
    import copy

    from cairn.errors import CairnError
    from cairn.eval.suites import evaluate_suite

    half = copy.deepcopy(model).to(torch.bfloat16)
    with pytest.raises(CairnError, match="needs the model loaded in float32"):
        evaluate_suite(half, tokenizer, ["arc_easy"], tmp_path, precision="bf16", progress=False)
    with pytest.raises(CairnError, match="precision must be one of"):
        evaluate_suite(model, tokenizer, ["arc_easy"], tmp_path, precision="fp8", progress=False)
