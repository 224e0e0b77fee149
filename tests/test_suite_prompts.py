"""Prompt construction, metric arithmetic and input checking of the old-knowledge suite.

Expected strings are written out by hand from lm-evaluation-harness 0.4's task YAMLs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cairn.errors import CairnError
from cairn.eval import gsm8k, suites
from cairn.eval.suites import OLD_KNOWLEDGE_TASKS, MCDoc


def doc(task: str, row: dict) -> MCDoc:
    return OLD_KNOWLEDGE_TASKS[task].to_doc(row)


def test_mmlu_prompt():
    d = doc("mmlu", {"question": " What is 2+2? ", "subject": "high_school_mathematics",
                     "choices": ["3", "4", "5", "22"], "answer": 1})
    ctx = ("The following are multiple choice questions (with answers) about high school mathematics.\n\n"
           "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:")
    assert d.pairs == ((ctx, " A"), (ctx, " B"), (ctx, " C"), (ctx, " D"))
    assert d.choices == ("A", "B", "C", "D") and d.gold == 1


def test_mmlu_fewshot_prompt_uses_first_dev_questions_of_the_subject():
    dev = [{"question": "Q1", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 2},
           {"question": "Other", "subject": "virology", "choices": ["a", "b", "c", "d"], "answer": 0},
           {"question": "Q2", "subject": "anatomy", "choices": ["e", "f", "g", "h"], "answer": 0}]
    row = {"question": "Q", "subject": "anatomy", "choices": ["w", "x", "y", "z"], "answer": 3}
    [d] = suites._with_mmlu_fewshot([doc("mmlu", row)], [row], dev, 2)
    assert d.pairs[3][0] == (
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
        "Q1\nA. a\nB. b\nC. c\nD. d\nAnswer: C\n\n"
        "Q2\nA. e\nB. f\nC. g\nD. h\nAnswer: A\n\n"
        "Q\nA. w\nB. x\nC. y\nD. z\nAnswer:")
    assert d.pairs[3][1] == " D" and d.gold == 3


@pytest.mark.parametrize("task", ["arc_easy", "arc_challenge"])
def test_arc_prompt_with_numeric_labels(task):
    d = doc(task, {"id": "x", "question": "Which is a gas?",
                   "choices": {"text": ["ice", "steam", "rock"], "label": ["1", "2", "3"]}, "answerKey": "2"})
    assert d.pairs == (("Question: Which is a gas?\nAnswer:", " ice"), ("Question: Which is a gas?\nAnswer:", " steam"),
                       ("Question: Which is a gas?\nAnswer:", " rock"))
    assert d.gold == 1 and d.choices == ("ice", "steam", "rock")


def test_hellaswag_preprocessed_row_is_used_as_is():
    d = doc("hellaswag", {"ctx": "Roof shingle removal: A man is sitting on a roof. he",
                          "endings": ["is using wrap.", "starts pulling up roofing."], "label": "1"})
    assert d.pairs[1] == ("Roof shingle removal: A man is sitting on a roof. he", " starts pulling up roofing.")
    assert d.gold == 1


def test_hellaswag_raw_row_gets_lm_eval_preprocessing():
    d = doc("hellaswag", {"activity_label": "Making tea", "ctx_a": "[header] How to brew. [title] Boil water.",
                          "ctx_b": "then", "endings": ["[step] pour it [www.x.org]", " wait"], "label": 0})
    # " [title]" -> ". ", every [..] span deleted, double spaces collapsed, ctx_b capitalised; the ending
    # is stripped before its leading tag goes, so it keeps a space (the continuation starts with two)
    assert d.pairs[0] == ("Making tea: How to brew.. Boil water. Then", "  pour it ")
    assert d.pairs[1] == ("Making tea: How to brew.. Boil water. Then", " wait")


def test_piqa_openbookqa_commonsense_prompts():
    p = doc("piqa", {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "hit it", "label": 0})
    assert p.pairs == (("Question: Open a jar\nAnswer:", " twist the lid"), ("Question: Open a jar\nAnswer:", " hit it"))
    o = doc("openbookqa", {"id": "1", "question_stem": "The sun is",
                           "choices": {"text": ["a star", "a moon"], "label": ["A", "B"]}, "answerKey": " A"})
    assert o.pairs == (("The sun is", " a star"), ("The sun is", " a moon")) and o.gold == 0
    c = doc("commonsense_qa", {"id": "1", "question": " Where is ice? ", "question_concept": "ice",
                               "choices": {"label": list("ABCDE"), "text": ["fridge", "oven", "sun", "desk", "car"]},
                               "answerKey": "A"})
    ctx = "Question: Where is ice?\nA. fridge\nB. oven\nC. sun\nD. desk\nE. car\nAnswer:"
    assert c.pairs == tuple((ctx, f" {x}") for x in "ABCDE") and c.gold == 0


def test_winogrande_partial_scoring():
    d = doc("winogrande", {"sentence": "Sarah gave Maria a book because _ was done reading it.",
                           "option1": "Sarah", "option2": "Maria", "answer": "1"})
    # the option fills the context; only the shared rest of the sentence is scored
    assert d.pairs == (("Sarah gave Maria a book because Sarah", " was done reading it."),
                       ("Sarah gave Maria a book because Maria", " was done reading it."))
    assert d.gold == 0


def test_acc_norm_divides_by_character_length():
    # raw log-likelihoods prefer choice 0; per character, the longer choice 1 wins
    acc, norm = suites.mc_predictions([-6.0, -8.0, -20.0], ["abc", "abcdefgh", "ab"])
    assert acc == 0
    assert norm == 1  # -6/3 = -2.0, -8/8 = -1.0, -20/2 = -10.0
    # ties go to the first index, as numpy.argmax does
    assert suites.mc_predictions([-2.0, -2.0], ["ab", "ab"]) == (0, 0)


def test_mean_stderr_matches_hand_computation():
    values = [1.0, 0.0, 1.0, 1.0]  # mean 0.75, sample var = (3*0.0625 + 0.5625)/3 = 0.25
    assert math.isclose(suites.mean_stderr(values), math.sqrt(0.25 / 4))


@pytest.mark.parametrize("text,strict,flexible", [
    ("She pays 5*3=15 dollars.\n#### 15", "15", "15"),
    ("#### -1,234.5 and then 7", "-1,234.5", "7"),
    ("The answer is $1,000.", "[invalid]", "$1,000."),
    ("no numbers here", "[invalid]", "[invalid]"),
    ("3 apples and 12 pears, total 15", "[invalid]", "15"),
    ("#### 12\n#### 13", "12", "13"),
    ("x = 5", "[invalid]", "5"),
])
def test_gsm8k_extraction(text, strict, flexible):
    assert gsm8k.extract_strict(text) == strict
    assert gsm8k.extract_flexible(text) == flexible


def test_gsm8k_exact_match_normalisation():
    reference = "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,072"
    assert gsm8k.exact_match("1,072", reference) == 1.0
    assert gsm8k.exact_match("$1072.", reference) == 1.0
    assert gsm8k.exact_match("1072.0", reference) == 0.0
    assert gsm8k.exact_match("[invalid]", reference) == 0.0


def test_gsm8k_prompt():
    shot = {"question": "1+1?", "answer": "2\n#### 2"}
    assert gsm8k.build_prompt({"question": "2+2?"}, [shot]) == "Question: 1+1?\nAnswer: 2\n#### 2\n\nQuestion: 2+2?\nAnswer:"


def _write(tmp_path: Path, rel: str, rows: list) -> Path:
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_missing_column_names_file_line_and_column(tmp_path):
    good = {"goal": "g", "sol1": "a", "sol2": "b", "label": 0}
    path = _write(tmp_path, "old_knowledge/piqa/validation.jsonl", [good, {"goal": "g", "sol1": "a", "label": 1}])
    with pytest.raises(CairnError, match=r"validation\.jsonl:2: missing column 'sol2'"):
        suites.load_task_docs(OLD_KNOWLEDGE_TASKS["piqa"], tmp_path, None, 0)


def test_answer_out_of_range_is_an_error(tmp_path):
    row = {"question": "q", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 4}
    _write(tmp_path, "old_knowledge/mmlu/test.jsonl", [row])
    with pytest.raises(CairnError, match=r"test\.jsonl:1: answer index 4 is out of range"):
        suites.load_task_docs(OLD_KNOWLEDGE_TASKS["mmlu"], tmp_path, None, 0)
    arc = {"id": "1", "question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}
    _write(tmp_path, "old_knowledge/arc_easy/test.jsonl", [arc])
    with pytest.raises(CairnError, match=r"answerKey 'C' is not one of the choice labels"):
        suites.load_task_docs(OLD_KNOWLEDGE_TASKS["arc_easy"], tmp_path, None, 0)


def test_unknown_task_lists_available():
    with pytest.raises(CairnError, match=r"unknown old-knowledge task.*'mmlu_pro'.*available: mmlu, arc_challenge"):
        suites.resolve_tasks(["mmlu_pro"])


def test_limit_zero_and_bad_json_are_errors(tmp_path):
    with pytest.raises(CairnError, match="limit must be a positive"):
        suites.evaluate_suite(None, None, ["piqa"], tmp_path, limit=0)
    _write(tmp_path, "old_knowledge/piqa/validation.jsonl", ["{not json"])
    with pytest.raises(CairnError, match=r"validation\.jsonl:1: not valid JSON"):
        suites.load_task_docs(OLD_KNOWLEDGE_TASKS["piqa"], tmp_path, None, 0)


def test_fewshot_refused_where_lm_eval_samples_from_missing_train_split(tmp_path):
    _write(tmp_path, "old_knowledge/piqa/validation.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}])
    with pytest.raises(CairnError, match="zero-shot only"):
        suites.load_task_docs(OLD_KNOWLEDGE_TASKS["piqa"], tmp_path, None, 0, num_fewshot=5)


def test_subsample_is_seeded_sorted_and_bounded():
    a = suites.subsample(100, 10, seed=3)
    assert a == suites.subsample(100, 10, seed=3) and a == sorted(a) and len(set(a)) == 10
    assert a != suites.subsample(100, 10, seed=4)
    assert suites.subsample(5, 10, seed=3) == [0, 1, 2, 3, 4]
