"""Trackers through Accelerate: what is logged to TensorBoard and MLflow is read back from disk."""

from __future__ import annotations

import json

import pytest

from cairn.config import config_from_dict
from cairn.errors import CairnError
from cairn.tracking import Tracking, check_trackers, mlflow_uri, open_tracking, read_train_log

RESULTS = {"rows": ["base", "a", "b"], "tasks": [{"name": "a"}, {"name": "b"}],
           "matrix": [[0.0, 0.0], [0.5, 0.1], [0.4, 0.7]], "figures": {"bwt": -0.1}}


def _log_two_rounds(tr: Tracking, tmp_path):
    fn1 = tr.round_log_fn(1, "a", tmp_path / "r1", step_offset=0)
    fn1({"loss": 2.0, "lr": 1e-3, "tokens_per_second": 100.0}, 1)
    fn1({"loss": 1.5, "lr": 5e-4, "tokens_per_second": 110.0}, 2)
    tr.log_round(1, "a", {"a": 0.5, "b": 0.1}, step=2)
    fn2 = tr.round_log_fn(2, "b", tmp_path / "r2", step_offset=2)
    fn2({"loss": 1.0, "olora": 0.25, "lr": 1e-3}, 1)
    tr.log_round(2, "b", {"a": 0.4, "b": 0.7}, step=3)
    tr.log_results(RESULTS)
    tr.finish()


def test_tensorboard_event_files_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tr = Tracking(["tensorboard"], tmp_path / "tb", "exp", "lora-seed-0", {"training": {"lr": 1e-3}})
    _log_two_rounds(tr, tmp_path)
    acc = EventAccumulator(str(tmp_path / "tb" / "exp" / "lora-seed-0"))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert loss == [(1, 2.0), (2, 1.5), (3, 1.0)]  # round 2's step 1 continues after round 1's two steps
    assert [(e.step, e.value) for e in acc.Scalars("train/olora")] == [(3, 0.25)]
    assert [e.step for e in acc.Scalars("round/b")] == [2, 3]
    assert [e.value for e in acc.Scalars("scores/b")] == pytest.approx([0.1, 0.7])
    assert acc.Scalars("figures/bwt")[0].value == pytest.approx(-0.1)
    # the same metrics in each round's train_log.jsonl (round-local and global step)
    log2 = read_train_log(tmp_path / "r2" / "train_log.jsonl")
    assert log2 == [{"step": 1, "global_step": 3, "loss": 1.0, "olora": 0.25, "lr": 1e-3}]


def test_mlflow_local_sqlite_store_read_back(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    tr = Tracking(["mlflow"], tmp_path / "logs", "exp", "lora", {"training": {"lr": 1e-3}, "model": "m"})
    _log_two_rounds(tr, tmp_path)
    client = MlflowClient(tracking_uri=mlflow_uri(tmp_path / "logs"))
    exp = client.get_experiment_by_name("exp")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_name for r in runs] == ["lora"]
    run = runs[0]
    hist = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in hist) == [(1, 2.0), (2, 1.5), (3, 1.0)]
    assert run.data.params["training.lr"] == "0.001"
    assert run.data.metrics["round/a"] == pytest.approx(0.4)
    assert run.info.status == "FINISHED"
    matrix = list((tmp_path / "logs" / "mlartifacts").rglob("results_matrix.md"))  # artifacts beside the store
    assert len(matrix) == 1 and "| b | 0.4000 | 0.7000 |" in matrix[0].read_text()
    # a second method is a second run of the same experiment
    Tracking(["mlflow"], tmp_path / "logs", "exp", "fft").finish()
    assert sorted(r.info.run_name for r in client.search_runs([exp.experiment_id])) == ["fft", "lora"]


def test_unknown_tracker_and_missing_package(monkeypatch):
    with pytest.raises(CairnError, match="unknown tracker 'tensorbord'"):
        check_trackers(["tensorbord"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(CairnError, match=r"cairn-lm\[tracking\]"):
        check_trackers(["wandb"])


def test_config_section_and_no_tracker(tmp_path):
    base = {"name": "e", "model": "m", "tasks": [{"name": "a", "format": "demo", "path": "zoology"}],
            "methods": [{"name": "lora"}]}
    with pytest.raises(CairnError, match="tracking.report_to: unknown tracker 'x'"):
        config_from_dict(base | {"tracking": {"report_to": ["x"]}})
    cfg = config_from_dict(base)
    assert cfg.tracking.report_to == [] and cfg.tracking.log_dir is None
    tr = open_tracking(cfg, tmp_path, "lora")  # no tracker: only train_log.jsonl is written
    tr.round_log_fn(1, "a", tmp_path / "r", 0)({"loss": float("nan"), "lr": 0.1}, 1)
    tr.finish()
    assert [json.loads(x) for x in (tmp_path / "r" / "train_log.jsonl").read_text().splitlines()] == [
        {"step": 1, "global_step": 1, "lr": 0.1}]  # a NaN is not a number a chart can draw
    assert not (tmp_path / "tracking").exists()
