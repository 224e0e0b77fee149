"""LoRA as a trainable: each round trains a fresh PEFT adapter; sequential rounds merge or stack.

LoRA (Hu et al. 2021, arXiv 2106.09685) is PEFT's implementation, unchanged. Sequential LoRA has two
modes (:attr:`LoraConfig.sequential`):
- ``merge`` (the seed paper, Lee & Wynter 2024, arXiv 2410.13699): after each round the adapter is
  saved, then merged into the weights; the next round adds a fresh adapter on the merged model.
- ``stack`` (O-LoRA's original code): earlier adapters stay in the model as frozen adapters, all
  active; only the newest adapter trains.
Each round's adapter is a PEFT adapter directory (the round's ``adapter/`` folder itself; runs made
before this kept it in ``adapter/round<k>/``, still read) that vanilla PEFT loads; it is also what
combiners receive. Its ``cairn_parent.json`` says what it applies to (:func:`cairn.rundir.parent_record`):
in ``merge`` mode round k's adapter was trained on the base with rounds 1..k-1 merged in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from cairn import atomic
from cairn.config import setting as _help
from cairn.errors import CairnError
from cairn.methods.registry import RoundContext, Section, freeze, register_section, register_trainable


@dataclass
class LoraConfig:
    r: int = _help("LoRA rank.", 8)
    alpha: float = _help("LoRA alpha (scaling = alpha / r).", 16.0)
    dropout: float = _help("LoRA dropout.", 0.05)
    target_modules: list[str] | str = _help("Modules to adapt, or 'all-linear'.", "all-linear")
    sequential: Literal["merge", "stack"] = _help(
        "merge: merge each round's adapter into the weights and start a fresh one (the seed paper); "
        "stack: keep earlier adapters as a frozen stack (O-LoRA's original code).",
        "merge",
    )


def adapter_name(round_index: int) -> str:
    return f"round{round_index}"


def _peft_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
                          bias="none", task_type="CAUSAL_LM")


def add_lora_adapter(model, cfg: LoraConfig, round_index: int, seed: int):
    """Add a fresh adapter for ``round_index``; earlier adapters (stack mode) stay frozen and active."""
    from peft import PeftModel, get_peft_model

    name = adapter_name(round_index)
    torch.manual_seed(seed * 7919 + round_index)  # the adapter's A init is seeded per round
    if isinstance(model, PeftModel):
        model.add_adapter(name, _peft_config(cfg))
        model.base_model.set_adapter(list(model.peft_config))
    else:
        model = get_peft_model(model, _peft_config(cfg), adapter_name=name)
    for n, p in model.named_parameters():
        p.requires_grad_(f".{name}." in n)
    return model


def merge_adapters(model):
    """Merge every adapter into the base weights and return the plain (frozen) transformers model."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    return freeze(model)


def save_adapter(model, round_index: int, out) -> None:
    """Save one round's adapter so that ``out`` itself is a PEFT adapter directory vanilla PEFT loads.

    PEFT writes a non-default adapter one level down (``out/<name>/``); its files are moved up, and
    PEFT's auto-generated README (which names a local cache path as the base) is left out.
    """
    import shutil

    out = Path(out)
    staging = out / ".peft"
    model.save_pretrained(str(staging), selected_adapters=[adapter_name(round_index)])
    inner = staging / adapter_name(round_index)
    src = inner if inner.is_dir() else staging
    for item in src.iterdir():
        if item.name != "README.md":
            item.replace(out / item.name)
    shutil.rmtree(staging)


def adapter_dir(rdir: Path, k: int) -> Path:
    """Round ``k``'s adapter folder: ``adapter/`` itself, or ``adapter/round<k>/`` in older run directories."""
    flat = Path(rdir) / "adapter"
    if (flat / "adapter_config.json").is_file():
        return flat
    old = flat / adapter_name(k)
    return old if (old / "adapter_config.json").is_file() else flat


class LoRA:
    name = "lora"
    persistent_params = False  # a fresh adapter every round
    ingredient_kind = "adapter"

    def __init__(self, method) -> None:
        self.cfg: LoraConfig = method.sections["lora"]

    def prepare(self, model, ctx: RoundContext):
        return add_lora_adapter(model, self.cfg, ctx.k, ctx.seed)

    def loss_parts(self):
        return []

    def save(self, model, ctx: RoundContext):
        from cairn import rundir

        if not ctx.write:  # only the main process of a multi-process run writes the artifact
            return merge_adapters(model) if self.cfg.sequential == "merge" else model
        with atomic.atomic_dir(ctx.rdir / "adapter", overwrite=True) as tmp:
            save_adapter(model, ctx.k, tmp)
            seeded = ctx.mdir.path.name.startswith("seed-")  # <run>/<method>/seed-<s>/ or <run>/<method>/
            rundir.write_parent(tmp, rundir.parent_record(
                ctx.cfg.model, ctx.k, self.cfg.sequential, ctx.method.strategy == "one-round",
                ctx.mdir.path.parent.parent if seeded else ctx.mdir.path.parent, ctx.method.name,
                seed=ctx.seed if seeded else None))
        return merge_adapters(model) if self.cfg.sequential == "merge" else model

    def ingredient(self, rdir: Path, k: int) -> Path:
        return adapter_dir(rdir, k)

    def restore(self, ctx: RoundContext, upto: int):
        """Round 1..upto's adapters loaded on the base in order (merged or stacked, as when trained)."""
        from peft import PeftModel

        model = ctx.load_base()
        for k in range(1, upto + 1):
            adir = self.ingredient(ctx.round_dir(k), k)
            if not adir.is_dir():
                raise CairnError(f"round {k}'s adapter {adir} is missing; delete {ctx.mdir.path} to rerun the method")
            try:
                if isinstance(model, PeftModel):
                    model.load_adapter(str(adir), adapter_name=adapter_name(k))
                    model.base_model.set_adapter(list(model.peft_config))
                else:
                    model = PeftModel.from_pretrained(model, str(adir), adapter_name=adapter_name(k))
            except (RuntimeError, ValueError, KeyError) as exc:  # shape mismatches: another base model
                raise CairnError(f"round {k}'s adapter {adir} does not fit the base model {ctx.cfg.model!r} "
                                 f"(was it made for another base?): {str(exc).splitlines()[0]}") from None
            if self.cfg.sequential == "merge":
                model = merge_adapters(model)
        return model

    def updates(self, ctx: RoundContext, rdirs: list[Path]):
        """(ΔW per round, A factors per round, nuclear-norm function for large models) for the diagnostics."""
        from cairn.eval.round_updates import adapter_nuclear_norm, adapter_updates

        pairs = [adapter_updates(self.ingredient(d, k)) for k, d in enumerate(rdirs, start=1)]
        return ([p[0] for p in pairs], [p[1] for p in pairs],
                lambda k, d: adapter_nuclear_norm(self.ingredient(d, k)))


register_trainable("lora", LoRA)
register_section(Section("lora", LoraConfig, default_on=True))
