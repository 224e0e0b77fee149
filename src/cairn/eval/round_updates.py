"""Read each round's weight update ΔW back from a method's saved artifacts, for the diagnostics.

LoRA rounds: ΔW = scaling · B·A from the round's PEFT adapter file, with PEFT's scaling rule
(rsLoRA, alpha_pattern, rank_pattern: :func:`cairn.io.adapters.lora_scaling`).
Full fine-tuning rounds: ΔW = W_k − W_{k−1} from consecutive round checkpoints (round 0 = base),
for the transformer blocks' 2-D weights (embeddings and the output layer are left out: they are
vocabulary-sized and not what the collision/orthogonality analyses of N-LoRA, arXiv 2410.10179, study).
"""

from __future__ import annotations

from pathlib import Path

import torch
from cairn.io.adapters import adapter_factors, lora_scaling, read_adapter_config
from cairn.io.safetensors import Checkpoint



def lora_nuclear_norm(B: torch.Tensor, A: torch.Tensor, scaling: float) -> float:
    """‖scaling·B·A‖_* through the r×r core: B = Q_B R_B, Aᵀ = Q_A R_A, so B·A = Q_B (R_B R_Aᵀ) Q_Aᵀ.

    An SVD of r×r instead of d_out×d_in, which makes nuclear norms affordable for any model size.
    """
    rb = torch.linalg.qr(B.double(), mode="r").R
    ra = torch.linalg.qr(A.double().T, mode="r").R
    return abs(scaling) * float(torch.linalg.svdvals(rb @ ra.T).sum())


def adapter_nuclear_norm(adapter_dir: Path) -> float:
    """Σ over modules of ‖ΔW‖_* for one saved PEFT LoRA adapter (as :func:`round_diagnostics` sums it)."""
    cfg = read_adapter_config(adapter_dir)
    return sum(lora_nuclear_norm(ab["B"], ab["A"], lora_scaling(cfg, m, rank=ab["A"].shape[0]))
               for m, ab in adapter_factors(adapter_dir).items())


def adapter_updates(adapter_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(module -> ΔW, module -> A) of one saved PEFT LoRA adapter."""
    cfg = read_adapter_config(adapter_dir)
    factors = adapter_factors(adapter_dir)
    deltas = {m: lora_scaling(cfg, m, rank=ab["A"].shape[0]) * (ab["B"] @ ab["A"]) for m, ab in factors.items()}
    return deltas, {m: ab["A"] for m, ab in factors.items()}


def _block_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    with Checkpoint(model_dir) as ck:
        return {name: ck.get(name).float() for name in ck.keys()
                if ".layers." in name and name.endswith(".weight") and len(ck.shape(name)) == 2}


def checkpoint_updates(model_dirs: list[Path]) -> list[dict[str, torch.Tensor]]:
    """ΔW of each consecutive pair of checkpoints (model_dirs[0] is the starting point)."""
    updates = []
    previous = _block_weights(model_dirs[0])
    for path in model_dirs[1:]:
        current = _block_weights(path)
        updates.append({k: current[k] - previous[k] for k in current if k in previous})
        previous = current
    return updates
