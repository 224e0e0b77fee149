"""``cairn mix`` on tiny models and adapters: outputs that load, and bad input."""

from __future__ import annotations

import pytest
import torch

from cairn.cli import main

from conftest import make_tiny_model_dir


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("mix")
    base = make_tiny_model_dir(root / "base")
    fft, adapters = [], []
    for i in range(2):
        model = AutoModelForCausalLM.from_pretrained(base)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "mlp" in name:
                    p.add_(0.01 * torch.randn_like(p))
        model.save_pretrained(root / f"fft{i}")
        fft.append(root / f"fft{i}")
        torch.manual_seed(i)
        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                              LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        peft.save_pretrained(root / f"lora{i}")
        adapters.append(root / f"lora{i}")
    prompts = []
    for i in range(2):
        (root / f"p{i}.txt").write_text(f"Question: about topic {i}?\nAnother prompt {i}\n")
        prompts.append(str(root / f"p{i}.txt"))
    return base, fft, adapters, prompts, root


def test_mix_fft_models_into_mixtral(experts, capsys):
    from transformers import AutoModelForCausalLM

    base, fft, _, prompts, root = experts
    out = root / "moe-fft"
    code = main(["mix", "--base", str(base), "--experts", *map(str, fft), "--top-k", "1",
                 "--router-prompts", *prompts, "--out", str(out)])
    assert code == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 2
    assert main(["mix", "--base", str(base), "--experts", *map(str, fft), "--out", str(out)]) == 2  # exists


def test_mix_lora_adapters(experts):
    base, _, adapters, _, root = experts
    out = root / "moe-lora"
    assert main(["mix", "--base", str(base), "--experts", *map(str, adapters), "--top-k", "0", "--out", str(out)]) == 0
    assert (out / "experts").is_dir()


def test_mix_bad_input(experts, capsys):
    base, fft, adapters, prompts, root = experts
    assert main(["mix", "--base", str(base), "--experts", str(fft[0]), str(adapters[0]), "--out", str(root / "x")]) == 2
    assert "mixes LoRA adapters and full models" in capsys.readouterr().err
    assert main(["mix", "--base", str(base), "--experts", *map(str, fft), "--router-prompts", prompts[0],
                 "--out", str(root / "y")]) == 2
    assert "one file per expert" in capsys.readouterr().err
    assert not (root / "x").exists() and not (root / "y").exists()
