"""Safe resume: the fingerprint of a method's settings and data, and the diff that names what changed."""

from __future__ import annotations

import json

import pytest

from cairn.config import config_from_dict
from cairn.errors import CairnError
from cairn.fingerprint import check_fingerprint, diff, method_fingerprint


def _cfg(data_dir, **over):
    base = {"name": "e", "model": "m", "data_dir": str(data_dir),
            "tasks": [{"name": "a", "format": "jsonl", "path": "a", "metric": "exact_match"},
                      {"name": "z", "format": "demo", "path": "zoology"}],
            "methods": [{"name": "lora", "trainable": "lora"}], "training": {"lr": 1e-4, "log_every": 5}}
    return config_from_dict(base | over)


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "data" / "a"
    d.mkdir(parents=True)
    (d / "train.jsonl").write_text('{"prompt": "p", "answer": "x"}\n')
    return tmp_path / "data"


def test_same_config_same_fingerprint_logging_keys_ignored(data):
    cfg = _cfg(data)
    fp = method_fingerprint(cfg, cfg.methods[0])
    assert list(fp["data"]) == ["a"] and fp["data"]["a"]["train.jsonl"]["size"] == 31
    other = _cfg(data, training={"lr": 1e-4, "log_every": 50},  # logging cadence changes no weights
                 methods=[{"name": "lora", "trainable": "lora", "diagnostics": False}])
    assert diff(fp, method_fingerprint(other, other.methods[0])) == []


def test_diff_names_the_changed_keys(data):
    cfg = _cfg(data)
    fp = method_fingerprint(cfg, cfg.methods[0])
    changed = _cfg(data, methods=[{"name": "lora", "trainable": "lora", "training": {"lr": 3e-4},
                                   "lora": {"r": 16}}])
    keys = [k for k, _, _ in diff(fp, method_fingerprint(changed, changed.methods[0]))]
    # a method's training override is compared where it takes effect: the resolved training settings
    assert keys == ["method.lora.r", "training.lr"]
    (data / "a" / "train.jsonl").write_text('{"prompt": "p", "answer": "y"}\n')  # same size, new content
    keys = [k for k, _, _ in diff(fp, method_fingerprint(cfg, cfg.methods[0]))]
    assert keys == ["data.a.train.jsonl.sha256"]


def test_check_refuses_then_overwrite_starts_again(tmp_path, data):
    cfg = _cfg(data)
    mdir = tmp_path / "run" / "lora"
    fp = method_fingerprint(cfg, cfg.methods[0])
    assert check_fingerprint(mdir, fp) == "new"
    (mdir / "rounds").mkdir()
    assert check_fingerprint(mdir, fp) == "same"
    new = _cfg(data, training={"lr": 2e-4})
    fp2 = method_fingerprint(new, new.methods[0])
    with pytest.raises(CairnError, match=r"training\.lr: 0\.0001 -> 0\.0002.*--overwrite"):
        check_fingerprint(mdir, fp2)
    assert json.loads((mdir / "fingerprint.json").read_text())["training"]["lr"] == 1e-4  # untouched
    assert check_fingerprint(mdir, fp2, overwrite=True) == "overwrite"
    assert not (mdir / "rounds").exists()  # the method starts again
    assert json.loads((mdir / "fingerprint.json").read_text())["training"]["lr"] == 2e-4
    assert [p.name for p in mdir.parent.iterdir()] == ["lora"]  # no leftovers


def test_curriculum_order_change_is_named(data):
    cfg = _cfg(data)
    swapped = _cfg(data, tasks=list(reversed([{"name": "a", "format": "jsonl", "path": "a", "metric": "exact_match"},
                                              {"name": "z", "format": "demo", "path": "zoology"}])))
    keys = [k for k, _, _ in diff(method_fingerprint(cfg, cfg.methods[0]),
                                  method_fingerprint(swapped, swapped.methods[0]))]
    assert "tasks.names" in keys


def test_gradient_checkpointing_is_not_part_of_the_fingerprint(tmp_path, data):
    """A run that ran out of memory resumes with checkpointing on: same fingerprint, also against a
    fingerprint stored before the key was skipped."""
    cfg, ckpt = _cfg(data), _cfg(data, training={"lr": 1e-4, "gradient_checkpointing": True})
    fp = method_fingerprint(cfg, cfg.methods[0])
    assert diff(fp, method_fingerprint(ckpt, ckpt.methods[0])) == []
    old = json.loads(json.dumps(fp)) | {"training": fp["training"] | {"gradient_checkpointing": False}}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "fingerprint.json").write_text(json.dumps(old))
    assert check_fingerprint(tmp_path / "m", method_fingerprint(ckpt, ckpt.methods[0])) == "same"
