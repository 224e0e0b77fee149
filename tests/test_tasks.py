"""Task loading (TRACE JSON, JSONL), bad input, and the generated demo domains."""

from __future__ import annotations

import json

import pytest

from cairn.config import TaskConfig
from cairn.data.demo import DOMAINS, generate_domain
from cairn.data.tasks import load_task
from cairn.errors import CairnError


def test_demo_domains_are_deterministic_and_phrased_differently():
    a = generate_domain("zoology", seed=0, entities=5)
    assert a == generate_domain("zoology", seed=0, entities=5)
    assert a != generate_domain("zoology", seed=1, entities=5)
    assert len(a["train"]) == 5 * 2 * 3 and len(a["test"]) == 5 * 2
    train_prompts = {ex["prompt"] for ex in a["train"]}
    assert not train_prompts & {ex["prompt"] for ex in a["test"]}  # test phrasing never trained
    # every test fact is taught in training (same entity, same answer)
    taught = {(ex["answer"], ex["prompt"].split(" the ")[-1].split("?")[0]) for ex in a["train"]}
    assert all(any(ans == ex["answer"] for ans, _ in taught) for ex in a["test"])


def test_demo_domains_never_share_entities():
    names = {}
    for d in DOMAINS:
        prompts = " ".join(ex["prompt"] for ex in generate_domain(d, entities=8)["test"])
        names[d] = {w.strip("?.,'s") for w in prompts.split() if w[:1].isupper() and w not in ("Question:", "Answer:", "If", "What", "Which", "In", "Name", "The", "Where")}
    for x in names:
        for y in names:
            if x < y:
                assert not names[x] & names[y]


def test_unknown_demo_domain():
    with pytest.raises(CairnError, match="unknown demo domain 'cooking'; available: zoology"):
        generate_domain("cooking")


def test_trace_folder_loads(tmp_path):
    for split in ("train", "eval", "test"):
        (tmp_path / f"{split}.json").write_text(json.dumps([{"prompt": f"{split} q", "answer": "A"}] * 3))
    task = load_task(TaskConfig(name="t", format="trace", path=str(tmp_path), metric="accuracy"))
    assert len(task.train) == 3 and task.test[0] == {"prompt": "test q", "answer": "A"}


def test_relative_path_resolves_against_data_dir(tmp_path):
    (tmp_path / "T").mkdir()
    for split in ("train", "test"):
        (tmp_path / "T" / f"{split}.json").write_text(json.dumps([{"prompt": "q", "answer": "a"}]))
    task = load_task(TaskConfig(name="t", format="trace", path="T", metric="exact_match"), data_dir=tmp_path)
    assert task.test[0]["answer"] == "a"


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"q": "a", "a": "b"}\n')
    (tmp_path / "test.jsonl").write_text('{"q": "a", "a": "b"}\n{"q": broken\n')
    cfg = TaskConfig(name="t", format="jsonl", path=str(tmp_path), metric="exact_match", prompt_field="q",
                     answer_field="a")
    with pytest.raises(CairnError, match=r"test\.jsonl, line 2: malformed JSON"):
        load_task(cfg)


def test_jsonl_custom_fields(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"q": "x?", "a": "y"}\n')
    (tmp_path / "test.jsonl").write_text('{"q": "x?", "a": "y"}\n')
    cfg = TaskConfig(name="t", format="jsonl", path=str(tmp_path), metric="exact_match", prompt_field="q",
                     answer_field="a")
    assert load_task(cfg).test == [{"prompt": "x?", "answer": "y"}]
    cfg.answer_field = "answer"
    with pytest.raises(CairnError, match=r"train\.jsonl, line 1: no 'answer' field"):
        load_task(cfg)


def test_bad_inputs(tmp_path):
    with pytest.raises(CairnError, match="does not exist"):
        load_task(TaskConfig(name="t", format="trace", path=str(tmp_path / "nope"), metric="accuracy"))
    (tmp_path / "train.json").write_text('[{"prompt": "q", "answer": "a"}]')
    (tmp_path / "test.json").write_text("[]")
    with pytest.raises(CairnError, match="'test' split is empty"):
        load_task(TaskConfig(name="t", format="trace", path=str(tmp_path), metric="accuracy"))
    (tmp_path / "test.json").write_text('[{"prompt": "q", "answer": "a"}]')
    with pytest.raises(CairnError, match="unknown metric|Unknown metric|available"):
        load_task(TaskConfig(name="t", format="trace", path=str(tmp_path), metric="bleurt"))
    (tmp_path / "test.json").write_text('[{"prompt": "q", "answer": "a"},\n oops]')
    with pytest.raises(CairnError, match=r"test\.json, line 2: malformed JSON"):
        load_task(TaskConfig(name="t", format="trace", path=str(tmp_path), metric="accuracy"))


@pytest.mark.integration
def test_trace_pack_loads(data_dir):
    task = load_task(TaskConfig(name="FOMC", format="trace", path="trace/FOMC", metric="accuracy", max_test=20),
                     data_dir=data_dir)
    assert len(task.train) == 500 and len(task.test) == 20


@pytest.mark.integration
def test_trace_configs_load_every_task_from_the_pack(data_dir):
    from pathlib import Path

    from cairn.config import load_config

    repo = Path(__file__).resolve().parents[1]
    for name in ("trace-lora.yaml", "trace-methods.yaml"):
        cfg = load_config(repo / "configs" / name, [f"data_dir={data_dir / 'trace'}"])
        for task_cfg in cfg.tasks:
            task = load_task(task_cfg, cfg.data_dir)
            assert task.train and task.test, task_cfg.name


def test_max_prompt_tokens_reaches_generation(tmp_path, monkeypatch):
    # the task setting (TRACE's max_prompt_len) is what evaluation hands to generate()
    from cairn.eval import task_eval

    for split in ("train", "test"):
        (tmp_path / f"{split}.json").write_text(json.dumps([{"prompt": "a long transcript. Summary:", "answer": "A"}]))
    seen = {}

    def fake_generate(model, tokenizer, prompts, **kw):
        seen.update(kw)
        return ["A"] * len(prompts)

    monkeypatch.setattr(task_eval, "generate", fake_generate)
    for limit in (None, 1024):
        task = load_task(TaskConfig(name="t", format="trace", path=str(tmp_path), metric="exact_match",
                                    max_new_tokens=4, max_prompt_tokens=limit))
        assert task.max_prompt_tokens == limit
        task_eval.evaluate_task_metrics(None, None, task, progress=False)
        assert seen["max_prompt_tokens"] == limit
