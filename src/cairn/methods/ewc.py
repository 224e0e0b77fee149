"""Elastic Weight Consolidation (EWC): a quadratic penalty keeps weights that mattered for earlier rounds.

Paper: Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks", PNAS
114(13):3521-3526 (arXiv 1612.00796). After round i the diagonal Fisher information F_i of the
round's trainable parameters is estimated at the round's final weights θ*_i; round t then adds

    λ/2 · Σ_{i<t} Σ_j F_i,j · (θ_j − θ*_i,j)²

to the task loss: one penalty per earlier round, as in the paper's multi-task form (not online EWC,
Schwarz et al. 2018, which keeps one running Fisher anchored at the latest weights; the per-round
form costs 2 × (trainable size) on disk and in memory per earlier round, acceptable for the
models cairn trains on one machine; online EWC would trade that for a decay hyperparameter).

Fisher estimate: the *empirical* Fisher — the squared gradient of the answer-only loss of one
example at a time (the loss the loop trains on, :func:`cairn.train.loop.answer_only_loss`), averaged
over ``fisher_examples`` examples of the round's training data drawn with a seed. Which examples
were used is recorded in the round's ``ewc.json`` (like replay's ``round_data.json``); F and θ* go to
``ewc_fisher.safetensors`` next to the round's artifact, so a resumed run needs no recomputation.

Which parameters: the trainable's own — EWC needs the same parameters to train every round
(``trainable: full`` or ``loramoe``); a fresh LoRA adapter per round has no θ* to stay close to, so
``ewc`` with ``trainable: lora`` is a config error. Hand-written: no maintained library offers EWC
for Hugging Face causal LMs behind this loop's loss-part protocol.

Config: ``ewc: {lam: 1000, fisher_examples: 64}`` on a method.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from cairn import atomic
from cairn.config import setting
from cairn.errors import CairnError
from cairn.methods.lambdas import check_lambdas
from cairn.methods.registry import PartBase, RoundContext, Section, register_section, trainable_persists

FISHER_FILE = "ewc_fisher.safetensors"
RECORD_FILE = "ewc.json"


@dataclass
class EWCConfig:
    lam: float = setting("λ, the penalty's weight (the paper's λ; its scale follows the Fisher's: "
                         "answer-only mean token loss gives small F, so λ is often 1e2-1e4).", 100.0)
    fisher_examples: int = setting("Training examples of each round the empirical Fisher is averaged over "
                                   "(seeded sample; all when the round has fewer).", 64)


def ewc_penalty(params: dict[str, torch.Tensor], rounds: list[tuple[dict, dict]], lam: float) -> torch.Tensor:
    """λ/2 · Σ_rounds Σ_names Σ F · (θ − θ*)², for ``rounds`` = [(fisher by name, anchor by name)]."""
    total = None
    for fisher, anchor in rounds:
        for name, f in fisher.items():
            p = params[name]
            term = (f.to(p) * (p - anchor[name].to(p)) ** 2).sum()
            total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return 0.5 * lam * total


class EWCLoss:
    """The loss part: {"ewc": λ/2 Σ F (θ−θ*)²} over the earlier rounds' Fisher and anchors."""

    packable = True  # reads weights only, never the batch: padding-free batches are fine

    def __init__(self, rounds: list[tuple[dict, dict]], lam: float) -> None:
        self.rounds = rounds
        self.lam = lam
        self._moved = False

    def extra_loss(self, model, batch, outputs) -> dict[str, torch.Tensor]:
        if not self.rounds:
            return {}
        params = dict(model.named_parameters())
        if not self._moved:  # move F and θ* to the training device once
            dev = next(iter(params.values())).device
            self.rounds = [({k: v.to(dev) for k, v in f.items()}, {k: v.to(dev) for k, v in a.items()})
                           for f, a in self.rounds]
            missing = [n for f, _ in self.rounds for n in f if n not in params]
            if missing:
                raise CairnError(f"EWC: earlier rounds' parameter {missing[0]!r} is not in the model; the "
                                 f"rounds must train the same parameters (same trainable and model)")
            self._moved = True
        return {"ewc": ewc_penalty(params, self.rounds, self.lam)}


def empirical_fisher(model, tokenizer, examples: list[dict], max_length: int) -> dict[str, torch.Tensor]:
    """Mean over ``examples`` of the squared gradient of each one's answer-only loss, per trainable param."""
    from cairn.data.encode import collate, encode_example
    from cairn.train.loop import answer_only_loss

    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the trained weights, not of a random sub-network
    device = next(iter(named.values())).device
    for ex in examples:
        batch = {k: v.to(device) for k, v in collate([encode_example(tokenizer, ex, max_length)], pad).items()}
        model.zero_grad(set_to_none=True)
        loss, _ = answer_only_loss(model, batch)
        loss.backward()
        for n, p in named.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach().float() ** 2
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {n: (f / max(len(examples), 1)).cpu() for n, f in fisher.items()}


class EWC(PartBase):
    key = "ewc"

    def loss_parts(self, model, ctx: RoundContext) -> list:
        from safetensors.torch import load_file

        rounds = []
        for i in range(1, ctx.k):
            path = ctx.round_dir(i) / FISHER_FILE
            if not path.is_file():
                raise CairnError(f"EWC: round {i}'s Fisher {path} is missing; delete {ctx.mdir.path} "
                                 f"to rerun the method")
            tensors = load_file(str(path))
            rounds.append(({k[7:]: v for k, v in tensors.items() if k.startswith("fisher/")},
                           {k[7:]: v for k, v in tensors.items() if k.startswith("anchor/")}))
        return [EWCLoss(rounds, self.settings.lam)]

    def after_round(self, model, ctx: RoundContext) -> None:
        from safetensors.torch import save_file

        data = [ex for i in ctx.task_ids for ex in ctx.tasks[i].train]
        rng = random.Random(f"{ctx.seed}-ewc-{ctx.k}")
        picked = sorted(rng.sample(range(len(data)), min(self.settings.fisher_examples, len(data))))
        max_length = ctx.cfg.training_for(ctx.method).max_length
        fisher = empirical_fisher(model, ctx.tokenizer, [data[i] for i in picked], max_length)
        anchor = {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if n in fisher}
        tensors = {f"fisher/{n}": f.contiguous() for n, f in fisher.items()}
        tensors |= {f"anchor/{n}": a for n, a in anchor.items()}
        if not ctx.write:  # only the main process of a multi-process run writes it
            return
        with atomic.atomic_file(ctx.rdir / FISHER_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "cairn-ewc", "version": "1"})
        atomic.write_json(ctx.rdir / RECORD_FILE, {"fisher_examples": len(picked), "indices": picked,
                                                   "tasks": [ctx.tasks[i].name for i in ctx.task_ids]})


def _check(method, cfg: EWCConfig, source: str) -> None:
    if not trainable_persists(method.trainable):
        raise CairnError(f"{source}: method {method.name!r}: EWC keeps the same parameters close to earlier "
                         f"rounds' values, but trainable: {method.trainable} trains fresh parameters every round; "
                         f"use trainable: full or loramoe, or drop `ewc`")
    check_lambdas(cfg.lam, f"{source}: method {method.name!r}: ewc.lam")
    if cfg.fisher_examples < 1:
        raise CairnError(f"{source}: method {method.name!r}: ewc.fisher_examples must be >= 1, "
                         f"got {cfg.fisher_examples}")


register_section(Section("ewc", EWCConfig, check=_check, part=EWC))
