"""Bad-input corpus, part 3: faults at run time inside ``cairn run`` on a tiny model.

A full disk or a permission error while a round's artifact is written must stop the run with exit
status 2 and one message naming the file, keep the previous round's artifact intact, leave no
half-written file (no ``.tmp-*``, no ``round.json`` for the unfinished round), and a rerun must
resume from there. A diverging loss must stop the round and name the step.
"""

from __future__ import annotations

import errno
import json

import pytest
import yaml

from cairn.cli import main

FAST = {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "log_every": 1, "max_length": 64}


def _config(tmp_path, model_dir, method: dict, training: dict | None = None, storage: dict | None = None):
    cfg = {"name": "rt", "model": str(model_dir), "output_dir": str(tmp_path / "runs"),
           "tasks": [{"name": t, "format": "demo", "path": t, "entities": 2, "max_new_tokens": 4}
                     for t in ("zoology", "geography")],
           "methods": [method], "training": {**FAST, **(training or {})}, "evaluation": {"batch_size": 8},
           "storage": storage or {}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, tmp_path / "runs" / "rt"


def _partial_files(run_dir):
    return [p for p in run_dir.rglob("*") if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("code_name, fmt", [("ENOSPC", "full"), ("EACCES", "full"), ("ENOSPC", "delta")])
def test_disk_fault_while_saving_a_round_model(code_name, fmt, tmp_path, tiny_model_dir, capsys, monkeypatch):
    from transformers import PreTrainedModel

    from cairn.io import fft_round

    cfg, run = _config(tmp_path, tiny_model_dir, {"name": "fft", "trainable": "full"}, storage={"fft_format": fmt})
    weights = {"full": "model.safetensors", "delta": "model.delta"}[fmt]
    real_save, real_delta = PreTrainedModel.save_pretrained, fft_round.write_delta
    calls = []

    def fault(path):
        err = getattr(errno, code_name)
        raise OSError(err, {"ENOSPC": "No space left on device", "EACCES": "Permission denied"}[code_name],
                      str(path).removesuffix("/" + weights) + "/" + weights)

    def failing_save(self, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:  # round 2's artifact: write part of it, then the disk "fails"
            real_save(self, path, *a, **k)
            fault(path)
        return real_save(self, path, *a, **k)

    def failing_delta(path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            real_delta(path, *a, **k)
            fault(path)
        return real_delta(path, *a, **k)

    if fmt == "full":
        monkeypatch.setattr(PreTrainedModel, "save_pretrained", failing_save)
    else:
        monkeypatch.setattr(fft_round, "write_delta", failing_delta)
    capsys.readouterr()
    code = main(["run", str(cfg), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and weights in err
    assert ("free some disk space" if code_name == "ENOSPC" else "writable") in err
    r1, r2 = run / "fft/rounds/01-zoology", run / "fft/rounds/02-geography"
    assert (r1 / "round.json").is_file() and (r1 / "model" / weights).is_file()  # previous round intact
    assert not (r2 / "round.json").exists() and not (r2 / "model").exists()  # the failed round left nothing
    assert not _partial_files(run)
    assert not (run / "fft/results.json").exists()
    # the fault gone, the same command resumes and finishes
    monkeypatch.undo()
    assert main(["run", str(cfg), "--no-progress"]) == 0
    assert json.loads((run / "fft/results.json").read_text())["rows"] == ["base", "zoology", "geography"]


def test_disk_full_while_writing_round_scores(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from cairn import atomic

    cfg, run = _config(tmp_path, tiny_model_dir, {"name": "lora", "trainable": "lora", "lora": {"r": 2, "alpha": 4}})
    real = atomic.write_text

    def failing(path, text):
        if str(path).endswith("02-geography/predictions.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, text)

    monkeypatch.setattr(atomic, "write_text", failing)
    capsys.readouterr()
    assert main(["run", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "predictions.json" in err and "Traceback" not in err
    assert (run / "lora/rounds/01-zoology/round.json").is_file()
    assert (run / "lora/rounds/01-zoology/adapter").is_dir()
    assert not (run / "lora/rounds/02-geography/round.json").exists()
    assert not _partial_files(run)


def test_huge_learning_rate_stops_the_round_at_the_diverging_step(tmp_path, tiny_model_dir, capsys):
    cfg, run = _config(tmp_path, tiny_model_dir, {"name": "fft", "trainable": "full"},
                       {"lr": 1e12, "max_steps": 6, "max_grad_norm": None})
    capsys.readouterr()
    code = main(["run", str(cfg), "--no-progress"])
    out = capsys.readouterr()
    assert code != 0
    status = json.loads((run / "experiment.json").read_text())["status"]["fft"]
    assert "step" in status and ("NaN" in status or "Inf" in status or "diverged" in status)
    assert not (run / "fft/rounds/01-zoology/round.json").exists()  # no NaN model saved as a round
