"""Model projects, continued: the project's method for --data contributions (O-LoRA, N-LoRA, replay with
keep_data), the mix fold (routed LoRA-MoE releases), the import gate on old knowledge, and bad input.

Everything runs on the tiny Llama of conftest.py (character tokenizer), a step or two of training.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch

from cairn.ledger import db
from cairn.ledger.contribute import json_rows
from cairn.ledger.project import open_project
from test_ledger import _fake_run, cli, dump, make_adapter, make_full, probe_file


# ---------------------------------------------------------------------------------------------- import gate


def _with_old_knowledge(exp: Path, parent: list[float], after: list[list[float]], items: bool) -> None:
    """Old-knowledge results (arc_easy) in a fake run's base and rounds: aggregates, and items if asked."""
    dirs = [exp / "base"] + sorted((exp / "seq-lora" / "rounds").iterdir())
    for d, scores in zip(dirs, [parent] + after):
        rec = json.loads((d / "round.json").read_text()) if (d / "round.json").is_file() else \
            {"label": "base", "scores": [0.0, 0.0]}
        rec["old_knowledge"] = {"arc_easy": {"primary": sum(scores) / len(scores), "primary_stderr": 0.1,
                                             "primary_metric": "acc_norm", "n": len(scores)}}
        (d / "round.json").write_text(json.dumps(rec))
        if items:
            (d / "old_knowledge_items.json").write_text(json.dumps({"arc_easy": scores}))


@pytest.mark.parametrize("items", [False, True])
def test_import_gate_on_old_knowledge_uses_items_or_flags_aggregates(tmp_path, tiny_model_dir, items, capsys):
    policy = tmp_path / "policy.yaml"
    policy.write_text("max_drop: 10\nold_knowledge: {tasks: [arc_easy, piqa], limit: 20}\n")
    p = tmp_path / "proj"
    assert cli("init", p, "--base", tiny_model_dir, "--policy", policy) == 0
    exp = _fake_run(tmp_path, tiny_model_dir, [True] * 20)
    # round 1 keeps old knowledge; round 2 forgets it (20 questions right -> 10)
    _with_old_knowledge(exp, [1.0] * 20, [[1.0] * 20, [1.0] * 10 + [0.0] * 10], items)
    assert cli("ledger", "import", p, exp) == 0
    proj = open_project(p)
    r1, r2 = proj.release("exp-seq-lora-t1"), proj.release("exp-seq-lora-t2")
    row1 = next(t for t in r1.gate["table"] if t["probe"] == "old:arc_easy")
    row2 = next(t for t in r2.gate["table"] if t["probe"] == "old:arc_easy")
    piqa = next(t for t in r2.gate["table"] if t["probe"] == "old:piqa")
    assert piqa["verdict"] == "unscored" and "did not score piqa" in piqa["note"]  # asked for, never run: flagged
    assert row2["delta"] == pytest.approx(-50.0)
    if items:
        assert row1["verdict"] == "ok" and row1["lo"] == 0.0 and row1["hi"] == 0.0
        assert row2["verdict"] == "fail" and row2["hi"] < 0 and r2.status == "rejected"
    else:
        # only aggregates: no interval, never accepted on them (and never rejected without items)
        assert row1["verdict"] == row2["verdict"] == "aggregate" and row2["lo"] is None
        assert r1.status == r2.status == "flagged"
    assert r1.status != "accepted"  # piqa's unscored row flags it either way
    capsys.readouterr()
    assert cli("ledger", "show", p, "exp-seq-lora-t2") == 0
    shown = capsys.readouterr().out
    assert ("no items" in shown) != items and "unscored" in shown
    assert cli("ledger", "report", p, "--out", tmp_path / "r.html") == 0


def test_a_run_saves_old_knowledge_items_and_its_import_is_gated_on_them(tmp_path, tiny_model_dir):
    import yaml

    rows = [{"id": str(i), "question": f"Which word comes next {i}?",
             "choices": {"text": ["fox", "dog", "quick brown"], "label": ["A", "B", "C"]}, "answerKey": "ABC"[i % 3]}
            for i in range(6)]
    arc = tmp_path / "data" / "old_knowledge" / "arc_easy" / "test.jsonl"
    arc.parent.mkdir(parents=True)
    arc.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ok = {"tasks": ["arc_easy"], "limit": 4, "data_dir": str(tmp_path / "data")}
    cfg = {"name": "w", "model": str(tiny_model_dir),
           "tasks": [{"name": t, "format": "demo", "path": t, "entities": 2, "max_new_tokens": 4}
                     for t in ("zoology", "geography")],
           "methods": [{"name": "lora", "trainable": "lora", "lora": {"r": 2, "alpha": 4}, "diagnostics": False}],
           "training": {"max_steps": 1, "batch_size": 4, "max_length": 96},
           "evaluation": {"batch_size": 8, "old_knowledge": ok}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli("run", path, "--out", tmp_path / "exp", "--no-progress") == 0
    rdir = next((tmp_path / "exp" / "lora" / "rounds").iterdir())
    items = json.loads((rdir / "old_knowledge_items.json").read_text())
    assert len(items["arc_easy"]) == 4 and set(items["arc_easy"]) <= {0.0, 1.0}
    assert "items" not in json.loads((rdir / "round.json").read_text())["old_knowledge"]["arc_easy"]
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"max_drop": 100, "old_knowledge": ok}))
    assert cli("init", tmp_path / "proj", "--base", tiny_model_dir, "--policy", policy) == 0
    assert cli("ledger", "import", tmp_path / "proj", tmp_path / "exp") == 0
    for r in open_project(tmp_path / "proj").releases()[1:]:
        row = next(t for t in r.gate["table"] if t["probe"] == "old:arc_easy")
        assert row["n"] == 4 and row["lo"] is not None and row["verdict"] == "ok"
