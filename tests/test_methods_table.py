"""Every registered method joins this table: it trains on a tiny model, saves, restores, resumes, reports.

A registration (trainable, strategy or part) without a row here fails ``test_table_covers_registry``,
so a new method is tested the day it is added.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cairn.config import config_from_dict
from cairn.experiment import run_experiment
from cairn.methods import registry

FAST = {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "log_every": 1, "max_length": 64}
LORA = {"r": 2, "alpha": 4}

# registry name -> one method config that exercises it (and the loss term it must log in round 2)
TABLE = {
    "full": ({"trainable": "full"}, None),
    "lora": ({"trainable": "lora", "lora": LORA}, None),
    "loramoe": ({"trainable": "loramoe", "loramoe": {"experts": 2, "rank": 2}}, "loramoe_balance"),
    "sequential": ({"trainable": "lora", "strategy": "sequential", "lora": LORA}, None),
    "joint": ({"trainable": "lora", "strategy": "joint", "lora": LORA}, None),
    "one-round": ({"trainable": "full", "strategy": "one-round"}, None),
    "replay": ({"trainable": "full", "replay": 0.5}, None),
    "olora": ({"trainable": "lora", "lora": LORA, "olora": {"lambda1": 0.5}}, "olora_orth"),
    "nlora": ({"trainable": "lora", "lora": LORA, "nlora": {"lam": 1e-3}}, "nlora_l1"),
    "ewc": ({"trainable": "full", "ewc": {"lam": 10.0, "fisher_examples": 3}}, "ewc"),
}


def test_table_covers_registry():
    registered = set(registry.trainables()) | set(registry.strategies()) | set(registry.parts())
    assert registered == set(TABLE), f"add a row for {sorted(registered - set(TABLE))}"


def _cfg(model_dir, method: dict):
    return config_from_dict({
        "name": "t", "model": str(model_dir),
        "tasks": [{"name": t, "format": "demo", "path": t, "entities": 2, "max_new_tokens": 4,
                   "world_knowledge": t == "zoology"} for t in ("zoology", "geography")],
        "methods": [{"name": "m"} | method], "training": FAST, "evaluation": {"batch_size": 8},
    })


@pytest.mark.parametrize("name", sorted(TABLE))
def test_method_trains_saves_restores_resumes_reports(name, tmp_path, tiny_model_dir):
    method, term = TABLE[name]
    cfg = _cfg(tiny_model_dir, method)
    exp = tmp_path / "exp"
    first = run_experiment(cfg, exp, progress=False, echo=False)
    assert first["status"] == {"m": "ok"}, first["status"]
    res = json.loads((exp / "m" / "results.json").read_text())
    assert res["schema_version"] == 2 and res["strategy"] == cfg.methods[0].strategy and res["seed"] == 0
    rounds = sorted((exp / "m" / "rounds").iterdir())
    assert len(res["rows"]) == len(rounds) + 1
    if term is not None:
        logged = json.loads((rounds[-1] / "round.json").read_text())["train"]["log"][-1]
        assert term in logged, logged
    # resume: the last round and the results are gone; the rerun restores round k-1 from its artifacts
    (exp / "m" / "results.json").unlink()
    (rounds[-1] / "round.json").unlink()
    again = run_experiment(cfg, exp, progress=False, echo=False)["results"]["m"]
    # the same seed, data and kernels: the rerun round is identical
    assert again["matrix"] == first["results"]["m"]["matrix"]
    from cairn.report import build_report

    report = build_report([exp])
    assert report.is_file() and ">m<" in report.read_text()  # the method appears in the comparison report


def test_seeded_layout(tmp_path, tiny_model_dir):
    cfg = _cfg(tiny_model_dir, TABLE["lora"][0])
    out = run_experiment(cfg, tmp_path / "exp", progress=False, echo=False, seed=3)
    assert out["status"] == {"m": "ok"}
    res = json.loads((tmp_path / "exp/m/seed-3/results.json").read_text())
    assert res["seed"] == 3 and (tmp_path / "exp/base/round.json").is_file()


def test_ewc_penalty_on_hand_built_tensors():
    from cairn.methods.ewc import ewc_penalty

    theta = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.5])}
    round1 = ({"w": torch.tensor([1.0, 0.0, 2.0]), "b": torch.tensor([4.0])},
              {"w": torch.tensor([0.0, 0.0, 0.0]), "b": torch.tensor([0.0])})
    round2 = ({"w": torch.tensor([0.5, 0.5, 0.5])}, {"w": torch.tensor([1.0, 1.0, 1.0])})
    # round 1: 1·1² + 0·2² + 2·3² + 4·0.5² = 1 + 18 + 1 = 20; round 2: 0.5·(0 + 1 + 4) = 2.5
    value = ewc_penalty(theta, [round1, round2], lam=2.0)
    assert value.item() == pytest.approx(0.5 * 2.0 * 22.5)
    assert ewc_penalty(theta, [], lam=2.0).item() == 0.0


def test_ewc_gradient_pulls_toward_the_anchor():
    from cairn.methods.ewc import EWCLoss

    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -1.0]]))
    loss = EWCLoss([({"weight": torch.ones(1, 2)}, {"weight": torch.zeros(1, 2)})], lam=1.0)
    loss.extra_loss(model, {}, None)["ewc"].backward()
    assert torch.equal(model.weight.grad, torch.tensor([[1.0, -1.0]]))  # λ·F·(θ−θ*), exact in float32


def test_ewc_records_its_fisher_examples_and_rejects_lora(tmp_path, tiny_model_dir):
    from cairn.errors import CairnError

    cfg = _cfg(tiny_model_dir, TABLE["ewc"][0])
    run_experiment(cfg, tmp_path / "exp", progress=False, echo=False)
    record = json.loads((tmp_path / "exp/m/rounds/01-zoology/ewc.json").read_text())
    assert record["fisher_examples"] == 3 and len(record["indices"]) == 3
    with pytest.raises(CairnError, match="EWC keeps the same parameters"):
        _cfg(tiny_model_dir, {"trainable": "lora", "ewc": {"lam": 1.0}})
    with pytest.raises(CairnError, match=r"unknown key 'lambda' in methods\[0\]\.ewc"):
        _cfg(tiny_model_dir, {"trainable": "full", "ewc": {"lambda": 1.0}})


def test_wrong_merge_method_fails_before_any_training(tmp_path, tiny_model_dir):
    from cairn.errors import CairnError

    cfg = config_from_dict({
        "name": "t", "model": str(tiny_model_dir), "tasks": [{"name": "zoology", "format": "demo", "entities": 2}],
        "methods": [{"name": "one", "strategy": "one-round", "trainable": "full"}],
        "combine": [{"name": "c", "source": "one", "method": "tie"}], "training": FAST,
    })
    with pytest.raises(CairnError, match="unknown merge method 'tie'"):
        run_experiment(cfg, tmp_path / "exp", progress=False, echo=False)
    assert not (tmp_path / "exp").exists()  # nothing trained, nothing written
