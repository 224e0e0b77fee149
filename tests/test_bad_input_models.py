"""Bad-input corpus, part 2: broken models, adapters, merges, mixes and reports at every entry point.

Fixtures build one tiny base model folder and derive broken copies (truncated or random-bytes
weights, no tokenizer, a tokenizer larger than the model's vocabulary, ...), adapters of this base and
of another base, and full models with mismatched shapes, dtypes or vocabularies. Every case runs the
CLI in-process and must exit 2 with one message naming the file at fault, no traceback, and no
output left behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from cairn.cli import main

from conftest import make_tiny_model_dir


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Every broken input, built once: name -> path."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("zoo")
    base = make_tiny_model_dir(root / "base")
    z = {"base": base, "root": root}
    st = "model.safetensors"
    z["missing"] = root / "does-not-exist"
    z["no-config"] = _copy(base, root / "no-config")
    (z["no-config"] / "config.json").unlink()
    z["bad-config-json"] = _copy(base, root / "bad-config-json")
    (z["bad-config-json"] / "config.json").write_text("{not json")
    z["truncated"] = _copy(base, root / "truncated")
    data = (base / st).read_bytes()
    (z["truncated"] / st).write_bytes(data[: len(data) // 2])
    z["random-bytes"] = _copy(base, root / "random-bytes")
    (z["random-bytes"] / st).write_bytes(os.urandom(4096))
    z["empty-weights"] = _copy(base, root / "empty-weights")
    (z["empty-weights"] / st).write_bytes(b"")
    z["no-weights"] = _copy(base, root / "no-weights")
    (z["no-weights"] / st).unlink()
    z["no-tokenizer"] = _copy(base, root / "no-tokenizer")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (z["no-tokenizer"] / f).unlink(missing_ok=True)
    z["small-vocab"] = _copy(base, root / "small-vocab")  # its tokenizer has more ids than the embedding
    cfg = json.loads((base / "config.json").read_text())
    cfg["vocab_size"] = 40
    (z["small-vocab"] / "config.json").write_text(json.dumps(cfg))
    # full models: one fine-tuned, one of another shape, one in another dtype, one with another vocabulary
    ft = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.01)
    ft.save_pretrained(root / "ft")
    z["ft"] = root / "ft"
    from conftest import make_tiny_llama

    other = make_tiny_llama(vocab=100, hidden=64)
    other.save_pretrained(root / "other-shape")
    z["other-shape"] = root / "other-shape"
    ft.to(torch.float16).save_pretrained(root / "fp16")
    z["fp16"] = root / "fp16"
    wide = make_tiny_llama(vocab=150, hidden=32)
    wide.save_pretrained(root / "other-vocab")
    z["other-vocab"] = root / "other-vocab"
    # adapters
    def adapter(name, model_dir, targets, r=2):
        torch.manual_seed(0)
        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                              LoraConfig(r=r, lora_alpha=4, target_modules=targets, init_lora_weights=False))
        peft.save_pretrained(root / name)
        return root / name

    z["adapter"] = adapter("adapter", base, ["q_proj", "v_proj"])
    z["adapter2"] = adapter("adapter2", base, ["q_proj", "v_proj"])
    z["adapter-other-layout"] = adapter("adapter-other-layout", base, ["k_proj", "o_proj"], r=4)
    z["adapter-other-base"] = adapter("adapter-other-base", z["other-shape"], ["q_proj", "v_proj"])
    cfgp = json.loads((z["adapter-other-base"] / "adapter_config.json").read_text())
    cfgp["base_model_name_or_path"] = str(base)  # claims our base, but its shapes are another model's
    (z["adapter-other-base"] / "adapter_config.json").write_text(json.dumps(cfgp))
    for name in ("adapter", "adapter2"):
        c = json.loads((z[name] / "adapter_config.json").read_text())
        c["base_model_name_or_path"] = str(base)
        (z[name] / "adapter_config.json").write_text(json.dumps(c))
    z["adapter-corrupt-config"] = _copy(z["adapter"], root / "adapter-corrupt-config")
    (z["adapter-corrupt-config"] / "adapter_config.json").write_text("{\"r\": 2,")
    z["adapter-no-base"] = _copy(z["adapter"], root / "adapter-no-base")
    c = json.loads((z["adapter"] / "adapter_config.json").read_text())
    c["base_model_name_or_path"] = None
    (z["adapter-no-base"] / "adapter_config.json").write_text(json.dumps(c))
    z["adapter-truncated"] = _copy(z["adapter"], root / "adapter-truncated")
    f = z["adapter-truncated"] / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    z["not-a-run"] = root / "empty-dir"
    z["not-a-run"].mkdir()
    (root / "p1.txt").write_text("a prompt\n")
    (root / "p2.txt").write_text("another prompt\n")
    (root / "empty.txt").write_text("\n\n")
    (root / "latin1.txt").write_bytes(b"caf\xe9\n")
    return z


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _clean(code: int, err: str, expect: list[str]) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    # progress bars of transformers may precede it on stderr; the error itself is one line
    messages = [line for line in err.splitlines() if line.startswith("cairn ")]
    assert len(messages) == 1, err
    for piece in expect:
        assert piece in messages[0], (piece, err)


BAD_MODELS = [  # (zoo key, the file or words the message must name)
    ("missing", ["does-not-exist"]), ("no-config", ["no config.json"]), ("bad-config-json", ["config.json"]),
    ("truncated", ["model.safetensors", "truncated or corrupt"]), ("random-bytes", ["model.safetensors"]),
    ("empty-weights", ["model.safetensors"]), ("no-tokenizer", ["tokenizer"]),
    ("small-vocab", ["vocab_size 40", "does not belong"]),
]


def _experiment(z, model: Path, out: Path) -> Path:
    cfg = {"name": "t", "model": str(model), "output_dir": str(out),
           "tasks": [{"name": "zoology", "format": "demo", "path": "zoology", "entities": 2}],
           "methods": [{"name": "lora", "lora": {"r": 2}}], "training": {"max_steps": 1, "batch_size": 2}}
    path = out.parent / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("key,expect", BAD_MODELS, ids=[b[0] for b in BAD_MODELS])
def test_run_with_bad_model(key, expect, zoo, tmp_path, capsys):
    out = tmp_path / "runs"
    out.mkdir()
    code, err = _run(capsys, ["run", _experiment(zoo, zoo[key], out)])
    _clean(code, err, expect)
    assert not any(out.iterdir())  # refused before the run directory was started


@pytest.mark.parametrize("key,expect", BAD_MODELS, ids=[b[0] for b in BAD_MODELS])
def test_eval_with_bad_model(key, expect, zoo, tmp_path, capsys):
    code, err = _run(capsys, ["eval", zoo[key], "--tasks", "arc_easy", "--limit", "1", "--output", tmp_path / "r.json"])
    _clean(code, err, expect)
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("key,expect", [b for b in BAD_MODELS if b[0] != "small-vocab"],
                         ids=[b[0] for b in BAD_MODELS if b[0] != "small-vocab"])
def test_mix_with_bad_base(key, expect, zoo, tmp_path, capsys):
    code, err = _run(capsys, ["mix", "--base", zoo[key], "--experts", zoo["ft"], zoo["ft"], "--out", tmp_path / "o"])
    _clean(code, err, expect)
    assert not (tmp_path / "o").exists()


EVAL_CASES = [
    ("output-is-dir", lambda z, t: ["eval", z["base"], "--tasks", "arc_easy", "--output", t], ["--output", "directory"]),
    ("unknown-task", lambda z, t: ["eval", z["base"], "--tasks", "trivia"], ["'trivia'"]),
    ("limit-0", lambda z, t: ["eval", z["base"], "--limit", "0"], ["--limit"]),
    ("batch-0", lambda z, t: ["eval", z["base"], "--batch-size", "0"], ["--batch-size"]),
    ("fewshot-neg", lambda z, t: ["eval", z["base"], "--num-fewshot", "-1"], ["--num-fewshot"]),
    ("gen-toks-0", lambda z, t: ["eval", z["base"], "--max-gen-toks", "0"], ["--max-gen-toks"]),
    ("data-file-spec", lambda z, t: ["eval", z["base"], "--data-file", "arc_easy"], ["TASK=FILE"]),
    ("data-file-missing", lambda z, t: ["eval", z["base"], "--data-file", f"arc_easy={t}/x.jsonl"], ["does not exist"]),
    ("data-file-task", lambda z, t: ["eval", z["base"], "--data-file", f"trivia={z['root']}/p1.txt"], ["'trivia'"]),
    ("adapter-corrupt-config", lambda z, t: ["eval", z["adapter-corrupt-config"]], ["adapter_config.json"]),
    ("adapter-no-base", lambda z, t: ["eval", z["adapter-no-base"]], ["base_model_name_or_path"]),
    ("adapter-other-base", lambda z, t: ["eval", z["adapter-other-base"], "--tasks", "arc_easy"],
     ["adapter-other-base", "does not fit"]),
    ("adapter-truncated", lambda z, t: ["eval", z["adapter-truncated"], "--tasks", "arc_easy"],
     ["adapter_model.safetensors"]),
    ("not-a-run-dir", lambda z, t: ["eval", z["not-a-run"]], ["not a model folder"]),
]


@pytest.mark.parametrize("case", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_eval_bad_input(case, zoo, tmp_path, capsys, monkeypatch):
    import cairn.eval.suites as suites

    def no_scoring(*a, **k):
        raise AssertionError("the bad input should have been refused before scoring")

    monkeypatch.setattr(suites, "evaluate_suite", no_scoring)
    _, argv, expect = case
    code, err = _run(capsys, argv(zoo, tmp_path))
    _clean(code, err, expect)


MERGE_CASES = [
    ("adapter-corrupt-config", lambda z, t: ["--method", "ties", "--adapters", "--models", z["adapter"],
                                             z["adapter-corrupt-config"]], ["adapter_config.json"]),
    ("adapter-other-layout", lambda z, t: ["--method", "linear", "--models", z["adapter"], z["adapter-other-layout"]],
     []),
    ("adapter-truncated", lambda z, t: ["--method", "linear", "--models", z["adapter"], z["adapter-truncated"]],
     ["adapter_model.safetensors"]),
    ("models-other-shape", lambda z, t: ["--method", "ties", "--base", z["base"], "--models", z["ft"],
                                         z["other-shape"]], []),
    ("models-other-vocab", lambda z, t: ["--method", "ties", "--base", z["base"], "--models", z["ft"],
                                         z["other-vocab"]], []),
    ("base-other-shape", lambda z, t: ["--method", "ties", "--base", z["other-shape"], "--models", z["ft"]], []),
    ("model-truncated", lambda z, t: ["--method", "ties", "--base", z["base"], "--models", z["ft"], z["truncated"]],
     ["model.safetensors"]),
    ("model-missing", lambda z, t: ["--method", "ties", "--base", z["base"], "--models", z["ft"], z["missing"]],
     ["does-not-exist"]),
    ("base-random-bytes", lambda z, t: ["--method", "ties", "--base", z["random-bytes"], "--models", z["ft"], z["ft"]],
     ["model.safetensors"]),
    ("mixed-kinds", lambda z, t: ["--method", "ties", "--base", z["base"], "--models", z["ft"], z["adapter"]],
     ["PEFT adapters"]),
    ("drop-rate-1", lambda z, t: ["--method", "dare", "--base", z["base"], "--models", z["ft"], z["ft"], "--drop-rate", "1"],
     ["--drop-rate"]),
    ("density-0", lambda z, t: ["--method", "ties", "--base", z["base"], "--models", z["ft"], z["ft"], "--density", "0"],
     ["density"]),
    ("weights-count", lambda z, t: ["--method", "ties", "--base", z["base"], "--models", z["ft"], z["ft"], "--weights",
                                    "1", "2", "3"], ["weight"]),
    ("rank-for-models", lambda z, t: ["--method", "ties", "--base", z["base"], "--models", z["ft"], z["ft"], "--rank", "2"],
     ["--rank"]),
    ("no-base", lambda z, t: ["--method", "ties", "--models", z["ft"], z["ft"]], ["base"]),
]


@pytest.mark.parametrize("case", MERGE_CASES, ids=[c[0] for c in MERGE_CASES])
def test_merge_bad_input(case, zoo, tmp_path, capsys):
    _, argv, expect = case
    out = tmp_path / "merged"
    code, err = _run(capsys, ["merge", *argv(zoo, tmp_path), "--out", out])
    _clean(code, err, expect)
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_merge_fp16_model_with_fp32_base_is_not_a_crash(zoo, tmp_path, capsys):
    # another dtype is not an error (tensors are merged in float32 and written in --dtype); it must not crash
    code, err = _run(capsys, ["merge", "--method", "ties", "--base", zoo["base"], "--models", zoo["ft"], zoo["fp16"],
                              "--out", tmp_path / "m"])
    assert code in (0, 2) and "Traceback" not in err


MIX_CASES = [
    ("expert-truncated", lambda z: ["--experts", z["ft"], z["truncated"]], ["model.safetensors"]),
    ("expert-other-shape", lambda z: ["--experts", z["ft"], z["other-shape"]], []),
    ("expert-other-vocab", lambda z: ["--experts", z["ft"], z["other-vocab"]], []),
    ("expert-fp16", lambda z: ["--experts", z["ft"], z["fp16"], "--top-k", "3"], ["top_k"]),
    ("adapter-other-base", lambda z: ["--experts", z["adapter"], z["adapter-other-base"]], ["adapter-other-base"]),
    ("adapter-corrupt-config", lambda z: ["--experts", z["adapter"], z["adapter-corrupt-config"]],
     ["adapter_config.json"]),
    ("adapter-truncated", lambda z: ["--experts", z["adapter"], z["adapter-truncated"]],
     ["adapter_model.safetensors"]),
    ("expert-missing", lambda z: ["--experts", z["ft"], z["missing"]], ["does-not-exist"]),
    ("mixed-kinds", lambda z: ["--experts", z["ft"], z["adapter"]], ["mixes LoRA adapters and full models"]),
    ("prompt-count", lambda z: ["--experts", z["ft"], z["ft"], "--router-prompts", z["root"] / "p1.txt"],
     ["one file per expert"]),
    ("prompt-empty", lambda z: ["--experts", z["ft"], z["ft"], "--router-prompts", z["root"] / "p1.txt",
                                z["root"] / "empty.txt"], ["empty.txt"]),
    ("prompt-latin1", lambda z: ["--experts", z["ft"], z["ft"], "--router-prompts", z["root"] / "p1.txt",
                                 z["root"] / "latin1.txt"], ["latin1.txt", "UTF-8"]),
    ("prompt-missing", lambda z: ["--experts", z["ft"], z["ft"], "--router-prompts", z["root"] / "p1.txt",
                                  z["root"] / "nope.txt"], ["nope.txt"]),
    ("top-k-neg", lambda z: ["--experts", z["ft"], z["ft"], "--top-k", "-1"], ["top_k"]),
    ("prompts-init-without-prompts", lambda z: ["--experts", z["ft"], z["ft"], "--router-init", "prompts"],
     ["--router-prompts"]),
]


@pytest.mark.parametrize("case", MIX_CASES, ids=[c[0] for c in MIX_CASES])
def test_mix_bad_input(case, zoo, tmp_path, capsys):
    _, argv, expect = case
    out = tmp_path / "moe"
    code, err = _run(capsys, ["mix", "--base", zoo["base"], *argv(zoo), "--out", out])
    _clean(code, err, expect)
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def _report_cases(t: Path):
    (t / "no-results").mkdir()
    (t / "bad-json").mkdir()
    (t / "bad-json" / "results.json").write_text("{")
    (t / "latin1").mkdir()
    (t / "latin1" / "results.json").write_bytes(b'{"name": "caf\xe9"}')
    (t / "wrong-shape").mkdir()
    (t / "wrong-shape" / "results.json").write_text('{"name": "x"}')
    (t / "bad-exp").mkdir()
    (t / "bad-exp" / "experiment.json").write_text("[1, 2]")
    return {"missing": t / "nope", "no-results": t / "no-results", "bad-json": t / "bad-json",
            "latin1": t / "latin1", "wrong-shape": t / "wrong-shape", "bad-exp": t / "bad-exp"}


@pytest.mark.parametrize("key", ["missing", "no-results", "bad-json", "latin1", "wrong-shape", "bad-exp"])
def test_report_bad_input(key, tmp_path, capsys):
    dirs = _report_cases(tmp_path)
    code, err = _run(capsys, ["report", dirs[key], "--out", tmp_path / "rep"])
    _clean(code, err, [key if key != "missing" else "nope"])
    assert not (tmp_path / "rep").exists()
