"""Read each round's weight update ΔW back from a method's saved artifacts, for the diagnostics.

LoRA rounds: ΔW = (alpha / r) · B·A from the round's PEFT adapter file (vanilla PEFT layout).
Full fine-tuning rounds: ΔW = W_k − W_{k−1} from consecutive round checkpoints (round 0 = base),
for the transformer blocks' 2-D weights (embeddings and the output layer are left out: they are
vocabulary-sized and not what the collision/orthogonality analyses of N-LoRA, arXiv 2410.10179, study).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


def lora_nuclear_norm(B: torch.Tensor, A: torch.Tensor, scaling: float) -> float:
    """‖scaling·B·A‖_* through the r×r core: B = Q_B R_B, Aᵀ = Q_A R_A, so B·A = Q_B (R_B R_Aᵀ) Q_Aᵀ.

    An SVD of r×r instead of d_out×d_in, which makes nuclear norms affordable for any model size.
    """
    rb = torch.linalg.qr(B.double(), mode="r").R
    ra = torch.linalg.qr(A.double().T, mode="r").R
    return abs(scaling) * float(torch.linalg.svdvals(rb @ ra.T).sum())


def adapter_nuclear_norm(adapter_dir: Path) -> float:
    """Σ over modules of ‖ΔW‖_* for one saved PEFT LoRA adapter (as :func:`round_diagnostics` sums it)."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    factors = _factors(adapter_dir)
    return sum(lora_nuclear_norm(ab["B"], ab["A"], cfg["lora_alpha"] / cfg["r"]) for ab in factors.values())


def _factors(adapter_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    factors: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            m = _PEFT_KEY.match(key)
            if m:
                factors.setdefault(m["module"], {})[m["which"]] = f.get_tensor(key).float()
    return factors


def adapter_updates(adapter_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(module -> ΔW, module -> A) of one saved PEFT LoRA adapter."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / cfg["r"]
    factors = _factors(adapter_dir)
    deltas = {name: scaling * (ab["B"] @ ab["A"]) for name, ab in factors.items()}
    return deltas, {name: ab["A"] for name, ab in factors.items()}


def _block_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                if ".layers." in key and key.endswith(".weight"):
                    t = f.get_tensor(key)
                    if t.dim() == 2:
                        out[key] = t.float()
    return out


def checkpoint_updates(model_dirs: list[Path]) -> list[dict[str, torch.Tensor]]:
    """ΔW of each consecutive pair of checkpoints (model_dirs[0] is the starting point)."""
    updates = []
    previous = _block_weights(model_dirs[0])
    for path in model_dirs[1:]:
        current = _block_weights(path)
        updates.append({k: current[k] - previous[k] for k in current if k in previous})
        previous = current
    return updates
