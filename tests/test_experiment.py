"""The experiment runner end to end on a tiny model: results, resume, method isolation, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cairn.config import config_from_dict
from cairn.experiment import run_experiment

FAST = {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "log_every": 1, "max_length": 64}


def _cfg(model_dir, methods, tasks=("zoology", "geography")):
    return config_from_dict({
        "name": "t", "model": str(model_dir),
        "tasks": [{"name": t, "format": "demo", "path": t, "entities": 2, "max_new_tokens": 4} for t in tasks],
        "methods": methods, "training": FAST, "evaluation": {"batch_size": 8},
    })


def test_sequential_lora_and_fft_write_results(tmp_path, tiny_model_dir):
    cfg = _cfg(tiny_model_dir, [{"name": "lora", "trainable": "lora", "lora": {"r": 2, "alpha": 4}},
                                {"name": "fft", "trainable": "full"}])
    out = run_experiment(cfg, tmp_path / "exp", progress=False)
    assert out["status"] == {"lora": "ok", "fft": "ok"}
    for method in ("lora", "fft"):
        res = json.loads((tmp_path / "exp" / method / "results.json").read_text())
        assert res["rows"] == ["base", "zoology", "geography"]
        assert len(res["matrix"]) == 3 and all(len(r) == 2 for r in res["matrix"])
        assert res["figures"]["curriculum"] is True
        assert (tmp_path / "exp" / method / "table.md").read_text().count("\n") >= 4
        assert (tmp_path / "exp" / method / "results.csv").read_text().startswith("after,zoology,geography")
    # LoRA rounds keep a vanilla PEFT adapter; FFT rounds a transformers checkpoint
    assert (tmp_path / "exp/lora/rounds/01-zoology/adapter/adapter_config.json").is_file()
    assert (tmp_path / "exp/fft/rounds/02-geography/model/config.json").is_file()
    status = json.loads((tmp_path / "exp" / "experiment.json").read_text())["status"]
    assert status == {"lora": "ok", "fft": "ok"}


def test_rerun_resumes_from_finished_rounds(tmp_path, tiny_model_dir):
    cfg = _cfg(tiny_model_dir, [{"name": "lora", "trainable": "lora", "lora": {"r": 2, "alpha": 4}}])
    exp = tmp_path / "exp"
    first = run_experiment(cfg, exp, progress=False)["results"]["lora"]
    # Simulate an interruption after round 1: round 2 and the final results are gone.
    (exp / "lora" / "results.json").unlink()
    (exp / "lora" / "rounds" / "02-geography" / "round.json").unlink()
    second = run_experiment(cfg, exp, progress=False)["results"]["lora"]
    log = (exp / "lora" / "log.txt").read_text()
    assert "restoring the model after round 1" in log
    assert second["matrix"] == first["matrix"]  # same seed, same data: the rerun round is identical


def test_round_interrupted_mid_way_records_what_an_uninterrupted_one_does(tmp_path, tiny_model_dir, monkeypatch):
    """A round stopped after step 2 (checkpointed every step) and resumed writes the round.json of an
    uninterrupted round: tokens, steps and the whole loss log, wall times aside."""
    import functools

    from cairn import experiment

    def cfg():
        c = _cfg(tiny_model_dir, [{"name": "fft", "trainable": "full", "diagnostics": False}])
        c.training.max_steps, c.training.save_every, c.training.log_every = 4, 1, 3
        return c

    assert run_experiment(cfg(), tmp_path / "ref", progress=False)["status"] == {"fft": "ok"}
    real = experiment.train

    class Interrupt(Exception):
        pass

    def stop_at_2(step):
        if step == 2:
            raise Interrupt

    @functools.wraps(real)
    def interrupted(*args, **kwargs):
        if "02-geography" in str(kwargs.get("checkpoint_dir")):
            kwargs["on_step"] = stop_at_2
        return real(*args, **kwargs)

    monkeypatch.setattr(experiment, "train", interrupted)
    assert run_experiment(cfg(), tmp_path / "got", progress=False)["status"]["fft"].startswith("failed")
    monkeypatch.undo()
    assert run_experiment(cfg(), tmp_path / "got", progress=False)["status"] == {"fft": "ok"}
    assert "resuming from step 2/4" in (tmp_path / "got/fft/log.txt").read_text()

    def record(run, rdir):
        train = json.loads((run / "fft/rounds" / rdir / "round.json").read_text())["train"]
        assert train["seconds"] > 0
        return {k: v for k, v in train.items() if k not in ("seconds", "tokens_per_second")} | {
            "log": [{k: v for k, v in e.items() if k != "tokens_per_second"} for e in train["log"]]}

    for rdir in ("01-zoology", "02-geography"):
        want = record(tmp_path / "ref", rdir)
        assert [e["step"] for e in want["log"]] == [3, 4] and want["tokens"] > 0
        assert record(tmp_path / "got", rdir) == want  # one process, same kernels: exactly equal


def test_failing_method_does_not_lose_others(tmp_path, tiny_model_dir):
    cfg = _cfg(tiny_model_dir, [
        {"name": "bad", "trainable": "lora", "nlora": {"lam": [0.1]}},  # no λ for round 2
        {"name": "good", "trainable": "lora", "lora": {"r": 2, "alpha": 4}},
    ])
    out = run_experiment(cfg, tmp_path / "exp", progress=False)
    assert out["status"]["good"] == "ok"
    assert out["status"]["bad"].startswith("failed:") and "round 1" in out["status"]["bad"]
    assert not (tmp_path / "exp" / "bad" / "results.json").exists()  # nothing half-written claims success


def test_olora_stack_replay_and_joint(tmp_path, tiny_model_dir):
    cfg = _cfg(tiny_model_dir, [
        {"name": "olora", "trainable": "lora", "lora": {"r": 2, "alpha": 4, "sequential": "stack"},
         "olora": {"lambda1": 0.5}},
        {"name": "olora-merge", "trainable": "lora", "lora": {"r": 2, "alpha": 4}, "olora": {"lambda1": [0.5, 5]}},
        {"name": "replay", "trainable": "full", "replay": 0.5},
        {"name": "joint", "trainable": "lora", "strategy": "joint", "lora": {"r": 2, "alpha": 4}},
    ])
    out = run_experiment(cfg, tmp_path / "exp", progress=False)
    assert set(out["status"].values()) == {"ok"}, out["status"]
    round2 = json.loads((tmp_path / "exp/olora/rounds/02-geography/round.json").read_text())
    logged = round2["train"]["log"][-1]
    assert logged["olora_orth_raw"] > 0 and "olora_orth" in logged  # penalty active and logged separately
    assert (tmp_path / "exp/olora-merge/rounds/01-zoology/olora_A.safetensors").is_file()
    replay = json.loads((tmp_path / "exp/replay/rounds/02-geography/round_data.json").read_text())
    assert len(replay["replay"]) == 6  # half of the 12 geography examples, from zoology
    joint = json.loads((tmp_path / "exp/joint/results.json").read_text())
    assert joint["rows"] == ["base", "joint"]


def test_cli_bad_config_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: m\ntasks: []\nmethods: []\nlearning_rate: 3\n")
    proc = subprocess.run([sys.executable, "-m", "cairn.cli", "run", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown key 'learning_rate'" in proc.stderr and "bad.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_unknown_model_exits_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\nmodel: ./no-such-model\ntasks: [{name: z, format: demo, path: zoology}]\n"
                   "methods: [{name: m}]\n")
    proc = subprocess.run([sys.executable, "-m", "cairn.cli", "run", str(cfg), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "no-such-model" in proc.stderr and "Traceback" not in proc.stderr


def test_old_knowledge_suite_joins_the_results(tmp_path, tiny_model_dir):
    rows = [{"id": str(i), "question": f"Which is {i}?", "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]},
             "answerKey": "ABC"[i % 3]} for i in range(5)]
    folder = tmp_path / "pack" / "old_knowledge" / "arc_easy"
    folder.mkdir(parents=True)
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(tiny_model_dir, [{"name": "lora", "trainable": "lora", "lora": {"r": 2, "alpha": 4}}])
    from cairn.config import OldKnowledgeConfig

    cfg.evaluation.old_knowledge = OldKnowledgeConfig(tasks=["arc_easy"], limit=4, data_dir=str(tmp_path / "pack"),
                                                      when="last")
    run_experiment(cfg, tmp_path / "exp", progress=False)
    res = json.loads((tmp_path / "exp" / "lora" / "results.json").read_text())
    ok = res["old_knowledge"]
    assert ok["tasks"] == ["arc_easy"] and ok["metric"] == {"arc_easy": "acc_norm"}
    assert len(ok["matrix"]) == 3
    assert ok["matrix"][1] == [None]  # 'last': round 1 of 2 is not scored
    assert all(0.0 <= row[0] <= 1.0 for row in (ok["matrix"][0], ok["matrix"][2]))
    assert ok["stderr"][2][0] is not None


def _one_round_cfg(model_dir, combine: list[dict]):
    """Two demo tasks, one-round FFT and LoRA methods (the ingredients), and the given combine steps."""
    return config_from_dict({
        "name": "t", "model": str(model_dir),
        "tasks": [{"name": t, "format": "demo", "path": t, "entities": 2, "max_new_tokens": 4}
                  for t in ("zoology", "geography")],
        "methods": [{"name": "one-fft", "strategy": "one-round", "trainable": "full"},
                    {"name": "one-lora", "strategy": "one-round", "trainable": "lora", "lora": {"r": 2, "alpha": 4}}],
        "combine": combine, "training": FAST, "evaluation": {"batch_size": 8},
    })


def test_one_round_models_merged_and_evaluated(tmp_path, tiny_model_dir):
    cfg = _one_round_cfg(tiny_model_dir, [{"name": "avg", "kind": "merge", "source": "one-fft", "method": "linear"},
                    {"name": "ties-lora", "kind": "merge", "source": "one-lora", "method": "ties",
                     "params": {"density": 0.5}},
                    {"name": "ties-svd", "kind": "merge", "source": "one-lora", "method": "ties",
                     "lora_mode": "svd", "rank": 2, "params": {"density": 0.5}}])
    out = run_experiment(cfg, tmp_path / "exp", progress=False)
    assert set(out["status"].values()) == {"ok"}, out["status"]
    one = json.loads((tmp_path / "exp/one-fft/results.json").read_text())
    assert one["rows"] == ["base", "only-zoology", "only-geography"] and one["figures"]["curriculum"] is False
    for name in ("avg", "ties-lora", "ties-svd"):
        res = json.loads((tmp_path / "exp" / name / "results.json").read_text())
        assert res["rows"] == ["base", name] and len(res["matrix"][1]) == 2
    assert (tmp_path / "exp/avg/rounds/01-avg/merged/config.json").is_file()


def test_combine_requires_one_round_source(tmp_path, tiny_model_dir):
    from cairn.errors import CairnError

    with pytest.raises(CairnError, match="must have `strategy: one-round`"):
        _cfg_dict = {"name": "t", "model": "m", "tasks": [{"name": "z", "format": "demo"}],
                     "methods": [{"name": "seq"}], "combine": [{"name": "c", "source": "seq"}]}
        config_from_dict(_cfg_dict)


def test_moe_mixing_of_one_round_models_with_router_training(tmp_path, tiny_model_dir):
    cfg = _one_round_cfg(tiny_model_dir, [{"name": "moe-fft", "kind": "moe", "source": "one-fft", "params": {"top_k": 2},
                     "router_training": {"max_steps": 2}},
                    {"name": "moe-lora", "kind": "moe", "source": "one-lora",
                     "params": {"top_k": 1, "router_init": "prompts"}, "router_training": {"max_steps": 2}}])
    out = run_experiment(cfg, tmp_path / "exp", progress=False)
    assert set(out["status"].values()) == {"ok"}, out["status"]
    for name in ("moe-fft", "moe-lora"):
        rec = json.loads((tmp_path / "exp" / name / "rounds" / f"01-{name}" / "round.json").read_text())
        assert rec["train"]["stats"]["router_training"]["steps"] == 2
        assert "router_aux" in rec["train"]["stats"]["router_training"]["log"][-1]
    from transformers import AutoModelForCausalLM

    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "exp/moe-fft/rounds/01-moe-fft/moe")
    assert type(moe).__name__ == "MixtralForCausalLM"
    assert (tmp_path / "exp/moe-lora/rounds/01-moe-lora/lora-moe/experts").is_dir()


def test_loramoe_method_logs_balance_loss_and_resumes(tmp_path, tiny_model_dir):
    cfg = config_from_dict({
        "name": "t", "model": str(tiny_model_dir),
        "tasks": [{"name": "zoology", "format": "demo", "path": "zoology", "entities": 2, "max_new_tokens": 4,
                   "world_knowledge": True},
                  {"name": "geography", "format": "demo", "path": "geography", "entities": 2, "max_new_tokens": 4}],
        "methods": [{"name": "loramoe", "trainable": "loramoe",
                     "loramoe": {"experts": 4, "rank": 2, "beta": 0.5, "delta": 0.2}}],
        "training": FAST, "evaluation": {"batch_size": 8},
    })
    exp = tmp_path / "exp"
    out = run_experiment(cfg, exp, progress=False)
    assert out["status"] == {"loramoe": "ok"}, out["status"]
    rec = json.loads((exp / "loramoe/rounds/02-geography/round.json").read_text())
    assert rec["train"]["log"][-1]["loramoe_balance"] > 0
    # resume from the saved mixture: rerunning round 2 restores round 1's experts
    (exp / "loramoe" / "results.json").unlink()
    (exp / "loramoe" / "rounds" / "02-geography" / "round.json").unlink()
    again = run_experiment(cfg, exp, progress=False)["results"]["loramoe"]
    assert again["matrix"] == out["results"]["loramoe"]["matrix"]


def test_method_directory_reloads_the_final_model(tmp_path, tiny_model_dir):
    import torch

    from cairn.experiment import load_method_model

    cfg = _cfg(tiny_model_dir, [{"name": "lora", "trainable": "lora", "lora": {"r": 2, "alpha": 4}}])
    run_experiment(cfg, tmp_path / "exp", progress=False)
    model, tok = load_method_model(tmp_path / "exp" / "lora")
    again, _ = load_method_model(tmp_path / "exp" / "lora")
    ids = torch.tensor([tok("Question: x?")["input_ids"]])
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        a, b, c = model(ids).logits, again(ids).logits, base(ids).logits
    assert torch.equal(a, b) and not torch.allclose(a, c)  # deterministic, and not the base


def test_earlier_adapter_missing_or_from_another_base(tmp_path, tiny_model_dir):
    import shutil

    cfg = _cfg(tiny_model_dir, [{"name": "lora", "trainable": "lora", "lora": {"r": 2, "alpha": 4}}])
    exp = tmp_path / "exp"
    run_experiment(cfg, exp, progress=False)
    (exp / "lora" / "results.json").unlink()
    (exp / "lora" / "rounds" / "02-geography" / "round.json").unlink()
    adapter = exp / "lora" / "rounds" / "01-zoology" / "adapter"
    shutil.move(adapter, tmp_path / "saved-adapter")
    out = run_experiment(cfg, exp, progress=False)
    assert "round 1's adapter" in out["status"]["lora"] and "is missing" in out["status"]["lora"]
    # an adapter trained on a differently shaped base
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    get_peft_model(wide, LoraConfig(r=2, target_modules="all-linear"), adapter_name="round1").save_pretrained(adapter)
    out = run_experiment(cfg, exp, progress=False)
    assert "made for another base" in out["status"]["lora"], out["status"]
