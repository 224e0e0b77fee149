"""Combine steps of an experiment: merge or mix a one-round method's artifacts into one model.

Merging (:mod:`cairn.combine.merge_models`, :mod:`cairn.combine.merge_lora`; average, task
arithmetic, TIES, DARE) and MoE mixing (moetify, Lee et al. 2024, arXiv 2408.17280:
:mod:`cairn.combine.moe_fft`, :mod:`cairn.combine.moe_lora`), optionally with router training, as
the seed paper (Lee & Wynter 2024, arXiv 2410.13699) compares them with the sequential methods. What
the source method hands over is its trainable's ``ingredient_kind``: full models or PEFT adapters.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cairn import atomic
from cairn.errors import CairnError


@dataclass
class CombineInputs:
    """What a combine step needs from the experiment (nothing about how the ingredients were trained)."""

    base_path: str
    dtype: str
    seed: int
    tokenizer: Any
    load_base: Callable[[], Any]
    train: Callable[..., Any]  # cairn.train.loop.train
    training_for: Callable[[dict], Any]  # router_training overrides -> TrainingConfig
    checkpoints: Path
    progress: bool
    log: Callable[[str], None]


def check(comb, kind: str | None, source: str = "<config>") -> None:
    """Fail before any training on what the config loader cannot see: the merge method's name, the source."""
    if kind is None:
        raise CairnError(f"{source}: combine step {comb.name!r}: its source {comb.source!r} does not produce "
                         f"ingredients for merging or mixing; use trainable: full or lora")
    if comb.kind == "merge":
        from cairn.combine.merge_fns import MergeSpec

        params = {k: v for k, v in vars(comb.typed_params(source)).items() if v is not None}
        MergeSpec(method=comb.method, **params)


def router_examples(comb, tasks: list, seed: int, split: str = "eval") -> list[list[dict]]:
    """A small router set per expert: seeded examples of each task's ``eval`` split (else train).

    The seed paper's point is that routers need not see the experts' training data; the demo
    tasks' eval split uses a phrasing that no expert was trained on.
    """
    per_task = []
    for i, task in enumerate(tasks):
        rows = task.splits.get(split) or task.train
        rng = random.Random(f"{seed}-router-{i}")
        per_task.append(rng.sample(rows, min(comb.router_examples, len(rows))))
    return per_task


def build(comb, kind: str, paths: list[Path], rdir: Path, tasks: list, inp: CombineInputs, write: bool = True):
    """Write the combined artifact under ``rdir``; return (model to evaluate, statistics).

    ``write=False`` (a non-main process of a multi-process run): nothing is written; the process waits
    at a barrier for the main process's artifact and reads it (every process must call ``build``).
    """
    if comb.kind == "merge":
        return _merge(comb, kind, paths, rdir, inp, write)
    return _moe(comb, kind, paths, rdir, tasks, inp, write)


def _written(write: bool, make: Callable[[], Any]) -> Any:
    """Run ``make`` (which writes an artifact) on the writing process only, then let every process read it."""
    from cairn import dist

    out = make() if write else None
    dist.barrier()
    return out


def _load(path: Path, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()


def _merge(comb, kind: str, paths: list[Path], rdir: Path, inp: CombineInputs, write: bool = True):
    params = {k: v for k, v in vars(comb.typed_params()).items() if v is not None}
    art = rdir / "merged"
    if kind == "model":
        from cairn.combine.merge_models import merge_models

        stats = _written(write, lambda: merge_models(inp.base_path, paths, art, comb.method, overwrite=True,
                                                     progress=inp.progress, **params))
        return _load(art, inp.dtype), stats or {}
    from cairn.combine.merge_lora import merge_adapters

    stats = _written(write, lambda: merge_adapters(paths, art, comb.method, mode=comb.lora_mode, rank=comb.rank,
                                                   base=inp.base_path, overwrite=True, progress=inp.progress,
                                                   **params)) or {}
    if comb.lora_mode == "full":
        return _load(art, inp.dtype), stats
    from peft import PeftModel

    model = PeftModel.from_pretrained(inp.load_base(), str(art)).merge_and_unload()
    return model.eval(), stats


def _moe(comb, kind: str, paths: list[Path], rdir: Path, tasks: list, inp: CombineInputs, write: bool = True):
    """MoE mixing, routers optionally trained on a few examples per task."""
    from cairn.combine.router_training import (MixtralAuxLoss, RoutedLoRAAuxLoss, freeze_all_but_routers,
                                               require_router_data)

    params = comb.typed_params()
    router_sets = router_examples(comb, tasks, inp.seed)
    from cairn.data.chat import prompt_text

    # The prompts as the model sees them (a chat-formatted task's rendered with the chat template)
    prompts = [[prompt_text(inp.tokenizer, ex) for ex in rows] for rows in router_sets]
    if kind == "model":
        from cairn.combine.moe_fft import build_fft_moe

        art = rdir / "moe"
        stats = _written(write, lambda: build_fft_moe(inp.base_path, paths, art, router_prompts=prompts,
                                                      overwrite=True, tokenizer=inp.tokenizer, seed=inp.seed,
                                                      **params.builder_kwargs())) or {}
        model = _load(art, inp.dtype)
        parts = [MixtralAuxLoss(params.aux_loss_coef)]
        MixtralAuxLoss.prepare(model)
    else:
        from cairn.combine.moe_lora import build_lora_moe, mixture_info

        model = build_lora_moe(inp.load_base(), paths, tokenizer=inp.tokenizer, router_prompts=prompts, seed=inp.seed,
                               **params.builder_kwargs())
        stats = mixture_info(model)
        parts = [RoutedLoRAAuxLoss(params.aux_loss_coef)]
    if comb.router_training is not None:
        examples = [ex for rows in router_sets for ex in rows]
        require_router_data(examples)
        freeze_all_but_routers(model)
        result = inp.train(model, inp.tokenizer, examples, inp.training_for(comb.router_training), seed=inp.seed,
                           checkpoint_dir=inp.checkpoints, loss_parts=parts, log=inp.log, progress=inp.progress)
        stats = dict(stats) | {"router_training": {"steps": result.steps, "examples": len(examples),
                                                   "seconds": result.seconds, "log": result.log}}
    for p in model.parameters():
        p.requires_grad_(False)
    if kind == "model":
        # Router logits are only needed for the aux loss; with a KV cache they break generation.
        model.config.output_router_logits = False
        if comb.router_training is not None and write:
            with atomic.atomic_dir(rdir / "moe", overwrite=True) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                inp.tokenizer.save_pretrained(tmp)
    elif write:
        from cairn.combine.moe_lora import save_lora_moe

        save_lora_moe(model, rdir / "lora-moe", overwrite=True)
    return model.eval(), stats
