"""Loss curves in the report, from hand-built run directories with rounds/NN-<task>/train_log.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from cairn.report import build_report
from cairn.report.curves import is_loss_term, loss_plot, method_curve, run_curves
from cairn.report.runs import load_runs

TASKS = ["a", "b"]
ROWS = ["base", "a", "b"]


def _results(name, seed=None):
    res = {"name": name, "tasks": TASKS, "rows": ROWS, "matrix": [[0.0, 0.0], [0.8, 0.1], [0.5, 0.9]]}
    return res if seed is None else res | {"seed": seed}


def _log(path: Path, entries: list[dict]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "train_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))


def _method(d: Path, name: str, seed=None, penalty=False, scale=1.0) -> Path:
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(_results(name, seed)))
    (d / "config.yaml").write_text(f"name: {name}\n")
    # round 1: steps 1..3; round 2 continues on the global axis at 4..6 (tracking writes both)
    r1 = [{"step": s, "global_step": s, "lr": 1e-4, "tokens_per_second": 900.0, "task": scale * (3.0 - s)}
          for s in (1, 2, 3)]
    r2 = [{"step": s, "global_step": 3 + s, "lr": 1e-4, "tokens_per_second": 900.0, "task": scale * (2.0 - 0.5 * s)}
          | ({"olora_orth": 0.1 * s} if penalty else {}) for s in (1, 2, 3)]
    _log(d / "rounds" / "01-a", r1)
    _log(d / "rounds" / "02-b", r2)
    return d


def test_method_curve_follows_rounds_on_the_global_step(tmp_path):
    d = _method(tmp_path / "seq", "seq", penalty=True)
    c = method_curve(d, "seq")
    assert c.steps == [1, 2, 3, 4, 5, 6]
    assert c.terms["task"] == [2.0, 1.0, 0.0, 1.5, 1.0, 0.5]
    # the penalty exists only in round 2: round 1 is a gap, not a zero
    assert c.terms["olora_orth"][:3] == [None, None, None]
    assert c.terms["olora_orth"][3:] == [0.1, 0.2, 0.1 * 3]
    assert set(c.terms) == {"task", "olora_orth"}  # lr and throughput are not loss terms
    assert c.round_starts == [(0, "a"), (3, "b")]


def test_logs_without_global_step_and_resumed_steps(tmp_path):
    d = tmp_path / "old"
    _log(d / "rounds" / "01-a", [{"step": 1, "task": 2.0}, {"step": 2, "task": 1.0}])
    # a resumed round replays step 2: the last entry of a step wins (cairn.tracking.read_train_log)
    _log(d / "rounds" / "02-b", [{"step": 1, "task": 5.0}, {"step": 2, "task": 4.0}, {"step": 2, "task": 3.0}])
    c = method_curve(d, "old")
    assert c.steps == [1, 2, 3, 4]  # round 2 placed after round 1's last step
    assert c.terms["task"] == [2.0, 1.0, 5.0, 3.0]
    assert method_curve(tmp_path / "nothing", "x") is None


def test_loss_term_filter():
    assert is_loss_term("task") and is_loss_term("loss") and is_loss_term("ewc") and is_loss_term("loramoe_balance")
    for key in ("step", "global_step", "lr", "tokens_per_second", "grad_norm", "train_seconds"):
        assert not is_loss_term(key), key


def test_seeded_experiment_gives_a_curve_per_seed_and_the_report_embeds_it(tmp_path):
    exp = tmp_path / "exp"
    _method(exp / "seq-fft" / "seed-0", "seq-fft", seed=0)
    _method(exp / "seq-fft" / "seed-1", "seq-fft", seed=1, scale=2.0)
    _method(exp / "o-lora", "o-lora", penalty=True)
    (exp / "experiment.json").write_text(json.dumps({"name": "exp", "methods": ["seq-fft", "o-lora"],
                                                     "status": {"seq-fft": "ok", "o-lora": "ok"}}))
    runs = load_runs([exp]).runs
    curves = run_curves(runs)
    assert [(c.label, c.method) for c in curves] == [
        ("seq-fft (seed 0)", "seq-fft"), ("seq-fft (seed 1)", "seq-fft"), ("o-lora", "o-lora")]
    assert curves[1].terms["task"][0] == 4.0  # seed 1's own log, not seed 0's
    png = loss_plot(runs, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    page = build_report([exp], tmp_path / "report").read_text()
    assert (tmp_path / "report" / "plots" / "loss.png").is_file()
    assert "Training loss terms against the global step" in page


def test_no_train_logs_no_loss_figure(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "results.json").write_text(json.dumps(_results("run")))
    assert loss_plot(load_runs([d]).runs, tmp_path / "loss.png") is None
    page = build_report([d], tmp_path / "report").read_text()
    assert "Training loss terms" not in page and not (tmp_path / "report" / "plots" / "loss_run.png").exists()
