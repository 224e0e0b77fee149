"""LoRA "average" as the seed paper: the default mode merges each adapter into the model and averages
the models, i.e. base + mean ΔW; per_factor (PEFT add_weighted_adapter) is not the mean ΔW."""

from __future__ import annotations

import torch

from cairn.combine.merge_lora import merge_adapters
from cairn.config import CombineConfig

from test_merge_lora import _peft, tiny  # noqa: F401  (module fixture: a tiny Llama and LoRA adapters)


def test_default_lora_mode_is_mean_delta_w():
    assert CombineConfig(name="m", source="s").lora_mode == "full"


def test_linear_full_equals_mean_of_merged_models(tiny, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM

    adapters = [tiny / "a0", tiny / "a1"]
    merge_adapters(adapters, tmp_path / "avg", "linear", mode="full", base=tiny / "base", progress=False)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "avg").state_dict()
    merged = [_peft(tiny / "base", a).merge_and_unload().state_dict() for a in adapters]
    # float32 sums of the same terms in another order: equal within a few ulps of the weights' size
    for k in got:
        want = (merged[0][k] + merged[1][k]) / 2
        assert torch.allclose(got[k], want, atol=1e-6), k
    merge_adapters(adapters, tmp_path / "pf", "linear", mode="per_factor", progress=False)
    pf = _peft(tiny / "base", tmp_path / "pf").merge_and_unload().state_dict()
    q = next(k for k in got if k.endswith("q_proj.weight"))
    assert not torch.allclose(pf[q], got[q], atol=1e-4)  # per-factor averaging is not the mean ΔW
