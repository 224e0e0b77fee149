"""Full fine-tuning (FFT): every weight trains; each round's artifact is a transformers checkpoint.

The seed paper's sequential FFT (Lee & Wynter 2024, arXiv 2410.13699). A round is saved with
``save_pretrained`` (safetensors) next to the tokenizer, so every round is a model vanilla
transformers loads; it is also what combiners receive (one full model per task).
"""

from __future__ import annotations

from pathlib import Path

from cairn import atomic
from cairn.methods.registry import RoundContext, register_trainable


def make_full_trainable(model):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


class FullFineTuning:
    name = "full"
    persistent_params = True
    ingredient_kind = "model"

    def __init__(self, method) -> None:
        self.method = method

    def prepare(self, model, ctx: RoundContext):
        return make_full_trainable(model)

    def loss_parts(self):
        return []

    def save(self, model, ctx: RoundContext):
        if not ctx.write:  # another process of a multi-process run writes the artifact
            return model
        with atomic.atomic_dir(ctx.rdir / "model", overwrite=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            ctx.tokenizer.save_pretrained(tmp)
            from cairn import rundir

            rundir.write_parent(tmp, rundir.parent_record(ctx.cfg.model, ctx.k, None, False, method=ctx.method.name))
        return model

    def restore(self, ctx: RoundContext, upto: int):
        import torch
        from transformers import AutoModelForCausalLM

        path = ctx.round_dir(upto) / "model"
        return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, ctx.cfg.dtype))

    def ingredient(self, rdir: Path, k: int) -> Path:
        return rdir / "model"

    def updates(self, ctx: RoundContext, rdirs: list[Path]):
        """Each round's ΔW against the round before (the base for round 1), for the diagnostics."""
        from cairn.eval.round_updates import checkpoint_updates
        from cairn.models import resolve_model_path

        updates = checkpoint_updates([Path(resolve_model_path(ctx.cfg.model))] + [d / "model" for d in rdirs])
        return updates, None, None


register_trainable("full", FullFineTuning)
