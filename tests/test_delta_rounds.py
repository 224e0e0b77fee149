"""Delta-stored full-fine-tuning rounds are first-class: eval, export, ledger import, ingredients and
keep_models restore any round through its parent chain, bit-exactly, and pruning re-bases crash-safely.

The reference is the same 3-round sequential FFT run stored full: same config, seed, data and kernels,
so every stored tensor must be bit-equal (storage does not touch the training computation).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from cairn.config import config_from_dict
from cairn.errors import CairnError
from cairn.experiment import run_experiment
from cairn.io.delta import read_delta_meta
from cairn.io.fft_round import load_round, prune_models

FAST = {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "log_every": 1, "max_length": 64}
TASKS = ("zoology", "geography", "inventions")
R3 = "fft/rounds/03-inventions"


def _cfg(model_dir, storage, diagnostics=False):
    return config_from_dict({
        "name": "t", "model": str(model_dir),
        "tasks": [{"name": t, "format": "demo", "path": t, "entities": 2, "max_new_tokens": 4} for t in TASKS],
        "methods": [{"name": "fft", "trainable": "full", "diagnostics": diagnostics}], "training": FAST,
        "evaluation": {"batch_size": 8}, "storage": storage})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("runs")
    for name, fmt in (("full", "full"), ("delta", "delta")):
        out = run_experiment(_cfg(tiny_model_dir, {"fft_format": fmt}, diagnostics=True), root / name, progress=False)
        assert out["status"] == {"fft": "ok"}
    return root


def _assert_bit_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:  # same computation, same kernels: the bits must match exactly
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].reshape(-1).view(torch.uint8),
                                                        b[k].reshape(-1).view(torch.uint8)), k


def _reference(runs, round_dir=R3):
    return load_file(runs / "full" / round_dir / "model/model.safetensors")


def _state(model):
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def test_round3_is_a_chain_of_deltas(runs):
    for k, task in enumerate(TASKS, start=1):
        model_dir = runs / "delta/fft/rounds" / f"0{k}-{task}/model"
        assert not (model_dir / "model.safetensors").exists()
        assert read_delta_meta(model_dir / "model.delta")["parent_round"] == k - 1  # the file names its parent
    _assert_bit_equal(_state(load_round(runs / "delta" / R3 / "model")), _reference(runs))


def test_update_diagnostics_of_delta_rounds_equal_full(runs):
    full, delta = (json.loads((runs / name / "fft/results.json").read_text())["diagnostics"] for name in ("full", "delta"))
    assert full["updates"] and full.keys() == delta.keys()
    # the same ΔW (the same float32 weights subtracted), read from safetensors or restored from deltas;
    # the norms and SVDs on them are the same code, so only summation order could differ: rel 1e-6
    assert _approx_tree(delta, full)


def _approx_tree(a, b):
    if isinstance(b, dict):
        return a.keys() == b.keys() and all(_approx_tree(a[k], b[k]) for k in b)
    if isinstance(b, list):
        return len(a) == len(b) and all(_approx_tree(x, y) for x, y in zip(a, b))
    if isinstance(b, float):
        return a == pytest.approx(b, rel=1e-6, abs=1e-9)
    return a == b


def test_eval_of_a_delta_round_folder_restores_it(runs):
    from cairn.commands.eval import load_for_eval

    from cairn.eval.lm_eval_backend import resolve_model

    for spec in (runs / "delta" / R3, runs / "delta" / R3 / "model"):  # the round folder or its model/
        model, tokenizer, base, adapter = load_for_eval(str(spec), device="cpu")
        assert adapter is None and tokenizer is not None
        _assert_bit_equal(_state(model), _reference(runs))
    model, tokenizer, model_args = resolve_model(str(runs / "delta" / R3), device="cpu")  # --backend lm-eval
    assert tokenizer is not None and model_args == ""
    _assert_bit_equal(_state(model), _reference(runs))


def test_cairn_eval_cli_on_a_delta_round(runs, data_dir, capsys):
    from cairn.cli import main

    assert main(["eval", str(runs / "delta" / R3), "--tasks", "arc_easy", "--limit", "2", "--data-dir",
                 str(data_dir), "--no-progress", "--device", "cpu"]) == 0
    assert "arc_easy" in capsys.readouterr().out


def test_export_of_a_delta_round_is_the_full_checkpoint(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from cairn.commands.export import export_round

    export_round(runs / "delta", "fft", 3, tmp_path / "out")
    assert not (tmp_path / "out/model.delta").exists()
    _assert_bit_equal(load_file(tmp_path / "out/model.safetensors"), _reference(runs))
    assert "delta" not in json.loads((tmp_path / "out/cairn_parent.json").read_text())
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # a plain transformers folder


def test_ledger_import_stores_the_full_model_of_a_delta_round(runs, tmp_path, tiny_model_dir):
    from cairn.cli import main
    from cairn.ledger.project import open_project

    shas = {}
    for name in ("full", "delta"):
        project = tmp_path / f"proj-{name}"
        assert main(["init", str(project), "--base", str(tiny_model_dir), "--max-drop", "100"]) == 0
        assert main(["ledger", "import", str(project), str(runs / name), "--prefix", "t-fft"]) == 0
        proj = open_project(project)
        release = proj.release("t-fft-inventions")
        folder = proj.store.get_dir(release.artifact_sha, tmp_path / f"got-{name}")
        assert not (folder / "model.delta").exists()
        _assert_bit_equal(load_file(folder / "model.safetensors"), _reference(runs))
        shas[name] = release.artifact_sha
    # same tensors, config, tokenizer and parent record: the very same content-addressed artifact
    assert shas["full"] == shas["delta"]


def test_ingredient_of_a_round_parented_delta(runs, tmp_path):
    from cairn.methods.full import FullFineTuning

    run = tmp_path / "run"
    shutil.copytree(runs / "delta", run)
    out = FullFineTuning(None).ingredient(run / R3, 3)
    assert out.name == "model-full"
    _assert_bit_equal(load_file(out / "model.safetensors"), _reference(runs))


def test_corrupt_delta_in_round2_is_named_when_reading_round3(runs, tmp_path):
    from cairn.commands.export import export_round

    run = tmp_path / "run"
    shutil.copytree(runs / "delta", run)
    bad = run / "fft/rounds/02-geography/model/model.delta"
    data = bytearray(bad.read_bytes())
    data[-100] ^= 0xFF  # one byte of the last tensor's compressed blob
    bad.write_bytes(bytes(data))
    with pytest.raises(CairnError, match="02-geography/model/model.delta"):
        load_round(run / R3 / "model")
    with pytest.raises(CairnError, match="02-geography/model/model.delta"):
        export_round(run, "fft", 3, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("policy, diagnostics", [("last", False), ("needed", True)])
def test_keep_models_with_delta_rebases_and_restores(runs, tmp_path, tiny_model_dir, policy, diagnostics):
    """last: after each round the previous goes (round 2 re-based on the base, then round 3); needed: every
    round stays for the update diagnostics, then round 3 is re-based and rounds 1-2 go."""
    from cairn.experiment import load_method_model

    cfg = _cfg(tiny_model_dir, {"fft_format": "delta", "keep_models": policy}, diagnostics=diagnostics)
    assert run_experiment(cfg, tmp_path / "e", progress=False)["status"] == {"fft": "ok"}
    rounds = tmp_path / "e/fft/rounds"
    assert not (rounds / "01-zoology/model").exists() and not (rounds / "02-geography/model").exists()
    assert read_delta_meta(rounds / "03-inventions/model/model.delta")["parent_round"] == 0  # re-based on the base
    assert json.loads((rounds / "03-inventions/model/cairn_parent.json").read_text())["delta"]["parent_round"] == 0
    assert not list(rounds.glob("*/.tmp-*"))
    results = json.loads((tmp_path / "e/fft/results.json").read_text())
    assert (results.get("diagnostics") is not None) == diagnostics  # computed before the rounds went
    assert json.loads((runs / "full/fft/results.json").read_text())["matrix"] == results["matrix"]
    model, _ = load_method_model(tmp_path / "e/fft")  # resume's restore, after pruning
    _assert_bit_equal(_state(model), _reference(runs))
    assert "re-based" in (tmp_path / "e/fft/log.txt").read_text()


def test_prune_keeps_the_nearest_kept_round_as_parent(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "delta", run)
    rounds = run / "fft/rounds"
    dirs = {k: rounds / f"0{k}-{t}" for k, t in enumerate(TASKS, start=1)}
    removed = prune_models(dirs, {1, 3})
    assert removed == [dirs[2] / "model"] and not (dirs[2] / "model").exists()
    assert read_delta_meta(dirs[3] / "model/model.delta")["parent_round"] == 1
    _assert_bit_equal(_state(load_round(dirs[3] / "model")), _reference(runs))
    _assert_bit_equal(_state(load_round(dirs[1] / "model")), _reference(runs, "fft/rounds/01-zoology"))


@pytest.mark.parametrize("moment", ["before-rename", "after-rename", "while-deleting"])
def test_prune_killed_at_any_moment_leaves_kept_rounds_restorable(runs, tmp_path, monkeypatch, moment):
    """A kill is an exception at that moment (nothing after it runs); then the rerun's prune finishes the job."""
    import os

    from cairn import atomic

    class Killed(BaseException):
        pass

    run = tmp_path / "run"
    shutil.copytree(runs / "delta", run)
    rounds = run / "fft/rounds"
    dirs = {k: rounds / f"0{k}-{t}" for k, t in enumerate(TASKS, start=1)}
    real_replace, real_json = os.replace, atomic.write_json

    def replace(src, dst):
        if moment == "before-rename" and str(dst).endswith("model.delta"):
            raise Killed
        real_replace(src, dst)
        if moment == "while-deleting" and ".tmp-model-pruned" in str(dst):
            raise Killed  # renamed away, not yet deleted

    def write_json(path, obj):
        if moment == "after-rename":
            raise Killed  # the new delta is in place; cairn_parent.json still names the old parent
        real_json(path, obj)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(atomic, "write_json", write_json)
    with pytest.raises(Killed):
        prune_models(dirs, {3})
    monkeypatch.undo()
    _assert_bit_equal(_state(load_round(dirs[3] / "model")), _reference(runs))
    prune_models(dirs, {3})  # the rerun
    assert [k for k, d in dirs.items() if (d / "model").exists()] == [3]
    assert not list(rounds.glob("*/.tmp-*"))
    assert read_delta_meta(dirs[3] / "model/model.delta")["parent_round"] == 0
    assert json.loads((dirs[3] / "model/cairn_parent.json").read_text())["delta"]["parent_round"] == 0
    assert not list((dirs[3] / "model").glob(".tmp-*"))
    _assert_bit_equal(_state(load_round(dirs[3] / "model")), _reference(runs))


