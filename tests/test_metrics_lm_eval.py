"""GSM8K scoring as lm-evaluation-harness does it, ROUGE-L in TRACE's form, and the metric checks."""

from __future__ import annotations

import re

import pytest

from cairn.errors import CairnError
from cairn.eval import gsm8k as G
from cairn.eval import metrics as M

# (model output, reference, strict, flexible): hand-derived from lm-eval's gsm8k.yaml rules
GSM8K_CASES = [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "... #### 72", 1.0, 1.0),
    ("#### 1,234.", "#### 1234", 1.0, 1.0),          # ',' and one trailing '.' are ignored
    ("The answer is $18.", "#### 18", 0.0, 1.0),       # no '####': strict is [invalid]
    ("#### 5\nso maybe 6", "#### 5", 1.0, 0.0),       # flexible takes the LAST number
    ("I got -3 apples", "#### -3", 0.0, 1.0),
    ("nothing here", "#### 3", 0.0, 0.0),
    ("#### 3.50", "#### 3.5", 0.0, 0.0),               # compared as strings, not numbers
    ("####5", "#### 5", 0.0, 1.0),                      # strict needs the space after ####
]


@pytest.mark.parametrize("out,ref,strict,flex", GSM8K_CASES)
def test_gsm8k_strict_and_flexible_match_hand_derived_lm_eval_results(out, ref, strict, flex):
    assert M.gsm8k_strict([out], [ref]) == strict
    assert M.gsm8k_flexible([out], [ref]) == flex


def test_gsm8k_cot_strict_uses_the_answer_is_pattern():
    assert M.gsm8k_cot_strict(["5 + 4 = 9. The answer is 9."], ["#### 9"]) == 1.0
    assert M.gsm8k_cot_strict(["5 + 4 = 9."], ["#### 9"]) == 0.0
    assert M.gsm8k_cot_flexible(["5 + 4 = 9."], ["#### 9"]) == 1.0


def test_cot_prompt_has_eight_exemplars_and_q_a_format():
    p = G.build_cot_prompt({"question": "How many?"})
    assert p.count("Q: ") == 9 and p.endswith("Q: How many?\nA:")
    assert p.count("The answer is") == 8


def test_normalize_options():
    assert G.normalize("The $1,000.") == "the 1000"
    assert G.normalize("A, b!", regexes_to_ignore=[], ignore_case=False, ignore_punctuation=True) == "A b"


def _lm_eval_yaml(name: str) -> dict:
    pytest.importorskip("lm_eval")
    yaml = pytest.importorskip("yaml")
    from importlib import resources

    text = resources.files("lm_eval").joinpath("tasks").joinpath("gsm8k").joinpath(name).read_text()
    return yaml.safe_load(text)


def test_regexes_equal_lm_eval_gsm8k_yaml():
    cfg = _lm_eval_yaml("gsm8k.yaml")
    filters = {f["name"]: f["filter"][0] for f in cfg["filter_list"]}
    assert filters["strict-match"]["regex_pattern"] == G.STRICT.pattern
    assert filters["flexible-extract"]["regex_pattern"] == G.FLEXIBLE.pattern
    assert filters["flexible-extract"]["group_select"] == -1
    em = cfg["metric_list"][0]
    assert em["regexes_to_ignore"] == G.IGNORE
    assert em["ignore_case"] == G.IGNORE_CASE and em["ignore_punctuation"] == G.IGNORE_PUNCTUATION
    assert cfg["generation_kwargs"]["until"] == G.STOP


def test_regexes_and_exemplars_equal_lm_eval_gsm8k_cot_yaml():
    cfg = _lm_eval_yaml("gsm8k-cot.yaml")
    filters = {f["name"]: f["filter"][0] for f in cfg["filter_list"]}
    assert filters["strict-match"]["regex_pattern"] == G.COT_STRICT.pattern
    assert filters["flexible-extract"]["regex_pattern"] == G.FLEXIBLE.pattern
    samples = cfg["fewshot_config"]["samples"]
    assert [(s["question"], s["target"]) for s in samples] == G.COT_EXEMPLARS
    assert cfg["generation_kwargs"]["until"] == G.COT_STOP


def test_parity_with_lm_eval_filter_and_metric_on_fixed_strings():
    pytest.importorskip("lm_eval")
    try:
        from lm_eval.api.metrics import exact_match_hf_evaluate
        from lm_eval.filters.extraction import RegexFilter
    except Exception as exc:  # an lm-eval without these internals: the yaml checks above still run
        pytest.skip(f"lm-eval internals not importable: {exc}")
    for pattern, select, ours in ((G.STRICT.pattern, 0, G.extract_strict), (G.FLEXIBLE.pattern, -1, G.extract_flexible)):
        f = RegexFilter(regex_pattern=pattern, group_select=select)
        theirs = list(f.apply([[o] for o, *_ in GSM8K_CASES], [None] * len(GSM8K_CASES)))
        assert [t[0] for t in theirs] == [ours(o) for o, *_ in GSM8K_CASES]
        for (o, r, *_), t in zip(GSM8K_CASES, theirs):
            em = exact_match_hf_evaluate([t[0]], [r], regexes_to_ignore=G.IGNORE, ignore_case=True)["exact_match"]
            assert em == G.exact_match(ours(o), r)


