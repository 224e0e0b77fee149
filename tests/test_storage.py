"""Storage of full-fine-tuning rounds: delta format restores bit-exactly what full storage keeps."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from cairn.config import config_from_dict
from cairn.errors import CairnError
from cairn.experiment import load_method_model, run_experiment

FAST = {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "log_every": 1, "max_length": 64}
TASKS = [{"name": t, "format": "demo", "path": t, "entities": 2, "max_new_tokens": 4} for t in ("zoology", "geography")]


def _cfg(model_dir, methods, storage=None, combine=(), tasks=TASKS):
    data = {"name": "t", "model": str(model_dir), "tasks": tasks, "methods": methods, "training": FAST,
            "evaluation": {"batch_size": 8}, "combine": list(combine)}
    if storage:
        data["storage"] = storage
    return config_from_dict(data)


def _state(mdir):
    model, _ = load_method_model(mdir)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bit_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:  # same machine, same kernels, same seed: the stored bits must match exactly
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8) if a[k].dim() else a[k],
                                                        b[k].view(torch.uint8) if b[k].dim() else b[k]), k


def test_two_round_fft_delta_restores_bit_exactly_and_resumes(tmp_path, tiny_model_dir):
    fft = [{"name": "fft", "trainable": "full"}]
    full = run_experiment(_cfg(tiny_model_dir, fft, {"fft_format": "full"}), tmp_path / "full", progress=False)
    delta = run_experiment(_cfg(tiny_model_dir, fft, {"fft_format": "delta"}), tmp_path / "delta", progress=False)
    assert full["status"] == delta["status"] == {"fft": "ok"}
    for k, task in ((1, "zoology"), (2, "geography")):
        mdir = tmp_path / "delta/fft/rounds" / f"0{k}-{task}/model"
        assert (mdir / "model.delta").is_file() and not (mdir / "model.safetensors").exists()
        assert json.loads((mdir / "cairn_parent.json").read_text())["delta"]["parent_round"] == k - 1
    reference = _state(tmp_path / "full/fft")
    _assert_bit_equal(_state(tmp_path / "delta/fft"), reference)
    r_full = json.loads((tmp_path / "full/fft/results.json").read_text())["matrix"]
    assert json.loads((tmp_path / "delta/fft/results.json").read_text())["matrix"] == r_full
    # Resume: round 2 is gone, round 1 (a delta against the base) is the starting point
    shutil.rmtree(tmp_path / "delta/fft/rounds/02-geography")
    (tmp_path / "delta/fft/results.json").unlink()
    again = run_experiment(_cfg(tiny_model_dir, fft, {"fft_format": "delta"}), tmp_path / "delta", progress=False)
    assert again["status"] == {"fft": "ok"}
    _assert_bit_equal(_state(tmp_path / "delta/fft"), reference)


def test_delta_one_round_ingredients_merge_like_full(tmp_path, tiny_model_dir):
    methods = [{"name": "one-fft", "strategy": "one-round", "trainable": "full"}]
    comb = [{"name": "avg", "kind": "merge", "source": "one-fft", "method": "linear"}]
    run_experiment(_cfg(tiny_model_dir, methods, {"fft_format": "full"}, comb), tmp_path / "full", progress=False)
    out = run_experiment(_cfg(tiny_model_dir, methods, {"fft_format": "delta"}, comb), tmp_path / "delta",
                         progress=False)
    assert set(out["status"].values()) == {"ok"}, out["status"]
    assert (tmp_path / "delta/one-fft/rounds/01-only-zoology/model/model.delta").is_file()
    a = load_file(tmp_path / "full/avg/rounds/01-avg/merged/model.safetensors")
    b = load_file(tmp_path / "delta/avg/rounds/01-avg/merged/model.safetensors")
    _assert_bit_equal(a, b)
    # the materialised full copies were temporary
    assert not list((tmp_path / "delta/one-fft/rounds").glob("*/model-full"))


def test_bf16_copy_reports_rounding_error(tmp_path, tiny_model_dir):
    out = run_experiment(_cfg(tiny_model_dir, [{"name": "fft", "trainable": "full"}], {"bf16_copy": True}),
                         tmp_path / "e", progress=False)
    assert out["status"] == {"fft": "ok"}
    rdir = tmp_path / "e/fft/rounds/01-zoology"
    weights = load_file(rdir / "model-bf16/model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in weights.values() if v.is_floating_point())
    err = json.loads((rdir / "model-bf16/bf16_error.json").read_text())
    assert err["update_norm"] > 0 and err["relative_error"] >= 0
    assert "bf16 copy: rounding error" in (tmp_path / "e/fft/log.txt").read_text()
    # the main checkpoint (a delta by default) stays float32
    from cairn.io.fft_round import load_round

    assert (rdir / "model/model.delta").is_file()
    assert all(v.dtype == torch.float32 for v in load_round(rdir / "model").state_dict().values())


def test_storage_config_validated_and_in_schema(tiny_model_dir):
    with pytest.raises(CairnError, match="fft_format"):
        _cfg(tiny_model_dir, [{"name": "fft", "trainable": "full"}], {"fft_format": "zip"})
    with pytest.raises(CairnError, match="keep"):
        _cfg(tiny_model_dir, [{"name": "fft", "trainable": "full"}], {"keep_model": "all"})
    cfg = _cfg(tiny_model_dir, [{"name": "fft", "trainable": "full"}])
    assert cfg.storage.fft_format == "delta" and cfg.storage.keep_models == "all" and cfg.storage.bf16_copy is False

def test_tied_embeddings_stored_once_and_restored(tmp_path):
    """A tied model (lm_head = embed_tokens, as SmolLM2): the delta holds the shared tensor once."""
    from conftest import make_tiny_model_dir  # noqa: E402
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny_model_dir(tmp_path / "tied")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(model_dir)
    tied = AutoModelForCausalLM.from_pretrained(model_dir)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    fft = [{"name": "fft", "trainable": "full"}]
    run_experiment(_cfg(model_dir, fft, {"fft_format": "full"}, tasks=TASKS[:1]), tmp_path / "full", progress=False)
    run_experiment(_cfg(model_dir, fft, {"fft_format": "delta"}, tasks=TASKS[:1]), tmp_path / "delta", progress=False)
    import struct

    data = (tmp_path / "delta/fft/rounds/01-zoology/model/model.delta").read_bytes()
    header = data[16:16 + struct.unpack("<Q", data[8:16])[0]].decode()  # magic, u64 length, JSON header
    assert "model.embed_tokens.weight" in header and "lm_head.weight" not in header
    _assert_bit_equal(_state(tmp_path / "delta/fft"), _state(tmp_path / "full/fft"))


def test_delta_round_folder_is_a_round_artifact(tmp_path, tiny_model_dir):
    # keep_models other than all with fft_format delta loads (kept deltas are re-based before a prune)
    cfg = _cfg(tiny_model_dir, [{"name": "fft", "trainable": "full"}], {"keep_models": "last", "fft_format": "delta"})
    assert cfg.storage.keep_models == "last"
    from cairn.rundir import round_artifact

    (tmp_path / "fft/rounds/01-a/model").mkdir(parents=True)
    (tmp_path / "fft/rounds/01-a/model/config.json").write_text("{}")
    assert round_artifact(tmp_path / "fft/rounds/01-a") == tmp_path / "fft/rounds/01-a/model"
    (tmp_path / "fft/rounds/01-a/model/model.delta").write_bytes(b"x")
    assert round_artifact(tmp_path / "fft/rounds/01-a") == tmp_path / "fft/rounds/01-a/model"


@pytest.mark.parametrize("exc, code", [(CairnError("bad input here"), 2), (RuntimeError("a bug"), 1)])
def test_cairn_run_exit_code_by_failure_kind(tmp_path, tiny_model_dir, monkeypatch, capsys, exc, code):
    """Every failure a CairnError (bad input, diverged loss): exit 2 with the message; any other crash: 1."""
    from cairn import experiment

    def fail(self, *args, **kwargs):
        raise exc

    monkeypatch.setattr(experiment.Runner, "run_method", fail)
    cfg = _cfg(tiny_model_dir, [{"name": "fft", "trainable": "full"}], tasks=TASKS[:1])
    assert experiment.execute(cfg, tmp_path / "e", progress=False, echo=False) == code
    if code == 2:
        assert "fft: failed: bad input here" in capsys.readouterr().err


def test_keep_models_last_removes_earlier_rounds_and_rerun_does_not_retrain(tmp_path, tiny_model_dir):
    cfg = _cfg(tiny_model_dir, [{"name": "fft", "trainable": "full"}], {"keep_models": "last"})
    assert run_experiment(cfg, tmp_path / "e", progress=False)["status"] == {"fft": "ok"}
    rounds = tmp_path / "e/fft/rounds"
    assert not (rounds / "01-zoology/model").exists() and (rounds / "01-zoology/round.json").is_file()
    assert (rounds / "02-geography/model/model.delta").is_file()  # the default storage, re-based on the base
    # a rerun (results gone) finds both rounds done: nothing is retrained, round 1 is not restored
    (tmp_path / "e/fft/results.json").unlink()
    before = (rounds / "02-geography/round.json").read_text()
    assert run_experiment(cfg, tmp_path / "e", progress=False)["status"] == {"fft": "ok"}
    assert (rounds / "02-geography/round.json").read_text() == before and not (rounds / "01-zoology/model").exists()
    from cairn.commands.export import export_round

    with pytest.raises(CairnError, match="removed after its round finished"):
        export_round(tmp_path / "e", "fft", 1, tmp_path / "out")
