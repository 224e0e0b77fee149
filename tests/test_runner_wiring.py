"""The runner's wiring: seeds, every metric per round, data warnings in the log, honest adapter folders."""

from __future__ import annotations

import json

import pytest

from cairn.config import config_from_dict
from cairn.errors import CairnError
from cairn.experiment import run_experiment


def _cfg(model_dir, methods=None, **extra):
    return config_from_dict({
        "name": "w", "model": str(model_dir),
        "tasks": [{"name": t, "format": "demo", "path": t, "entities": 2, "max_new_tokens": 4,
                   "metrics": ["exact_match", "accuracy"]} for t in ("zoology", "geography")],
        "methods": methods or [{"name": "lora", "trainable": "lora", "lora": {"r": 2, "alpha": 4},
                                "diagnostics": False}],
        "training": {"max_steps": 2, "batch_size": 4, "lr": 5e-3, "log_every": 1, "max_length": 64},
        "evaluation": {"batch_size": 8}} | extra)


@pytest.mark.parametrize("seeds,match", [([], "seeds is empty"), ([0, 1, 0], "more than once")])
def test_bad_seed_lists_refused_at_load(tiny_model_dir, seeds, match):
    with pytest.raises(CairnError, match=match):
        _cfg(tiny_model_dir, seeds=seeds)