# ---------------------------------------------------------------- ROUGE-L, TRACE's form


def test_rouge_l_trace_one_sentence_hand_computed():
    # LCS("a b c d", "a c e") = 2 tokens; R = 2/4, P = 2/3, F = 2PR/(P+R) = 4/7 (the package adds 1e-8)
    assert M.rouge_l_trace(["a c e"], ["a b c d"]) == pytest.approx(4 / 7, abs=1e-7)


def test_rouge_l_trace_is_summary_level_unlike_rouge_l():
    # sentences "a d" and "c b" of the reference: union LCS with the candidate's "a b" / "c d" covers
    # all four words, so summary-level F = 1; the sentence-level LCS of the flat token lists is 2 of 4
    assert M.rouge_l_trace(["a b. c d"], ["a d. c b"]) == pytest.approx(1.0, abs=1e-7)
    assert M.rouge_l(["a b. c d"], ["a d. c b"]) == pytest.approx(0.5, abs=1e-9)


def test_rouge_l_trace_counts_distinct_words_and_is_case_sensitive():
    # m = |{the, cat}| = 2 distinct reference words; the candidate "The cat" shares only "cat"
    assert M.rouge_l_trace(["The cat"], ["the cat the"]) == pytest.approx(2 * 0.5 * 0.5 / 1.0, abs=1e-7)


def test_rouge_l_trace_argument_order_is_traces():
    # TRACE: get_scores(hyps=reference, refs=prediction). Reference sentences "b c" / "b", prediction
    # "c b": for the one "reference" sentence "c b" (the prediction), LCS with "b c" is one word ("b")
    # and "b" adds nothing new: union 1 of 2 distinct words each side -> P = R = 1/2, F = 1/2.
    # The other order unions "c" (from "b c") and "b" (from "b"): F = 1.
    assert M.rouge_l_trace(["c b"], ["b c. b"]) == pytest.approx(0.5, abs=1e-7)
    assert M.rouge_l_trace(["b c. b"], ["c b"]) == pytest.approx(1.0, abs=1e-7)


def test_rouge_l_trace_empty_scores_zero_and_mean_over_pairs():
    assert M.rouge_l_trace(["", "..."], ["a b", "a b"]) == 0.0
    assert M.rouge_l_trace(["a b", "x"], ["a b", "a b"]) == pytest.approx(0.5, abs=1e-7)


# ---------------------------------------------------------------- several metrics, checks


def test_score_all_and_item_scores():
    preds, refs = ["#### 5", "it is 7"], ["#### 5", "#### 6"]
    got = M.score_all(["gsm8k_strict", "gsm8k_flexible"], preds, refs)
    assert got == {"gsm8k_strict": 0.5, "gsm8k_flexible": 0.5}
    assert M.item_scores("gsm8k_strict", preds, refs) == [1.0, 0.0]
    with pytest.raises(CairnError, match="unknown metric 'nope'"):
        M.score_all(["gsm8k_strict", "nope"], preds, refs)


def test_validate_metric_for_answers():
    M.validate_metric_for_answers("gsm8k_strict", ["step\n#### 72", "18"])
    with pytest.raises(CairnError, match="#### <number>"):
        M.validate_metric_for_answers("gsm8k_strict", ["The answer is: 72 apples"], where="tasks[6] math")
    with pytest.raises(CairnError, match="empty reference"):
        M.validate_metric_for_answers("rouge_l_trace", ["ok", "  "])
    with pytest.raises(CairnError, match="no answer is a number"):
        M.validate_metric_for_answers("numeric_accuracy", ["Friday", "Monday"])
    with pytest.raises(CairnError, match="unknown metric"):
        M.validate_metric_for_answers("rouge", ["a"])


def test_label_collisions_names_the_labels_sharing_a_first_character():
    labels = ["World", "Sports", "Business", "Science or Technology", "Sports"]
    assert M.label_collisions("accuracy", labels) == {"S": ["Sports", "Science or Technology"]}
    assert M.label_collisions("exact_match", labels) == {}
    assert M.label_collisions("accuracy", ["A", "B", "C"]) == {}
    msg = M.collision_warning("accuracy", labels, where="tasks[0] agnews")
    assert "'Sports', 'Science or Technology'" in msg and "exact_match" in msg
