"""The run-directory module: seed layout, results schema upgrade, and `cairn eval` finding a round's artifact."""

from __future__ import annotations

import json

import pytest

from cairn import rundir
from cairn.errors import CairnError


def test_method_paths_single_and_seeded(tmp_path):
    run = rundir.RunDir(tmp_path)
    assert run.method("lora").round(2, "geo") == tmp_path / "lora/rounds/02-geo"
    assert run.method("lora", seed=1).results == tmp_path / "lora/seed-1/results.json"
    for s in (10, 2):
        (tmp_path / "lora" / f"seed-{s}").mkdir(parents=True)
    assert [d.path.name for d in run.method_dirs("lora")] == ["seed-2", "seed-10"]  # numeric order


def test_results_schema_upgrade_and_future_version(tmp_path):
    old = tmp_path / "results.json"
    old.write_text(json.dumps({"name": "x", "rows": [], "matrix": []}))
    data = rundir.read_results(old)
    assert data["schema_version"] == rundir.SCHEMA_VERSION and data["strategy"] is None and data["seed"] is None
    old.write_text(json.dumps({"schema_version": rundir.SCHEMA_VERSION + 1}))
    with pytest.raises(CairnError, match="upgrade cairn"):
        rundir.read_results(old)


def test_eval_resolves_the_last_rounds_artifact_of_a_run_directory(tmp_path):
    """`cairn eval <method dir without config.yaml>` finds rounds/NN-x/model/ and rounds/NN-x/adapter/<name>/."""
    from cairn.commands.eval import resolve_artifact

    mdir = tmp_path / "fft"
    (mdir / "rounds/01-a/model").mkdir(parents=True)
    (mdir / "rounds/01-a/model/config.json").write_text("{}")
    (mdir / "rounds/02-b/model").mkdir(parents=True)
    (mdir / "rounds/02-b/model/config.json").write_text("{}")
    assert resolve_artifact(str(mdir)) == (str(mdir / "rounds/02-b/model"), None)
    lora = tmp_path / "lora"
    adapter = lora / "rounds/01-a/adapter/round1"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "some-base"}))
    assert resolve_artifact(str(lora)) == ("some-base", str(adapter))
    with pytest.raises(CairnError, match="not a run directory"):
        resolve_artifact(str(tmp_path / "fft/rounds"))


def test_one_lora_scaling_rule_rslora_and_patterns():
    from cairn.io.adapters import lora_scaling

    cfg = {"r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj": 16}, "alpha_pattern": {"layers.0.v_proj": 2}}
    assert lora_scaling(cfg, "model.layers.1.k_proj") == 2.0
    assert lora_scaling(cfg, "model.layers.1.q_proj") == 0.5  # rank from rank_pattern: 8 / 16
    assert lora_scaling(cfg, "model.layers.0.v_proj") == 0.5  # alpha from alpha_pattern: 2 / 4
    assert lora_scaling(cfg | {"use_rslora": True}, "model.layers.1.k_proj") == 4.0  # 8 / sqrt(4)
