"""Atomic training checkpoints for resuming an interrupted round.

A checkpoint holds only what changes during training: the trainable parameters (by name, as
safetensors), the optimizer and scheduler states, the RNG states and the step counter. Frozen base
weights are not copied, so a LoRA checkpoint is a few MB. Each checkpoint is written into a temporary
directory and renamed into place, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cairn import atomic

STATE_FILE = "trainer_state.json"


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, extra: dict | None = None) -> None:
    trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    with atomic.atomic_dir(path, overwrite=True) as tmp:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   tmp / "optim.pt")
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **(extra or {})}))


def has_checkpoint(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore a checkpoint in place; returns the saved state (``step`` and extras)."""
    params = dict(model.named_parameters())
    saved = load_file(str(path / "trainable.safetensors"))
    missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
    if missing:
        raise RuntimeError(f"checkpoint {path} does not match the model (missing {missing[:3]}...)")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)
    state = torch.load(path / "optim.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return json.loads((path / STATE_FILE).read_text())