def test_seeds_run_each_method_and_combiner_once_per_seed_and_resume(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    methods = [{"name": "solo", "trainable": "lora", "strategy": "one-round", "lora": {"r": 2, "alpha": 4},
                "replay": 0.0}]
    cfg = _cfg(tiny_model_dir, methods, seeds=[0, 1],
               combine=[{"name": "avg", "source": "solo", "kind": "merge", "method": "linear"}])
    exp = tmp_path / "exp"
    out = run_experiment(cfg, exp, progress=False)
    assert out["status"] == {"solo": {"0": "ok", "1": "ok"}, "avg": {"0": "ok", "1": "ok"}}
    status = json.loads((exp / "experiment.json").read_text())
    assert status["status"] == out["status"] and status["seeds"] == [0, 1]
    assert (exp / "base" / "round.json").is_file() and not (exp / "solo" / "base").exists()
    for s in (0, 1):
        res = json.loads((exp / "solo" / f"seed-{s}" / "results.json").read_text())
        assert res["seed"] == s and res["trainable"] == "lora" and res["replay"] == 0.0
        comb = json.loads((exp / "avg" / f"seed-{s}" / "results.json").read_text())
        assert comb["seed"] == s and comb["kind"] == "merge" and comb["source"] == "solo"
    # the training seed differs (adapter init and data order): the seeds' adapters differ
    a0, a1 = (load_file(exp / "solo" / f"seed-{s}" / "rounds" / "01-only-zoology" / "adapter" /
                        "adapter_model.safetensors") for s in (0, 1))
    assert any(not (a0[k] == a1[k]).all() for k in a0)
    # the test set is fixed: both seeds scored the same prompts
    p0, p1 = (json.loads((exp / "solo" / f"seed-{s}" / "rounds" / "01-only-zoology" / "predictions.json").read_text())
              for s in (0, 1))
    assert [r["prompt"] for r in p0["zoology"]] == [r["prompt"] for r in p1["zoology"]]
    # resume per seed: seed 1's results removed -> only seed 1 is finished again, rounds reused
    stamp = (exp / "solo" / "seed-0" / "results.json").stat().st_mtime_ns
    (exp / "solo" / "seed-1" / "results.json").unlink()
    again = run_experiment(cfg, exp, progress=False)
    assert again["status"] == out["status"]
    assert (exp / "solo" / "seed-0" / "results.json").stat().st_mtime_ns == stamp
    assert json.loads((exp / "solo" / "seed-1" / "results.json").read_text())["matrix"] == \
        out["results"]["solo"]["1"]["matrix"]


def test_every_metric_per_round_and_data_warnings_logged(tmp_path, tiny_model_dir):
    from cairn.rundir import RoundRecord, read_round

    exp = tmp_path / "exp"
    out = run_experiment(_cfg(tiny_model_dir), exp, progress=False)
    res = out["results"]["lora"]
    assert res["tasks"][0] == {"name": "zoology", "metric": "exact_match", "metrics": ["exact_match", "accuracy"]}
    assert len(res["metrics"]) == 3 and set(res["metrics"][1][0]) == {"exact_match", "accuracy"}
    rec = read_round(exp / "lora" / "rounds" / "01-zoology")
    assert rec.scores[0] == rec.metrics["zoology"]["exact_match"]  # the primary is the first metric
    # the demo prompts are longer than max_length=64 tokens: the check's warning reaches log.txt
    assert "data warning: task 'zoology'" in (exp / "log.txt").read_text()
    # a round.json written before the metrics field still reads
    old = exp / "old"
    old.mkdir()
    (old / "round.json").write_text(json.dumps({"label": "x", "scores": [0.5]}))
    assert read_round(old) == RoundRecord(label="x", scores=[0.5])


def test_round_adapter_is_vanilla_peft_on_its_recorded_parent(tmp_path, tiny_model_dir):
    """Round 2's adapter/ loaded by plain PEFT on (base + round 1 merged) reproduces the run's predictions."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cairn.data.tasks import load_task
    from cairn.eval.task_eval import evaluate_tasks
    from cairn.models import load_tokenizer
    from cairn.rundir import read_parent, require_standalone

    cfg = _cfg(tiny_model_dir)
    exp = tmp_path / "exp"
    run_experiment(cfg, exp, progress=False)
    r1, r2 = exp / "lora" / "rounds" / "01-zoology" / "adapter", exp / "lora" / "rounds" / "02-geography" / "adapter"
    assert (r2 / "adapter_config.json").is_file() and not (r2 / "round2").exists()
    p1, p2 = read_parent(r1), read_parent(r2)
    assert p1["merged_rounds_first"] == [] and p1["applies_to"] == "the raw base model"
    assert p2["merged_rounds_first"] == [1] and p2["base_model"] == str(tiny_model_dir.resolve())
    require_standalone(r1)  # round 1 applies to the raw base: accepted
    with pytest.raises(CairnError, match="cairn eval"):
        require_standalone(r2)

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    for adapter in (r1, r2):  # the chain the parent record names, then this round, merged as the run did
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    tasks = [load_task(t, None, cfg.seed) for t in cfg.tasks]
    _, preds = evaluate_tasks(model.eval(), load_tokenizer(str(tiny_model_dir)), tasks, 8, progress=False)
    saved = json.loads((exp / "lora" / "rounds" / "02-geography" / "predictions.json").read_text())
    assert {t: [r["prediction"] for r in rows] for t, rows in preds.items()} == \
        {t: [r["prediction"] for r in rows] for t, rows in saved.items()}
    # and the weights are the run's own (same merges in the same order: bit-equal), while round 2's
    # adapter alone on the raw base is another model
    from cairn.experiment import load_method_model

    ran, _ = load_method_model(exp / "lora")
    ran_sd, vanilla_sd = ran.state_dict(), model.state_dict()
    assert all(torch.equal(ran_sd[k], vanilla_sd[k]) for k in ran_sd)
    alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(r2))
    alone_sd = alone.merge_and_unload().state_dict()
    assert any(not torch.equal(alone_sd[k], vanilla_sd[k]) for k in vanilla_sd)


def test_cli_eval_and_merge_refuse_an_adapter_trained_on_merged_rounds(tmp_path, tiny_model_dir, capsys):
    from cairn.cli import main

    exp = tmp_path / "exp"
    run_experiment(_cfg(tiny_model_dir), exp, progress=False)
    r1, r2 = (exp / "lora" / "rounds" / d / "adapter" for d in ("01-zoology", "02-geography"))
    assert main(["eval", str(r2), "--tasks", "arc_easy"]) == 2
    err = capsys.readouterr().err
    assert "cairn eval RUN_DIR" in err and "--merge" in err and "Traceback" not in err
    assert main(["merge", "--models", str(r1), str(r2), "--method", "linear", "--out", str(tmp_path / "m")]) == 2
    assert "not on the raw base" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_dry_run_lists_each_seed(tmp_path, tiny_model_dir):
    from cairn.commands.run import dry_run

    text = dry_run(_cfg(tiny_model_dir, seeds=[3, 4]), tmp_path / "exp")
    assert "lora (seed 3):" in text and "lora (seed 4):" in text and "seeds: 3, 4" in text
    assert not (tmp_path / "exp").exists()


def test_data_layer_does_not_import_eval_and_knows_every_metric():
    import subprocess
    import sys

    from cairn.data.answers import METRIC_NAMES
    from cairn.eval.metrics import METRICS

    assert set(METRIC_NAMES) == set(METRICS)
    code = ("import sys, cairn.data.tasks, cairn.data.checks, cairn.data.answers; "
            "print(sorted(m for m in sys.modules if m.startswith('cairn.eval')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_tracking_gets_each_rounds_scores_and_the_log_says_the_world(tmp_path, tiny_model_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exp = tmp_path / "exp"
    run_experiment(_cfg(tiny_model_dir, tracking={"report_to": ["tensorboard"]}), exp, progress=False)
    acc = EventAccumulator(str(exp / "tracking" / "w" / "lora"))
    acc.Reload()
    # round/<task> at each round's last global step: 2 steps a round on one axis
    assert [e.step for e in acc.Scalars("round/zoology")] == [2, 4]
    assert [e.step for e in acc.Scalars("scores/geography")] == [1, 2]
    assert "world size 1, device cpu" in (exp / "log.txt").read_text()


def test_changed_combine_step_refuses_then_overwrite_recombines(tmp_path, tiny_model_dir):
    methods = [{"name": "solo", "trainable": "lora", "strategy": "one-round", "lora": {"r": 2, "alpha": 4}}]

    def cfg(weights):
        return _cfg(tiny_model_dir, methods, combine=[{"name": "avg", "source": "solo", "kind": "merge",
                                                       "method": "linear", "params": {"weights": weights}}])

    exp = tmp_path / "exp"
    assert run_experiment(cfg([0.5, 0.5]), exp, progress=False)["status"] == {"solo": "ok", "avg": "ok"}
    out = run_experiment(cfg([0.9, 0.1]), exp, progress=False)
    assert out["status"]["solo"] == "ok"  # the source's settings did not change: reused
    assert "combine.params.weights" in out["status"]["avg"] and "--overwrite" in out["status"]["avg"]
    out = run_experiment(cfg([0.9, 0.1]), exp, progress=False, overwrite=True)
    assert out["status"] == {"solo": "ok", "avg": "ok"}
    stored = json.loads((exp / "avg" / "fingerprint.json").read_text())
    assert stored["combine"]["params"]["weights"] == [0.9, 0.1]


def test_cli_seeds_flag(tmp_path, tiny_model_dir, capsys):
    import yaml

    from cairn.cli import main
    from cairn.config import to_dict

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(to_dict(_cfg(tiny_model_dir))))
    assert main(["run", str(path), "--seeds", "0"]) == 2
    assert "--seeds 0" in capsys.readouterr().err
    assert main(["run", str(path), "--seeds", "2", "--dry-run", "--out", str(tmp_path / "exp")]) == 0
    text = capsys.readouterr().out
    assert "seeds: 0, 1" in text and "lora (seed 1):" in text and not (tmp_path / "exp").exists()


def test_cairn_run_with_seeds_prints_the_summary_and_fails_nonzero(tmp_path, tiny_model_dir, capsys):
    import yaml

    from cairn.cli import main
    from cairn.config import to_dict

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(to_dict(_cfg(tiny_model_dir))))
    assert main(["run", str(path), "--seeds", "2", "--out", str(tmp_path / "exp"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "±" in out and "report:" in out  # the demo's summary: mean ± sd over the two seeds, the report
    # a method that fails (here: its base adapter folder is missing on resume, a CairnError) makes `cairn run`
    # exit non-zero: 2, as for any run whose every failure is a CairnError (bad input, diverged loss)
    import shutil

    (tmp_path / "exp" / "lora" / "seed-1" / "results.json").unlink()
    (tmp_path / "exp" / "lora" / "seed-1" / "rounds" / "02-geography" / "round.json").unlink()
    shutil.rmtree(tmp_path / "exp" / "lora" / "seed-1" / "rounds" / "01-zoology" / "adapter")
    assert main(["run", str(path), "--seeds", "2", "--out", str(tmp_path / "exp"), "--no-progress"]) == 2
    assert "seed 1: failed" in capsys.readouterr().out


def test_a_run_directory_in_use_is_refused(tmp_path, tiny_model_dir):
    from cairn.runlock import lock_run_dir

    exp = tmp_path / "exp"
    lock = lock_run_dir(exp)  # another cairn process holds the directory
    try:
        with pytest.raises(CairnError, match="in use by another cairn process"):
            run_experiment(_cfg(tiny_model_dir), exp, progress=False)
    finally:
        lock.release()
    assert not (exp / "lora").exists() and not (exp / "base").exists()  # nothing written by the refused run
