"""cairn export: a round as a vanilla model or PEFT adapter with a model card; bad input refused cleanly."""

from __future__ import annotations

import json

import pytest
import torch

from cairn.cli import main
from cairn.config import config_from_dict
from cairn.experiment import run_experiment

FAST = {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "log_every": 1, "max_length": 64}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("run") / "exp"
    cfg = config_from_dict({
        "name": "exp", "model": str(tiny_model_dir),
        "tasks": [{"name": t, "format": "demo", "path": t, "entities": 2, "max_new_tokens": 4}
                  for t in ("zoology", "geography")],
        "methods": [{"name": "lora", "trainable": "lora", "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
                     "diagnostics": False}],
        "training": FAST, "evaluation": {"batch_size": 8}})
    assert run_experiment(cfg, out, progress=False)["status"] == {"lora": "ok"}
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merge_rebuilds_the_chain(run_dir, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert main(["export", str(run_dir), "--method", "lora", "--round", "2", "--merge", "--out",
                 str(tmp_path / "m2")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "m2").eval()
    # the chain by hand with vanilla PEFT: base, round 1 merged, round 2 merged
    rounds = run_dir / "lora" / "rounds"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(model, str(rounds / "01-zoology/adapter")).merge_and_unload()
    model = PeftModel.from_pretrained(model, str(rounds / "02-geography/adapter")).merge_and_unload().eval()
    ids = torch.tensor([[5, 17, 30, 44, 12, 9]])
    # same operations in the same order; float32 merge rounding at most
    torch.testing.assert_close(_logits(exported, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert (_logits(exported, ids) - _logits(base, ids)).abs().max() > 1e-3  # training changed something
    card = (tmp_path / "m2" / "README.md").read_text()
    assert "library_name: transformers" in card and "2. geography **(this round)**" in card
    assert "| zoology |" in card and "cairn 0." in card


def test_adapter_export_records_its_parent(run_dir, tmp_path):
    assert main(["export", str(run_dir), "--method", "lora", "--round", "2", "--out", str(tmp_path / "a2")]) == 0
    parent = json.loads((tmp_path / "a2" / "cairn_parent.json").read_text())
    assert parent["merged_rounds_first"] == [1] and "rounds 1..1 merged" in parent["applies_to"]
    assert (tmp_path / "a2" / "adapter_model.safetensors").is_file()
    card = (tmp_path / "a2" / "README.md").read_text()
    assert "library_name: peft" in card and "base with rounds 1..1 merged" in card
    assert main(["export", str(run_dir), "--method", "lora", "--round", "1", "--out", str(tmp_path / "a1")]) == 0
    assert json.loads((tmp_path / "a1" / "cairn_parent.json").read_text())["applies_to"] == "the raw base model"


def test_bad_exports_write_nothing(run_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "x"
    assert main(["export", str(run_dir), "--method", "lora", "--round", "3", "--out", str(out)]) == 2
    assert "no finished round 3; rounds: 1 (zoology), 2 (geography)" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--method", "nope", "--round", "1", "--out", str(out)]) == 2
    assert "methods here: lora" in capsys.readouterr().err
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored login
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    assert main(["export", str(run_dir), "--method", "lora", "--round", "1", "--out", str(out),
                 "--push-to-hub", "me/model"]) == 2
    err = capsys.readouterr().err
    assert "no Hugging Face credentials" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".tmp-x-*"))


def test_one_round_merge_is_base_plus_that_round_only(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = config_from_dict({
        "name": "one", "model": str(tiny_model_dir),
        "tasks": [{"name": t, "format": "demo", "path": t, "entities": 2, "max_new_tokens": 4}
                  for t in ("zoology", "geography")],
        "methods": [{"name": "solo", "strategy": "one-round", "trainable": "lora",
                     "lora": {"r": 2, "alpha": 4, "dropout": 0.0}, "diagnostics": False}],
        "training": FAST, "evaluation": {"batch_size": 8}})
    run = tmp_path / "one"
    assert run_experiment(cfg, run, progress=False)["status"] == {"solo": "ok"}
    assert main(["export", str(run), "--method", "solo", "--round", "2", "--merge", "--out", str(tmp_path / "e")]) == 0
    adapter = run / "solo" / "rounds" / "02-only-geography" / "adapter"
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter))
    ref = ref.merge_and_unload().eval()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "e").eval()
    ids = torch.tensor([[7, 8, 9, 10]])
    torch.testing.assert_close(_logits(exported, ids), _logits(ref, ids), rtol=1e-5, atol=1e-5)  # same merge ops
    assert main(["export", str(run), "--method", "solo", "--round", "2", "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "cairn_parent.json").read_text())["applies_to"] == "the raw base model"


def test_adapter_export_reads_both_round_layouts(run_dir, tmp_path):
    """rounds/NN-x/adapter/ as the PEFT adapter itself, or (older runs) adapter/round<k>/: same export."""
    import shutil

    from cairn.commands.export import adapter_dir

    flat = tmp_path / "flat"
    shutil.copytree(run_dir, flat)
    rdir = flat / "lora" / "rounds" / "02-geography"
    nested = rdir / "adapter" / "round2"
    if nested.is_dir():  # written in the older layout: move the adapter up one level
        for item in nested.iterdir():
            shutil.move(str(item), rdir / "adapter" / item.name)
        nested.rmdir()
    assert adapter_dir(rdir, 2) == rdir / "adapter"
    old = run_dir / "lora" / "rounds" / "02-geography"
    assert adapter_dir(old, 2) in (old / "adapter", old / "adapter" / "round2")
    assert adapter_dir(tmp_path, 2) is None
    for src, out in ((run_dir, tmp_path / "a-old"), (flat, tmp_path / "a-flat")):
        assert main(["export", str(src), "--method", "lora", "--round", "2", "--out", str(out)]) == 0
    assert ((tmp_path / "a-flat" / "adapter_model.safetensors").read_bytes()
            == (tmp_path / "a-old" / "adapter_model.safetensors").read_bytes())
    parent = json.loads((tmp_path / "a-flat" / "cairn_parent.json").read_text())
    assert parent["merged_rounds_first"] == [1]
