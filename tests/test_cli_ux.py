"""The command line: clean --help, `cairn config schema`, `cairn run --dry-run`, --quiet/--verbose."""

from __future__ import annotations

import argparse
import re

import pytest
import yaml

from cairn.cli import HelpFormatter, build_parser, main


def _parsers(parser, name="cairn"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, sp in action.choices.items():
                yield from _parsers(sp, f"{name} {sub}")


def test_every_help_states_a_default_at_most_once():
    seen = 0
    for name, parser in _parsers(build_parser()):
        fmt = parser._get_formatter()
        assert isinstance(fmt, HelpFormatter), name
        for action in parser._actions:
            text = fmt._expand_help(action) if action.help else ""
            assert len(re.findall("default", text, re.I)) <= 1, (name, action.option_strings, text)
            seen += 1
        parser.format_help()  # renders without error
    assert seen > 50


def test_help_adds_a_missing_default_only():
    parser = build_parser()
    text = " ".join(next(sp for n, sp in _parsers(parser) if n == "cairn eval").format_help().split())
    assert "seed of the --limit subsample (default: 1234)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_config_schema_lists_every_key(capsys):
    assert main(["config", "schema"]) == 0
    out = capsys.readouterr().out
    for key in ("training.lr: float = 0.0001", "methods[].lora.r: int = 8", "tracking.report_to: list[str] = []",
                "tasks[].format: trace | jsonl | messages | hf", "evaluation.old_knowledge: section | null = null",
                "name: str = required",
                # method sections come from the registered method pieces (cairn.methods.registry.sections)
                "methods[].olora.lambda1: list[float] | float = 0.5", "methods[].ewc: section | null = null"):
        assert key in out, key
    assert "Peak learning rate." in out
    assert main(["config", "schema", "--format", "markdown", "--section", "training"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| key | type | default | help |"
    assert all(line.startswith("| `training") for line in lines[2:]) and len(lines) > 10


def _config(tmp_path, model_dir, **extra):
    cfg = {"name": "t", "model": str(model_dir), "output_dir": str(tmp_path / "runs"),
           "tasks": [{"name": t, "format": "demo", "path": t, "entities": 2, "max_new_tokens": 4}
                     for t in ("zoology", "geography")],
           "methods": [{"name": "lora", "trainable": "lora", "lora": {"r": 2}},
                       {"name": "replay", "trainable": "full", "replay": 0.5, "training": {"max_steps": 3}}],
           "training": {"batch_size": 4, "epochs": 2}} | extra
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_dry_run_prints_plan_without_loading_weights(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import cairn.models

    def no_weights(*a, **k):
        raise AssertionError("--dry-run loaded model weights")

    monkeypatch.setattr(cairn.models, "load_model", no_weights)
    path = _config(tmp_path, tiny_model_dir)
    assert main(["run", str(path), "--dry-run", "--set", "training.lr=3e-4"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.0003" in out  # the resolved config, override applied
    from cairn.config import load_config
    from cairn.experiment import Runner
    from cairn.train.loop import total_steps

    cfg = load_config(path)
    n = len(Runner(cfg, tmp_path / "x").tasks[0].train)
    steps = total_steps(n, cfg.training_for(cfg.methods[0]))
    assert re.search(rf"round 1: zoology\s+{n} examples\s+{steps} steps", out)
    assert re.search(r"round 2: geography\s+\d+ examples \(with replay\)\s+3 steps", out)
    assert not (tmp_path / "runs").exists()  # nothing written


def test_quiet_silences_libraries(tmp_path, tiny_model_dir, monkeypatch, capsys):
    for var in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "PYTHONWARNINGS",
                "TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY", "HF_HUB_VERBOSITY"):  # restored afterwards
        monkeypatch.delenv(var, raising=False)
    import logging
    import os

    from transformers.utils import logging as tlog

    from cairn import verbosity

    try:
        assert main(["-q", "run", str(_config(tmp_path, tiny_model_dir)), "--dry-run"]) == 0
        assert verbosity.level() == "quiet" and not verbosity.progress_enabled()
        assert tlog.get_verbosity() == logging.ERROR and not tlog.is_progress_bar_enabled()
        assert os.environ["TQDM_DISABLE"] == "1" and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        verbosity.configure("normal", progress=False)  # --no-progress alone also stops transformers' bars
        assert not tlog.is_progress_bar_enabled() and tlog.get_verbosity() == logging.WARNING
    finally:
        verbosity.configure("normal", progress=True)
        tlog.enable_progress_bar()
    with pytest.raises(SystemExit):
        main(["-q", "-v", "models"])  # mutually exclusive
    assert "not allowed with" in capsys.readouterr().err


def test_unknown_tracker_is_exit_2(tmp_path, tiny_model_dir, capsys):
    path = _config(tmp_path, tiny_model_dir, tracking={"report_to": ["tensorbord"]})
    assert main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown tracker 'tensorbord'" in err and "Traceback" not in err
