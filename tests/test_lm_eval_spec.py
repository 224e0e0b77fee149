"""The lm-eval backend takes what `cairn eval` takes: a run directory, an adapter folder, a model; it picks
the device and honours --dtype."""

from __future__ import annotations

import json

import pytest

from cairn.cli import main
from cairn.config import config_from_dict
from cairn.experiment import run_experiment

ARC = [{"id": str(i), "question": f"Which word comes next {i}?",
        "choices": {"text": ["fox", "dog", "quick brown"], "label": ["A", "B", "C"]}, "answerKey": "ABC"[i % 3]}
       for i in range(6)]


@pytest.fixture(scope="module")
def run_and_data(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("lmeval")
    cfg = config_from_dict({
        "name": "exp", "model": str(tiny_model_dir),
        "tasks": [{"name": t, "format": "demo", "path": t, "entities": 2, "max_new_tokens": 4}
                  for t in ("zoology", "geography")],
        "methods": [{"name": "lora", "trainable": "lora", "lora": {"r": 2, "alpha": 4}, "diagnostics": False}],
        "training": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "max_length": 64}})
    assert run_experiment(cfg, root / "exp", progress=False)["status"] == {"lora": "ok"}
    data = root / "data" / "old_knowledge" / "arc_easy"
    data.mkdir(parents=True)
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ARC))
    return root / "exp", root / "data"


def test_resolve_model_spec(run_and_data, tiny_model_dir):
    import torch

    from cairn.eval.lm_eval_backend import default_device, resolve_model

    run, _ = run_and_data
    model, tokenizer, args = resolve_model(str(run / "lora"), device="cpu")
    assert isinstance(model, torch.nn.Module) and tokenizer is not None and args == ""
    assert next(model.parameters()).device.type == "cpu"
    adapter = run / "lora" / "rounds" / "01-zoology" / "adapter"
    path, tok, args = resolve_model(str(adapter))
    assert path == str(tiny_model_dir) and tok is None and args == f"peft={adapter}"
    assert default_device() == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.integration
def test_lm_eval_on_a_run_directory_matches_cairn(run_and_data, tmp_path):
    pytest.importorskip("lm_eval")
    run, data = run_and_data
    outs = {}
    for backend in ("cairn", "lm-eval"):
        out = tmp_path / f"{backend}.json"
        assert main(["eval", str(run / "lora"), "--backend", backend, "--tasks", "arc_easy", "--data-dir", str(data),
                     "--batch-size", "4", "--no-progress", "--output", str(out)]) == 0
        outs[backend] = json.loads(out.read_text())["results"]["arc_easy"]
    # same rebuilt model (rounds 1..2 merged), same questions: the same answers
    assert outs["lm-eval"]["acc"] == outs["cairn"]["acc"] and outs["lm-eval"]["n"] == 6
    assert outs["lm-eval"]["acc_norm"] == outs["cairn"]["acc_norm"]
