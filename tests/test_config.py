"""Typed configs: unknown keys rejected with key and file named, overrides, validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cairn.config import load_config
from cairn.errors import CairnError

REPO = Path(__file__).resolve().parents[1]

MINIMAL = {
    "name": "t",
    "model": "some/model",
    "tasks": [{"name": "a", "format": "demo", "path": "zoology"}],
    "methods": [{"name": "lora", "trainable": "lora"}],
}


def _write(tmp_path, data) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_minimal_config_loads_with_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, MINIMAL))
    assert cfg.training.batch_size == 8 and cfg.methods[0].lora.sequential == "merge"
    assert cfg.training_for(cfg.methods[0]).lr == cfg.training.lr


def test_unknown_top_level_key_names_key_and_file(tmp_path):
    path = _write(tmp_path, MINIMAL | {"learning_rate": 1})
    with pytest.raises(CairnError, match=r"exp\.yaml: unknown key 'learning_rate' in the top level"):
        load_config(path)


def test_unknown_nested_key_suggests_the_close_one(tmp_path):
    data = MINIMAL | {"methods": [{"name": "x", "trainable": "lora", "lora": {"rank": 4}}]}
    with pytest.raises(CairnError, match=r"unknown key 'rank' in methods\[0\]\.lora"):
        load_config(_write(tmp_path, data))


def test_unknown_key_in_method_training_override(tmp_path):
    data = MINIMAL | {"methods": [{"name": "x", "training": {"lr": 1e-3, "epoch": 2}}]}
    with pytest.raises(CairnError, match=r"unknown key 'epoch'.*did you mean 'epochs'"):
        load_config(_write(tmp_path, data))


def test_wrong_type_and_literal(tmp_path):
    with pytest.raises(CairnError, match=r"training\.batch_size: expected int"):
        load_config(_write(tmp_path, MINIMAL | {"training": {"batch_size": "big"}}))
    bad = MINIMAL | {"methods": [{"name": "x", "trainable": "qlora"}]}
    with pytest.raises(CairnError, match=r"'qlora' is not one of"):
        load_config(_write(tmp_path, bad))


def test_overrides_apply_to_nested_and_list_items(tmp_path):
    cfg = load_config(_write(tmp_path, MINIMAL), ["training.lr=0.5", "methods.0.lora.r=3", "seed=7"])
    assert cfg.training.lr == 0.5 and cfg.methods[0].lora.r == 3 and cfg.seed == 7
    with pytest.raises(CairnError, match="unknown key 'nope'"):
        load_config(_write(tmp_path, MINIMAL), ["training.nope=1"])
    with pytest.raises(CairnError, match="KEY=VALUE"):
        load_config(_write(tmp_path, MINIMAL), ["training.lr"])


def test_task_without_metric_and_missing_file(tmp_path):
    data = MINIMAL | {"tasks": [{"name": "x", "format": "trace", "path": "x"}]}
    with pytest.raises(CairnError, match="task 'x' has no metric"):
        load_config(_write(tmp_path, data))
    with pytest.raises(CairnError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_method_validation(tmp_path):
    fft_olora = MINIMAL | {"methods": [{"name": "x", "trainable": "full", "olora": {"lambda1": 0.5}}]}
    with pytest.raises(CairnError, match="O-LoRA constrains LoRA adapters"):
        load_config(_write(tmp_path, fft_olora))
    bad_replay = MINIMAL | {"methods": [{"name": "x", "replay": 1.5}]}
    with pytest.raises(CairnError, match=r"replay must be in \[0, 1\]"):
        load_config(_write(tmp_path, bad_replay))
    negative = MINIMAL | {"methods": [{"name": "x", "nlora": {"lam": [0.4, -1]}}]}
    with pytest.raises(CairnError, match="nlora.lam must be >= 0"):
        load_config(_write(tmp_path, negative))


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path, ["data_dir=/nonexistent"])
    assert cfg.tasks and cfg.methods


def test_demo_config_in_package_matches_configs_dir():
    from cairn.commands.demo import demo_config_path

    assert demo_config_path().read_text() == (REPO / "configs" / "demo.yaml").read_text()


def test_combine_params_are_typed_at_load(tmp_path):
    data = MINIMAL | {"methods": [{"name": "one", "strategy": "one-round"}],
                      "combine": [{"name": "c", "source": "one", "kind": "merge", "params": {"densty": 0.2}}]}
    with pytest.raises(CairnError, match=r"exp\.yaml: unknown key 'densty' in combine\[c\]\.params.*'density'"):
        load_config(_write(tmp_path, data))
    data["combine"] = [{"name": "c", "source": "one", "kind": "moe", "params": {"top_k": 1},
                        "router_training": {"lr": 1e-3, "epoch": 1}}]
    with pytest.raises(CairnError, match=r"unknown key 'epoch' in combine\[c\]\.router_training"):
        load_config(_write(tmp_path, data))
