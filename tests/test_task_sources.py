"""Train and test from different sources, several metrics per task, Hugging Face datasets, load-time checks."""

from __future__ import annotations

import json
import warnings

import pytest

from cairn.config import TaskConfig, config_from_dict
from cairn.data.checks import DataWarning, check_lengths, label_collisions
from cairn.data.tasks import load_task
from cairn.errors import CairnError

GSM = [{"question": f"Tom has {i} apples and buys 2. How many?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}
       for i in range(6)]
METAMATH = [{"query": f"What is {i} times 3?", "response": f"{i} * 3 = {3 * i}. The answer is: {3 * i}",
             "type": "GSM_Rephrased"} for i in range(8)]


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _math_cfg(**kw) -> TaskConfig:
    base = dict(name="math", format="jsonl", metrics=["gsm8k", "exact_match"],
                train_path="metamath/MetaMathQA-395K.json", train_format="trace",
                train_prompt_field="query", train_answer_field="response",
                test_path="gsm8k", prompt_field="question", answer_field="answer")
    return TaskConfig(**(base | kw))


def test_math_task_trains_on_metamath_and_tests_on_gsm8k(tmp_path):
    (tmp_path / "metamath").mkdir()
    (tmp_path / "metamath" / "MetaMathQA-395K.json").write_text(json.dumps(METAMATH, indent=1))
    _jsonl(tmp_path / "gsm8k" / "train.jsonl", GSM)
    _jsonl(tmp_path / "gsm8k" / "test.jsonl", GSM[:4])
    task = load_task(_math_cfg(), data_dir=tmp_path)
    assert task.train[1] == {"prompt": "What is 1 times 3?", "answer": "1 * 3 = 3. The answer is: 3"}
    assert task.test[0]["prompt"] == GSM[0]["question"] and len(task.test) == 4
    assert task.metric == "gsm8k" and task.metrics == ["gsm8k", "exact_match"]
    assert task.sources["train"].endswith("MetaMathQA-395K.json") and task.sources["test"].endswith("test.jsonl")
    assert task.origins["train"][2].endswith("MetaMathQA-395K.json, line 12")  # indent=1: items start at lines 2, 7, 12

    # the data pack's stand-in: GSM8K's own train split as the training source
    task = load_task(_math_cfg(train_path=None, train_format=None, train_prompt_field=None,
                               train_answer_field=None, path="gsm8k", test_path=None), data_dir=tmp_path)
    assert len(task.train) == 6 and task.train[0]["answer"].endswith("#### 2")


def test_missing_training_source_is_named(tmp_path):
    _jsonl(tmp_path / "gsm8k" / "test.jsonl", GSM)
    with pytest.raises(CairnError, match=r"training source .*metamath.*does not exist"):
        load_task(_math_cfg(), data_dir=tmp_path)
    (tmp_path / "mb").mkdir()
    (tmp_path / "mb" / "test.json").write_text(json.dumps([{"prompt": "p", "answer": "a"}]))
    (tmp_path / "mb" / "eval.json").write_text(json.dumps([{"prompt": "p", "answer": "a"}]))
    with pytest.raises(CairnError, match=r"task 'MeetingBank': training file .*mb/train\.json does not exist "
                                         r"\(the folder has: eval\.json, test\.json\).*train_path"):
        load_task(TaskConfig(name="MeetingBank", path="mb", metric="rouge_l"), data_dir=tmp_path)


def test_metric_shorthand_and_list_agree():
    cfg = {"name": "x", "model": "m", "methods": [{"name": "m"}], "tasks": [
        {"name": "a", "path": "p", "metric": "gsm8k"},
        {"name": "b", "path": "p", "metrics": ["gsm8k", "exact_match"]},
        {"name": "c", "path": "p", "metric": "gsm8k", "metrics": ["gsm8k", "exact_match"]}]}
    tasks = config_from_dict(cfg).tasks
    assert [t.metric_names for t in tasks] == [["gsm8k"], ["gsm8k", "exact_match"], ["gsm8k", "exact_match"]]
    cfg["tasks"][2]["metric"] = "exact_match"
    with pytest.raises(CairnError, match="task 'c'.*disagree on the primary metric"):
        config_from_dict(cfg)
    cfg["tasks"][2] = {"name": "c", "path": "p", "metrics": ["gsm8k", "gsm8k"]}
    with pytest.raises(CairnError, match="lists a metric twice"):
        config_from_dict(cfg)
    cfg["tasks"][2] = {"name": "c", "metric": "gsm8k", "train_path": "x"}
    with pytest.raises(CairnError, match="task 'c' has no path.*test_path"):
        config_from_dict(cfg)


def _folder(tmp_path, train, test):
    _jsonl(tmp_path / "train.jsonl", train)
    _jsonl(tmp_path / "test.jsonl", test)
    return str(tmp_path)


def test_metric_that_cannot_score_the_answers_fails_at_load(tmp_path):
    rows = [{"prompt": "Which day?", "answer": "Friday"}, {"prompt": "Which?", "answer": "Monday"}]
    path = _folder(tmp_path, rows, rows)
    with pytest.raises(CairnError, match=r"test\.jsonl, line 1: task 't': metric 'gsm8k' compares final numbers"):
        load_task(TaskConfig(name="t", format="jsonl", path=path, metrics=["exact_match", "gsm8k"]))
    with pytest.raises(CairnError, match=r"'numeric_accuracy' compares numbers, but none of the 2 test answers "
                                         r"\(.*test\.jsonl\)"):
        load_task(TaskConfig(name="t", format="jsonl", path=path, metric="numeric_accuracy"))
    mixed = rows + [{"prompt": "How many?", "answer": "4"}]  # NumGLUE-cm: some answers are words
    assert load_task(TaskConfig(name="t", format="jsonl", path=_folder(tmp_path, mixed, mixed),
                                metric="numeric_accuracy")).metric == "numeric_accuracy"


def test_first_character_accuracy_warns_on_colliding_labels(tmp_path):
    labels = ["World", "Sports", "Business", "Science or Technology"]
    rows = [{"prompt": f"News {i}", "answer": labels[i % 4]} for i in range(8)]
    with pytest.warns(DataWarning, match=r"labels 'Science or Technology', 'Sports' all start with 'S'.*"
                                         r"metric: exact_match"):
        task = load_task(TaskConfig(name="agnews", format="jsonl", path=_folder(tmp_path, rows, rows),
                                    metric="accuracy"))
    assert len(task.warnings) == 1 and "agnews" in task.warnings[0]
    # TRACE's own label sets (A/B/C, ScienceQA's "B\n<explanation>") do not collide
    assert label_collisions(["A", "B\nbecause x", "B\nbecause y", "C"]) == {}
    assert label_collisions([f"free text answer {i}" for i in range(100)]) == {}  # not a label set
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_task(TaskConfig(name="t", format="jsonl", path=str(tmp_path), metric="exact_match"))


def test_prompts_longer_than_max_length(tmp_path, char_tokenizer):
    rows = [{"prompt": "x" * n, "answer": "ab"} for n in (5, 40, 50, 6)]
    task = load_task(TaskConfig(name="t", format="jsonl", path=_folder(tmp_path, rows, rows), metric="exact_match"))
    # char tokenizer: BOS + one id per byte; answer 'ab' + EOS = 3 tokens
    with pytest.warns(DataWarning, match=r"2 of 4 training examples in .*train\.jsonl are longer than max_length=20 "
                                         r"tokens \(longest 54; line 2, line 3\).*cut from the left"):
        found = check_lengths(task, char_tokenizer, 20)
    assert len(found) == 1
    assert check_lengths(task, char_tokenizer, 64) == []
    with pytest.raises(CairnError, match=r"train\.jsonl, line 1: task 't': the answer alone is 3 tokens.*max_length "
                                         r"is 3"):
        check_lengths(task, char_tokenizer, 3)


# ------------------------------------------------------------------------------------- Hugging Face


def test_hf_saved_dataset_with_split_map_and_fields(tmp_path):
    datasets = pytest.importorskip("datasets", reason="format: hf needs the optional `datasets` package")
    dd = datasets.DatasetDict({"training": datasets.Dataset.from_list(GSM),
                               "validation": datasets.Dataset.from_list(GSM[:3])})
    dd.save_to_disk(str(tmp_path / "gsm_saved"))
    cfg = TaskConfig(name="gsm", format="hf", path="gsm_saved", metric="gsm8k", prompt_field="question",
                     split_map={"train": "training", "test": "validation"})
    task = load_task(cfg, data_dir=tmp_path)
    assert len(task.train) == 6 and len(task.test) == 3 and task.test[2]["prompt"] == GSM[2]["question"]
    assert task.origins["test"][0].endswith("[validation] row 1")

    with pytest.raises(CairnError, match=r"has no split 'test' \(it has: training, validation\).*split_map"):
        load_task(TaskConfig(name="gsm", format="hf", path=str(tmp_path / "gsm_saved"), metric="gsm8k",
                             prompt_field="question", split_map={"train": "training"}))
    with pytest.raises(CairnError, match=r"\[training\] row 1: no 'prompt' field \(fields: question, answer\)"):
        load_task(TaskConfig(name="gsm", format="hf", path=str(tmp_path / "gsm_saved"), metric="gsm8k",
                             split_map={"train": "training", "test": "validation"}))
    with pytest.raises(CairnError, match="saved with `save_to_disk`: it has no subsets"):
        load_task(cfg.__class__(**(cfg.__dict__ | {"subset": "main", "path": str(tmp_path / "gsm_saved")})))


def test_hf_local_data_files_and_mixed_sources(tmp_path):
    pytest.importorskip("datasets", reason="format: hf needs the optional `datasets` package")
    _jsonl(tmp_path / "hub_like" / "train.jsonl", GSM)
    _jsonl(tmp_path / "hub_like" / "test.jsonl", GSM[:2])
    _jsonl(tmp_path / "own" / "test.jsonl", [{"q": "What is 2+2?", "a": "#### 4"}])
    cfg = TaskConfig(name="gsm", format="hf", path=str(tmp_path / "hub_like"), metric="gsm8k",
                     prompt_field="question", test_path=str(tmp_path / "own"), test_format="jsonl",
                     test_prompt_field="q", test_answer_field="a")
    task = load_task(cfg)
    assert len(task.train) == 6 and task.test == [{"prompt": "What is 2+2?", "answer": "#### 4"}]
    with pytest.raises(CairnError, match=r"cannot load Hugging Face dataset .*no_such.*subset 'main'"):
        load_task(TaskConfig(name="x", format="hf", path=str(tmp_path / "no_such"), subset="main", metric="gsm8k"))


@pytest.mark.integration
def test_data_pack_math_task(data_dir):
    """The paper's math task on the data pack: GSM8K's train split stands in for MetaMathQA (not in the pack)."""
    cfg = TaskConfig(name="math", format="jsonl", train_path="gsm8k/train.jsonl", test_path="gsm8k",
                     prompt_field="question", metrics=["gsm8k", "exact_match"], max_train=50, max_test=20)
    task = load_task(cfg, data_dir=data_dir)
    assert len(task.train) == 50 and len(task.test) == 20 and task.warnings == []
    assert all("####" in ex["answer"] for ex in task.train + task.test)
    with pytest.raises(CairnError, match=r"MeetingBank/train\.json does not exist \(the folder has: eval\.json, "
                                         r"test\.json\)"):
        load_task(TaskConfig(name="MeetingBank", path="trace/MeetingBank", metric="rouge_l"), data_dir=data_dir)


def test_check_task_inputs_takes_every_max_length(tmp_path, char_tokenizer):
    from cairn.data.checks import check_task_inputs

    rows = [{"prompt": "x" * 30, "answer": "ab"}]
    task = load_task(TaskConfig(name="t", format="jsonl", path=_folder(tmp_path, rows, rows), metric="exact_match"))
    with pytest.warns(DataWarning):
        found = check_task_inputs([task], char_tokenizer, [20, 512, 20, 25], model="m")
    assert [w.split("max_length=")[1].split(" ")[0] for w in found] == ["20", "25"]


def test_split_map_on_a_folder(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps([{"prompt": "q", "answer": "a"}]))
    (tmp_path / "dev.json").write_text(json.dumps([{"prompt": "dev q", "answer": "b"}]))
    task = load_task(TaskConfig(name="t", path=str(tmp_path), metric="exact_match", split_map={"test": "dev"}))
    assert task.test == [{"prompt": "dev q", "answer": "b"}] and task.sources["test"].endswith("dev.json")