def test_merge_and_mix_of_delta_rounds_equal_full(runs, tmp_path, tiny_model_dir):
    """`cairn merge` / `cairn mix` given delta-stored round folders restore them to temporary full copies."""
    from cairn.cli import main

    given = {}
    for name in ("full", "delta"):
        rounds = runs / name / "fft/rounds"
        given[name] = [str(rounds / "01-zoology/model"), str(rounds / "03-inventions/model")]
        assert main(["merge", "--method", "ties", "--base", str(tiny_model_dir), "--models", *given[name],
                     "--out", str(tmp_path / f"merge-{name}"), "--no-progress"]) == 0
        assert main(["mix", "--base", str(tiny_model_dir), "--experts", *given[name],
                     "--out", str(tmp_path / f"mix-{name}")]) == 0
    for kind in ("merge", "mix"):
        _assert_bit_equal(load_file(tmp_path / f"{kind}-full/model.safetensors"),
                          load_file(tmp_path / f"{kind}-delta/model.safetensors"))
    # the outputs name the folders given, not the temporary copies
    assert json.loads((tmp_path / "merge-delta/cairn_merge.json").read_text())["models"] == given["delta"]
    assert json.loads((tmp_path / "mix-delta/moe_manifest.json").read_text())["experts"] == given["delta"]


def test_contribute_a_delta_round_as_a_full_model(runs, tmp_path, tiny_model_dir):
    from cairn.cli import main
    from cairn.ledger.project import open_project

    project = tmp_path / "proj"
    assert main(["init", str(project), "--base", str(tiny_model_dir), "--max-drop", "100"]) == 0
    probe = tmp_path / "p.jsonl"
    probe.write_text(json.dumps({"prompt": "Q?", "answer": "A"}) + "\n")
    assert main(["contribute", str(project), "--name", "r1", "--from", "base", "--model",
                 str(runs / "delta/fft/rounds/01-zoology/model"), "--probe", str(probe),
                 "--probe-metric", "exact_match"]) == 0
    proj = open_project(project)
    folder = proj.store.get_dir(proj.release("r1").artifact_sha, tmp_path / "got")
    _assert_bit_equal(load_file(folder / "model.safetensors"), _reference(runs, "fft/rounds/01-zoology"))
