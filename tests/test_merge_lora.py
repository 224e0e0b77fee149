"""LoRA adapter merging: equal to PEFT's add_weighted_adapter per factor, loadable by vanilla PEFT."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from cairn.combine.merge_lora import merge_adapters, svd_factorize
from cairn.errors import CairnError



def _config(**overrides):
    from transformers import LlamaConfig

    args = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    args.update(overrides)
    return LlamaConfig(**args)


def _adapter(base_dir: Path, out: Path, r: int, alpha: int, seed: int, targets=("q_proj", "v_proj"), **config):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B is zero at init; give both factors trained-looking values
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("merge_lora")
    torch.manual_seed(0)
    LlamaForCausalLM(_config()).save_pretrained(root / "base")
    _adapter(root / "base", root / "a0", r=4, alpha=8, seed=1)
    _adapter(root / "base", root / "a1", r=4, alpha=16, seed=2)
    _adapter(root / "base", root / "a2", r=2, alpha=4, seed=3, use_rslora=True)  # another rank and scaling rule
    _adapter(root / "base", root / "a_k", r=4, alpha=8, seed=4, targets=("k_proj",))
    LlamaForCausalLM(_config(hidden_size=48)).save_pretrained(root / "wide")
    _adapter(root / "wide", root / "a_wide", r=4, alpha=8, seed=5)
    return root


def _peft(base: Path, adapter: Path, name="default"):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter, adapter_name=name)


@pytest.mark.parametrize("method,peft_type", [("ties", "ties"), ("task_arithmetic", "linear")])
def test_per_factor_equals_peft_add_weighted_adapter(tiny, tmp_path, method, peft_type):
    out = tmp_path / "merged"
    merge_adapters([tiny / "a0", tiny / "a1"], out, method, mode="per_factor", weights=[1.0, 0.7], density=0.5,
                   progress=False)
    reference = _peft(tiny / "base", tiny / "a0", "a0")
    reference.load_adapter(tiny / "a1", adapter_name="a1")
    reference.add_weighted_adapter(["a0", "a1"], [1.0, 0.7], "mix", combination_type=peft_type, density=0.5)
    ours = _peft(tiny / "base", out)  # vanilla PEFT loads the merged adapter
    theirs = {k.replace(".mix.", ".default."): v for k, v in reference.state_dict().items() if ".mix." in k}
    mine = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    assert theirs.keys() == mine.keys()
    for k in mine:  # two implementations of the same arithmetic: equal up to float32 rounding of reductions
        torch.testing.assert_close(mine[k], theirs[k], rtol=1e-6, atol=1e-7)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 4


def test_svd_at_full_rank_equals_full_model_merge(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    args = dict(density=0.5, weights=[1.0, 2.0], progress=False)
    svd = merge_adapters([tiny / "a0", tiny / "a1"], tmp_path / "svd", "ties", mode="svd", rank=32, **args)
    merge_adapters([tiny / "a0", tiny / "a1"], tmp_path / "full", "ties", mode="full", base=tiny / "base", **args)
    assert svd["svd_energy_kept_min"] > 0.999999
    folded = _peft(tiny / "base", tmp_path / "svd").merge_and_unload().state_dict()
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full").state_dict()
    assert all(torch.allclose(folded[k], full[k], atol=1e-5) for k in full)
    base = AutoModelForCausalLM.from_pretrained(tiny / "base").state_dict()
    changed = [k for k in full if not torch.equal(full[k], base[k])]
    assert sorted({k.split(".")[-2] for k in changed}) == ["q_proj", "v_proj"]


def test_svd_truncation_by_hand():
    # diag(3, 2, 1) at rank 2 keeps (9 + 4) / 14 of the energy and the two leading components
    a, b, kept = svd_factorize(torch.diag(torch.tensor([3.0, 2.0, 1.0])), 2)
    assert abs(kept - 13 / 14) < 1e-6
    assert torch.allclose(b @ a, torch.diag(torch.tensor([3.0, 2.0, 0.0])), atol=1e-6)
    a, b, _ = svd_factorize(torch.ones(2, 3), 4)  # rank above min(out, in) is zero-padded
    assert a.shape == (4, 3) and b.shape == (2, 4) and torch.allclose(b @ a, torch.ones(2, 3), atol=1e-6)


def test_different_ranks_merge_in_every_mode(tiny, tmp_path):
    from peft import PeftModel

    adapters = [tiny / "a0", tiny / "a2"]  # r = 4 (alpha/r) and r = 2 (rsLoRA, alpha/sqrt r)
    s = merge_adapters(adapters, tmp_path / "pf", "linear", mode="per_factor", progress=False)
    assert s["input_ranks"] == [2, 4] and s["output_rank"] == 4
    merge_adapters(adapters, tmp_path / "svd", "linear", mode="svd", rank=64, progress=False)
    # the SVD mode at full rank is exactly the average of the two updates ΔW = s·B·A
    deltas = []
    for adapter in adapters:
        model = _peft(tiny / "base", adapter)
        deltas.append(model.base_model.model.model.layers[0].self_attn.q_proj.get_delta_weight("default"))
    merged = _peft(tiny / "base", tmp_path / "svd").base_model.model.model.layers[0].self_attn.q_proj
    assert torch.allclose(merged.get_delta_weight("default"), (deltas[0] + deltas[1]) / 2, atol=1e-5)
    assert isinstance(_peft(tiny / "base", tmp_path / "pf"), PeftModel)


def test_per_factor_average_of_identical_adapters_is_identity(tiny, tmp_path):
    shutil.copytree(tiny / "a1", tmp_path / "copy")
    merge_adapters([tiny / "a1", tmp_path / "copy"], tmp_path / "avg", "average", progress=False)
    before = _peft(tiny / "base", tiny / "a1").base_model.model.model.layers[1].self_attn.v_proj
    after = _peft(tiny / "base", tmp_path / "avg").base_model.model.model.layers[1].self_attn.v_proj
    assert torch.allclose(before.get_delta_weight("default"), after.get_delta_weight("default"), atol=1e-6)


def test_cli_detects_adapters(tiny, tmp_path, capsys):
    from cairn.cli import main

    code = main(["merge", "--method", "dare_ties", "--models", str(tiny / "a0"), str(tiny / "a1"),
                 "--density", "0.2", "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 0 and (tmp_path / "o" / "adapter_model.safetensors").is_file()
    assert "DARE drop rate observed" in capsys.readouterr().out


def test_bad_adapter_inputs(tiny, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CairnError, match="q_proj is adapted in .* but not in"):
        merge_adapters([tiny / "a0", tiny / "a_k"], out, "ties", progress=False)
    with pytest.raises(CairnError, match="different base architectures"):
        merge_adapters([tiny / "a0", tiny / "a_wide"], out, "ties", progress=False)
    with pytest.raises(CairnError, match="give the base model"):
        merge_adapters([tiny / "a0", tiny / "a1"], out, "ties", mode="full", progress=False)
    with pytest.raises(CairnError, match="is this the adapters' base"):
        merge_adapters([tiny / "a0", tiny / "a1"], out, "ties", mode="full", base=tiny / "wide", progress=False)
    assert not out.exists() and not list(tmp_path.glob(".tmp-out-*"))
