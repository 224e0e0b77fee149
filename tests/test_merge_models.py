"""Streamed full-model merging on tiny saved Llama models, reloaded with vanilla transformers."""

import json
from pathlib import Path

import pytest
import torch

from cairn.combine.merge_fns import MergeSpec, merge_tensor
from cairn.combine.merge_models import TensorReader, list_tensors, merge_models, tensor_generators
from cairn.errors import CairnError


def _config(**overrides):
    from transformers import LlamaConfig

    args = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    args.update(overrides)
    return LlamaConfig(**args)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """base, two fine-tunes (small perturbations; m1 saved in several shards), an unrelated model."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("merge_models")
    torch.manual_seed(0)
    base = LlamaForCausalLM(_config())
    base.save_pretrained(root / "base")
    for i in range(2):
        model = LlamaForCausalLM(_config())
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.002)
        model.save_pretrained(root / f"m{i}", max_shard_size="40KB" if i else "5GB")
    LlamaForCausalLM(_config()).save_pretrained(root / "stranger")  # same shapes, another init
    LlamaForCausalLM(_config(intermediate_size=48)).save_pretrained(root / "other_arch")
    return root


def _state(path: Path) -> dict[str, torch.Tensor]:
    with TensorReader() as reader:
        return {n: reader.read_full(r).clone() for n, r in list_tensors(path).items()}


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_streamed_merge_equals_in_memory_and_reloads(tiny, tmp_path, method):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    summary = merge_models(tiny / "base", [tiny / "m0", tiny / "m1"], out, method, density=0.3, weights=[1.0, 0.5],
                           lam=0.8, chunk_elems=700, max_shard_size="30KB", progress=False)
    # small shards: several files and an index, as save_pretrained writes them
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert summary["shards"] > 1 and len(set(index["weight_map"].values())) == summary["shards"]
    assert (out / "config.json").is_file() and (out / "cairn_merge.json").is_file()
    base, models = _state(tiny / "base"), [_state(tiny / "m0"), _state(tiny / "m1")]
    spec = MergeSpec(method, density=0.3, weights=[1.0, 0.5], lam=0.8)
    reloaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, b in base.items():
        expected, _ = merge_tensor(spec, [m[name] for m in models], b, generators=tensor_generators(0, name, 2))
        # Streaming cuts tensors into 700-element chunks, so elements fall in other SIMD lanes/tails than
        # in the whole-tensor merge; kernels may fuse multiply-adds differently there (a 1-ulp change).
        # A few float32 ulps of tolerance; a chunking bug (wrong offsets, masks, thresholds) is far larger.
        torch.testing.assert_close(reloaded[name], expected, rtol=4e-7, atol=1e-7, msg=name)
    if method == "ties":
        assert abs(summary["fraction_trimmed"] - 0.7) < 0.01
        assert summary["sign_conflicts_resolved"] > 0
    if method == "dare_ties":
        assert abs(summary["dare_drop_rate_observed"] - 0.7) < 0.02
    assert 0.01 < summary["relative_delta_norm"][str(tiny / "m0")] < 0.1


def test_dare_does_not_depend_on_chunk_size(tiny, tmp_path):
    args = dict(density=0.5, progress=False)
    merge_models(tiny / "base", [tiny / "m0", tiny / "m1"], tmp_path / "a", "dare", chunk_elems=313, **args)
    merge_models(tiny / "base", [tiny / "m0", tiny / "m1"], tmp_path / "b", "dare", chunk_elems=1 << 20, **args)
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_linear_without_base_is_the_average(tiny, tmp_path):
    merge_models(None, [tiny / "m0", tiny / "m1"], tmp_path / "avg", "average", progress=False)
    avg, m0, m1 = _state(tmp_path / "avg"), _state(tiny / "m0"), _state(tiny / "m1")
    assert all(torch.allclose(avg[n], (m0[n] + m1[n]) / 2) for n in avg)


def _assert_refused(tiny, tmp_path, match, **kwargs):
    out = tmp_path / "out"
    args = dict(base=tiny / "base", models=[tiny / "m0", tiny / "m1"], out=out, method="ties", progress=False)
    args.update(kwargs)
    with pytest.raises(CairnError, match=match):
        merge_models(**args)
    assert not out.exists()
    assert not list(tmp_path.glob(".tmp-out-*"))  # no partial directory left behind


def test_bad_inputs_are_refused_without_partial_output(tiny, tmp_path):
    _assert_refused(tiny, tmp_path, "intermediate_size", models=[tiny / "m0", tiny / "other_arch"])
    _assert_refused(tiny, tmp_path, "probably not the model's base", base=tiny / "stranger")
    _assert_refused(tiny, tmp_path, r"density must be in \(0, 1\]", density=0.0)
    _assert_refused(tiny, tmp_path, "3 weights for 2 models", weights=[1, 1, 1])
    _assert_refused(tiny, tmp_path, "give --base", base=None)


def test_missing_tensor_is_named(tiny, tmp_path):
    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny / "m0" / "config.json").read_text())
    state = _state(tiny / "m0")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    _assert_refused(tiny, tmp_path, "up_proj.weight of the base .* is missing from model .*broken", models=[tiny / "m0", broken])


def test_existing_output_needs_overwrite(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(CairnError, match="--overwrite"):
        merge_models(tiny / "base", [tiny / "m0", tiny / "m1"], out, "ties", progress=False)
    assert (out / "keep.txt").is_file()
    merge_models(tiny / "base", [tiny / "m0", tiny / "m1"], out, "ties", progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_cli_merge_and_error_exit(tiny, tmp_path, capsys):
    from cairn.cli import main

    out = tmp_path / "cli"
    code = main(["merge", "--method", "ties", "--base", str(tiny / "base"), "--models", str(tiny / "m0"),
                 str(tiny / "m1"), "--density", "0.2", "--out", str(out), "--no-progress"])
    assert code == 0 and (out / "model.safetensors").is_file()
    assert "fraction trimmed (TIES): 0.8" in capsys.readouterr().out
    code = main(["merge", "--method", "dare", "--base", str(tiny / "base"), "--models", str(tiny / "m0"),
                 str(tiny / "m1"), "--drop-rate", "1.0", "--out", str(tmp_path / "bad"), "--no-progress"])
    assert code == 2 and "drop-rate" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_streamed_trim_ties_match_in_memory(tmp_path):
    """Deltas on a coarse grid tie at the trim threshold; chunked and whole-tensor trims must agree."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (40, 30), "b.weight": (7,)}
    (tmp_path / "base").mkdir()
    save_file({n: torch.zeros(s) for n, s in shapes.items()}, str(tmp_path / "base" / "model.safetensors"))
    models = []
    for i in range(3):
        d = tmp_path / f"q{i}"
        d.mkdir()
        state = {n: torch.randint(-3, 4, s, generator=gen).float() for n, s in shapes.items()}
        save_file(state, str(d / "model.safetensors"))
        models.append(state)
    for d in ["base", "q0", "q1", "q2"]:
        (tmp_path / d / "config.json").write_text("{}")
    summary = merge_models(tmp_path / "base", [tmp_path / f"q{i}" for i in range(3)], tmp_path / "out", "ties",
                           density=0.3, chunk_elems=97, progress=False)
    merged = _state(tmp_path / "out")
    spec = MergeSpec("ties", density=0.3)
    for name, shape in shapes.items():
        expected, _ = merge_tensor(spec, [m[name] for m in models], torch.zeros(shape))
        assert torch.equal(merged[name], expected), name
    # exactly floor(0.3 n) kept per model and tensor despite the ties: 360 of 1200 and 2 of 7
    assert summary["fraction_trimmed"] == pytest.approx(1 - (360 + 2) / (1200 + 7))
