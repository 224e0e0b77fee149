"""Bad task data: a table of malformed files, each refused when the task loads with a message naming
the file, the line (or byte offset) and the field, before any model loads or anything is written."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cairn.config import TaskConfig
from cairn.data.tasks import load_task
from cairn.errors import CairnError

GOOD = [{"prompt": "Capital of France?", "answer": "Paris"}, {"prompt": "Capital of Peru?", "answer": "Lima"}]
GOOD_JSON = json.dumps(GOOD)
GOOD_JSONL = "".join(json.dumps(r) + "\n" for r in GOOD)
CONV = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4"}]}
GOOD_MSGS = json.dumps(CONV) + "\n"
DIR = object()  # a directory where a file is expected


def rows(*items) -> str:
    """A JSON list with one item per line, so item k starts on line k + 1."""
    return "[\n" + ",\n".join(items) + "\n]"


def msgs(*turns) -> str:
    return json.dumps({"messages": list(turns)}) + "\n"


def turn(role, content):
    return {"role": role, "content": content}


@dataclass
class Case:
    id: str
    files: dict  # relative path -> str | bytes | DIR
    expect: list[str]  # fragments the message must contain (literally)
    cfg: dict = field(default_factory=dict)


def trace(train=GOOD_JSON, test=GOOD_JSON, **cfg) -> tuple[dict, dict]:
    files = {}
    if train is not None:
        files["t/train.json"] = train
    if test is not None:
        files["t/test.json"] = test
    return files, cfg


def jsonl(train=GOOD_JSONL, test=GOOD_JSONL, **cfg):
    return {"t/train.jsonl": train, "t/test.jsonl": test}, {"format": "jsonl"} | cfg


def messages(train=GOOD_MSGS, test=GOOD_MSGS, **cfg):
    return {"t/train.jsonl": train, "t/test.jsonl": test}, {"format": "messages"} | cfg


def case(id, spec, *expect):
    files, cfg = spec
    return Case(id, files, list(expect), cfg)


ITEM = '{"prompt": "q", "answer": "a"}'
CASES = [
    # --- JSON lists (format: trace): syntax
    case("json-missing-comma-in-object", trace(train=rows(ITEM, '{"prompt": "q" "answer": "a"}')),
         "train.json, line 3: malformed JSON", "Expecting ',' delimiter"),
    case("json-missing-comma-between-items", trace(train='[\n' + ITEM + '\n' + ITEM + '\n]'),
         "train.json, line 3: malformed JSON", "expected `,` or `]` after item 1"),
    case("json-trailing-comma", trace(train='[\n' + ITEM + ',\n]'), "train.json, line 3", "trailing comma"),
    case("json-unclosed-list", trace(train='[\n' + ITEM + ',\n' + ITEM), "train.json", "no closing `]`",
         "truncated"),
    case("json-truncated-object", trace(train='[\n' + ITEM + ',\n{"prompt": "q", "ans'), "train.json, line 3",
         "malformed JSON"),
    case("json-extra-data", trace(test=GOOD_JSON + '\n{"prompt": "x"}'), "test.json, line 2",
         "extra data after the closing `]`"),
    case("json-object-not-list", trace(train=ITEM), "train.json, line 1", "expected a JSON list", "format: jsonl"),
    case("json-string-not-list", trace(train='"hello"'), "train.json, line 1", "expected a JSON list"),
    case("json-empty-file", trace(train=""), "train.json: the file is empty"),
    case("json-whitespace-file", trace(test="  \n\n"), "test.json: the file is empty"),
    case("json-nan-garbage", trace(train=rows(ITEM, "{prompt: 'q'}")), "train.json, line 3: malformed JSON",
         "property name"),
    # --- empty splits
    case("json-empty-train-list", trace(train="[]"), "'train' split is empty", "train.json holds no examples"),
    case("json-empty-test-list", trace(test="[ ]"), "'test' split is empty", "test.json holds no examples"),
    case("jsonl-blank-lines-only", jsonl(train="\n\n  \n"), "'train' split is empty", "train.jsonl"),
    case("jsonl-empty-test-file", jsonl(test=""), "'test' split is empty", "test.jsonl"),
    # --- items that are not objects
    case("json-item-string", trace(train=rows(ITEM, '"just text"')), "train.json, line 3",
         "expected an object with fields 'prompt' and 'answer', got a string"),
    case("json-item-list", trace(test=rows('["q", "a"]')), "test.json, line 2", "got a list"),
    case("json-item-null", trace(train=rows(ITEM, ITEM, "null")), "train.json, line 4", "got null"),
    case("jsonl-line-is-list", jsonl(train=GOOD_JSONL + '["q", "a"]\n'), "train.jsonl, line 3", "got a list"),
    case("jsonl-given-a-json-list", jsonl(train=GOOD_JSON), "train.jsonl, line 1", "got a list"),
    # --- fields
    case("json-missing-answer", trace(train=rows(ITEM, '{"prompt": "q"}')), "train.json, line 3",
         "no 'answer' field (fields: prompt)", "answer_field"),
    case("json-missing-prompt", trace(test=rows('{"question": "q", "answer": "a"}')), "test.json, line 2",
         "no 'prompt' field (fields: question, answer)", "prompt_field"),
    case("json-answer-number", trace(train=rows('{"prompt": "q", "answer": 42}')), "train.json, line 2",
         "field 'answer' is a number, not a string"),
    case("json-prompt-null", trace(train=rows('{"prompt": null, "answer": "a"}')), "train.json, line 2",
         "field 'prompt' is null"),
    case("json-answer-list", trace(test=rows(ITEM, '{"prompt": "q", "answer": ["a"]}')), "test.json, line 3",
         "field 'answer' is a list"),
    case("wrong-prompt-field-mapping", trace(prompt_field="question"), "train.json, line 1",
         "no 'question' field (fields: prompt, answer)"),
    case("wrong-train-answer-field", trace(train_answer_field="response"), "train.json, line 1",
         "no 'response' field"),
    case("wrong-test-prompt-field", jsonl(test_prompt_field="query"), "test.jsonl, line 1", "no 'query' field"),
    case("jsonl-missing-field-line-2", jsonl(train='{"prompt": "q", "answer": "a"}\n{"prompt": "q"}\n'),
         "train.jsonl, line 2", "no 'answer' field"),
    # --- empty answers and prompts (refused: they cannot be learnt or scored)
    case("json-empty-answer", trace(train=rows(ITEM, '{"prompt": "q", "answer": ""}')), "train.json, line 3",
         "empty answer (field 'answer')"),
    case("json-whitespace-answer", trace(test=rows('{"prompt": "q", "answer": " \\n "}')), "test.json, line 2",
         "empty answer"),
    case("json-two-empty-answers", trace(train=rows('{"prompt": "q", "answer": ""}', ITEM,
                                                    '{"prompt": "q", "answer": ""}')),
         "train.json, line 2", "empty answer", "(1 more in"),
    case("json-empty-prompt", trace(train=rows('{"prompt": "", "answer": "a"}')), "train.json, line 2",
         "empty prompt (field 'prompt')"),
    case("jsonl-empty-answer", jsonl(test=GOOD_JSONL + '{"prompt": "q", "answer": ""}\n'), "test.jsonl, line 3",
         "empty answer"),
    # --- encodings
    case("json-latin1-byte", trace(train=b'[{"prompt": "caf\xe9", "answer": "a"}]'), "train.json: not valid UTF-8",
         "byte 0xe9 at byte offset 16 (line 1)"),
    case("json-bad-byte-line-3", trace(test=b'[\n{"prompt": "q", "answer": "a"},\n{"prompt": "\xff", "answer": "a"}]'),
         "test.json: not valid UTF-8", "byte 0xff at byte offset 46 (line 3)"),
    case("json-utf16", trace(train=GOOD_JSON.encode("utf-16")), "train.json: not valid UTF-8", "UTF-16",
         "byte offset 0"),
    case("jsonl-bad-byte-line-2", jsonl(train=GOOD_JSONL.encode() + b'{"prompt": "\xc3(", "answer": "a"}\n'),
         "train.jsonl: not valid UTF-8", "(line 3)"),
    case("jsonl-truncated-utf8", jsonl(test=GOOD_JSONL.encode() + '{"prompt": "é'.encode()[:-1]),
         "test.jsonl: not valid UTF-8", "(line 3)"),
    # --- JSONL syntax
    case("jsonl-malformed-line-3", jsonl(train=GOOD_JSONL + '{"prompt": "q", answer: "a"}\n'),
         "train.jsonl, line 3: malformed JSON"),
    case("jsonl-two-objects-one-line", jsonl(test=ITEM + " " + ITEM + "\n"), "test.jsonl, line 1: malformed JSON",
         "Extra data"),
    case("jsonl-truncated-last-line", jsonl(train=GOOD_JSONL + '{"prompt": "q", "ans'),
         "train.jsonl, line 3: malformed JSON"),
    # --- missing or directory-shaped files
    case("missing-train-file", trace(train=None), "training file", "train.json does not exist",
         "(the folder has: test.json)", "train_path"),
    case("missing-test-file", trace(test=None), "test file", "test.json does not exist", "test_path"),
    case("train-file-is-directory", ({"t/train.json": DIR, "t/test.json": GOOD_JSON}, {}),
         "train.json is a directory, not a file"),
    case("test-file-is-directory", ({"t/train.jsonl": GOOD_JSONL, "t/test.jsonl": DIR}, {"format": "jsonl"}),
         "test.jsonl is a directory, not a file"),
    case("task-folder-missing", ({"other/train.json": GOOD_JSON}, {}), "training source", "/t does not exist"),
    case("path-is-a-file", ({"t.json": GOOD_JSON}, {"path": "t.json"}), "path", "t.json is a file",
         "train_path"),
    case("train-path-missing", ({"t/test.json": GOOD_JSON}, {"train_path": "metamath/train.json"}),
         "training source", "metamath/train.json does not exist"),
    case("train-path-is-directory", ({"t/test.json": GOOD_JSON, "mm/train.json": DIR},
                                     {"train_path": "mm/train.json"}),
         "training file", "mm/train.json is a directory, not a file"),
    case("test-path-folder-without-file", ({"t/train.json": GOOD_JSON, "gsm/train.jsonl": GOOD_JSONL},
                                           {"test_path": "gsm", "test_format": "jsonl"}),
         "test file", "gsm/test.jsonl does not exist", "(the folder has: train.jsonl)"),
    # --- messages
    case("messages-field-missing", messages(train=json.dumps({"turns": []}) + "\n"), "train.jsonl, line 1",
         "no 'messages' field (fields: turns)", "messages_field"),
    case("messages-not-a-list", messages(train=json.dumps({"messages": "hi"}) + "\n"), "train.jsonl, line 1",
         "must be a non-empty list", "got a string"),
    case("messages-empty-list", messages(test=GOOD_MSGS + msgs()), "test.jsonl, line 2", "got an empty list"),
    case("messages-turn-without-content", messages(train=msgs({"role": "user"}, turn("assistant", "a"))),
         "train.jsonl, line 1", "turn 1 must be an object with 'role' and 'content'"),
    case("messages-turn-is-string", messages(train=msgs("hello", turn("assistant", "a"))), "train.jsonl, line 1",
         "turn 1 must be an object"),
    case("messages-unknown-role", messages(train=msgs(turn("user", "q"), turn("asistant", "a"))),
         "train.jsonl, line 1", "turn 2 has role 'asistant'"),
    case("messages-last-turn-user", messages(test=msgs(turn("user", "q"), turn("assistant", "a"), turn("user", "?"))),
         "test.jsonl, line 1", "the last turn is 'user'"),
    case("messages-no-user-turn", messages(train=msgs(turn("system", "s"), turn("assistant", "a"))),
         "train.jsonl, line 1", "no user turn before the answer"),
    case("messages-content-number", messages(train=GOOD_MSGS + msgs(turn("user", 7), turn("assistant", "a"))),
         "train.jsonl, line 2", "turn 1: 'content' is a number"),
    case("messages-empty-answer", messages(test=msgs(turn("user", "q"), turn("assistant", "  "))),
         "test.jsonl, line 1", "empty answer (the last assistant turn)"),
    case("messages-malformed-line", messages(train=GOOD_MSGS + '{"messages": [}\n'), "train.jsonl, line 2",
         "malformed JSON"),
    # --- metrics that cannot score the answers
    case("gsm8k-on-words", trace(metric="gsm8k"), "test.json, line 1", "metric 'gsm8k' compares final numbers",
         "'Paris'"),
    case("numeric-accuracy-on-words", jsonl(metric="numeric_accuracy"), "'numeric_accuracy' compares numbers",
         "test.jsonl"),
    case("unknown-metric", trace(metric="bleurt"), "task 't': unknown metric 'bleurt'"),
    case("unknown-second-metric", trace(metrics=["exact_match", "bleu"]), "unknown metric 'bleu'"),
    case("split-map-unknown-key", trace(split_map={"dev": "x"}), "task 't': split_map key 'dev'"),
]


def _write(root: Path, files: dict) -> None:
    for rel, content in files.items():
        path = root / rel
        if content is DIR:
            path.mkdir(parents=True)
            (path / "placeholder.txt").write_text("not data")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_the_table_is_large_and_its_ids_unique():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_bad_task_data_is_refused_at_load_naming_file_and_line(bad: Case, tmp_path):
    _write(tmp_path, bad.files)
    before = _tree(tmp_path)
    cfg = TaskConfig(**({"name": "t", "path": "t", "metric": "exact_match"} | bad.cfg))
    with pytest.raises(CairnError) as info:
        load_task(cfg, data_dir=tmp_path)
    message = str(info.value)
    for fragment in bad.expect:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert _tree(tmp_path) == before  # nothing written, nothing half-done


def test_byte_order_mark_is_accepted(tmp_path):
    _write(tmp_path, {"a/train.json": "\ufeff" + GOOD_JSON, "a/test.json": GOOD_JSON,
                      "b/train.jsonl": GOOD_JSONL, "b/test.jsonl": "\ufeff" + GOOD_JSONL})
    assert load_task(TaskConfig(name="t", path="a", metric="exact_match"), data_dir=tmp_path).train == GOOD
    assert load_task(TaskConfig(name="t", path="b", format="jsonl", metric="exact_match"),
                     data_dir=tmp_path).test == GOOD


def test_runner_refuses_before_loading_a_model_or_writing(tmp_path):
    """The experiment runner loads every task before the tokenizer/model and before creating the run directory."""
    from cairn.config import config_from_dict
    from cairn.experiment import Runner

    _write(tmp_path, {"t/test.json": GOOD_JSON})  # no train.json
    cfg = config_from_dict({"name": "x", "model": str(tmp_path / "no-model-here"), "data_dir": str(tmp_path),
                            "tasks": [{"name": "t", "path": "t", "metric": "exact_match"}],
                            "methods": [{"name": "m"}]})
    with pytest.raises(CairnError, match=r"train\.json does not exist"):  # not the missing model
        Runner(cfg, tmp_path / "run", progress=False, echo=False)
    assert not (tmp_path / "run").exists()


def test_cli_non_utf8_data_exits_2_naming_the_file(tmp_path):
    _write(tmp_path, {"t/train.json": b'[{"prompt": "\xe9", "answer": "a"}]', "t/test.json": GOOD_JSON})
    config = tmp_path / "exp.yaml"
    config.write_text(f"name: x\nmodel: {tmp_path / 'no-model'}\ndata_dir: {tmp_path}\n"
                      "tasks: [{name: t, path: t, metric: exact_match}]\nmethods: [{name: m}]\n")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "cairn.cli", "run", str(config), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env={"PYTHONPATH": str(repo / "src"), "PATH": ""})
    assert proc.returncode == 2, proc.stderr
    assert "train.json: not valid UTF-8: byte 0xe9 at byte offset 13 (line 1)" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
