"""O-LoRA: keep each round's LoRA update in a subspace orthogonal to the earlier rounds' ones.

Paper: Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual Learning",
arXiv 2310.14152 (reference code: cmnfriend/O-LoRA). Used by the seed paper (Lee & Wynter 2024)
with λ1 = 0.5 and 5, recommending small weights (λ1 ≤ 0.5).

Loss of round t (what :class:`OLoRALoss` adds to the task loss)::

    λ1 · Σ_modules Σ_{i<t} Σ_jk |(A_i · A_tᵀ)_jk|   +   λ2 · Σ_{θ ∈ new adapter} ‖θ‖₂

* ``A`` is the LoRA down-projection as PEFT stores it, ``lora_A.weight`` of shape (r, d_in); only
  A is orthogonalised, as in the paper and the code. The overlap is the **L1 norm** (sum of
  absolute values) of ``A_i · A_tᵀ`` as in the reference code's
  ``torch.abs(torch.mm(lora_A, loranew_A.T)).sum()``; the reference code concatenates earlier
  rounds' A's along the rank axis, which gives the same sum as summing per round.
* The λ2 term is the code's **unsquared** L2 norm ``torch.norm(param, p=2)`` summed over every
  tensor of the new adapter (A and B), not a squared weight decay.
* Earlier A's are detached copies: the penalty's gradient flows only into the new adapter even if
  an earlier adapter was left trainable by mistake.

Two sequential modes share this code (``lora.sequential`` picks one):

* **merge** (the seed paper's): after each round the adapter is merged into the weights; only its
  A's are kept, in a safetensors "A store" (:func:`save_A_store` / :func:`load_A_store`).
* **stack** (the original code's): earlier adapters stay in the same ``PeftModel`` under their own
  names, frozen; ``collect_lora_A(model, name)`` reads each of them the same way.

Module names come from :mod:`cairn.methods.lora_layers` and match across rounds in both modes.

Scale trap (O-LoRA issue #33): with λ1 = 5 the orthogonality term can dwarf the task loss. Each
call records the raw (unweighted) terms and the task loss; :meth:`OLoRALoss.diagnostics` returns
them as floats for the loop to log, with the weighted-penalty/task-loss ratio, and warns once when
that ratio exceeds :data:`SCALE_WARNING_RATIO`. In round 0 there is nothing to be orthogonal to:
the term is exactly 0 and ``olora_prev_rounds`` = 0 says why (the code printed a bare 0, issue #41).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from cairn import atomic
from cairn.config import setting
from cairn.errors import CairnError
from cairn.loss_parts import task_loss_of
from cairn.methods.lambdas import check_lambda, check_lambdas, lambda_for_round
from cairn.methods.registry import PartBase, RoundContext, Section, register_section
from cairn.lora_factors import lora_factors

log = logging.getLogger(__name__)

#: Warn when λ1·orth (or λ2·l2) exceeds this multiple of the task loss (O-LoRA issue #33).
SCALE_WARNING_RATIO = 10.0

_STORE_FORMAT = "cairn-olora-A-store"
_KEY_RE = re.compile(r"^round_(\d+)/(.+)$")


def olora_overlap_penalty(prev_As: list[torch.Tensor], new_A: torch.Tensor) -> torch.Tensor:
    """Σ_i Σ_jk |(A_i · new_Aᵀ)_jk| over the earlier rounds' A_i (each (r_i, d_in)); new_A is (r, d_in).

    Returns a 0-dim tensor on ``new_A``'s device and dtype; 0 when ``prev_As`` is empty. Earlier
    A's are detached, so the gradient reaches ``new_A`` only.
    """
    if new_A.dim() != 2:
        raise CairnError(f"new LoRA A must be 2-D (r, d_in), got shape {tuple(new_A.shape)}")
    if not prev_As:
        return new_A.new_zeros(())
    for i, a in enumerate(prev_As):
        if a.dim() != 2 or a.shape[1] != new_A.shape[1]:
            raise CairnError(f"earlier LoRA A #{i} has shape {tuple(a.shape)} but the new A is "
                             f"{tuple(new_A.shape)}: both must be (r, d_in) with the same d_in; "
                             f"the earlier rounds must have targeted the same modules of the same model")
    # One matmul over the rank-concatenated earlier A's, as the reference code's stacked lora_A.
    prev = torch.cat([a.detach().to(device=new_A.device, dtype=new_A.dtype) for a in prev_As], dim=0)
    return (prev @ new_A.T).abs().sum()


def l2_penalty(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σ_θ ‖θ‖₂ with the unsquared norm over all entries of each tensor (O-LoRA code's λ2 term)."""
    total: torch.Tensor | None = None
    for p in params:
        norm = torch.linalg.vector_norm(p)
        total = norm if total is None else total + norm
    if total is None:
        raise CairnError("l2_penalty got no tensors: the adapter has no parameters")
    return total


def collect_lora_A(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Module name -> a frozen CPU copy of adapter ``adapter_name``'s A (r, d_in), in module order.

    Works on the current adapter (merge mode: call before merging) and on every frozen adapter of
    a stack. Names are e.g. ``model.layers.0.self_attn.q_proj`` and match across rounds.
    """
    return {name: f.A.detach().to("cpu", copy=True).contiguous()
            for name, f in lora_factors(model, adapter_name).items()}


def save_A_store(path: str | os.PathLike, store: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
    """Write {round -> {module -> A}} to one safetensors file atomically (keys ``round_<t>/<module>``)."""
    from safetensors.torch import save_file

    flat: dict[str, torch.Tensor] = {}
    for rnd, modules in store.items():
        if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
            raise CairnError(f"A store round keys must be ints >= 0, got {rnd!r}")
        for module, a in modules.items():
            if not isinstance(a, torch.Tensor) or a.dim() != 2:
                raise CairnError(f"A store round {rnd} module {module!r}: expected a 2-D tensor (r, d_in), "
                                 f"got {type(a).__name__} {getattr(a, 'shape', '')}")
            flat[f"round_{rnd}/{module}"] = a.detach().to("cpu").contiguous()
    with atomic.atomic_file(path) as tmp:
        save_file(flat, str(tmp), metadata={"format": _STORE_FORMAT, "version": "1"})


def load_A_store(path: str | os.PathLike) -> dict[int, dict[str, torch.Tensor]]:
    """Read a file written by :func:`save_A_store` back into {round -> {module -> A}}."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CairnError(f"O-LoRA A store {path} does not exist; it is written after each O-LoRA round "
                         f"(merge mode) — run the earlier rounds first or point to the right run directory")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _STORE_FORMAT:
                raise CairnError(f"{path} is not an O-LoRA A store (metadata format={meta.get('format')!r})")
            store: dict[int, dict[str, torch.Tensor]] = {}
            for key in f.keys():
                m = _KEY_RE.match(key)
                if m is None:
                    raise CairnError(f"{path}: unexpected tensor key {key!r} (expected round_<t>/<module>)")
                store.setdefault(int(m.group(1)), {})[m.group(2)] = f.get_tensor(key)
    except CairnError:
        raise
    except Exception as e:  # a truncated or foreign file: say which and what to do
        raise CairnError(f"cannot read O-LoRA A store {path}: {e}; delete it and re-run the earlier rounds") from e
    return dict(sorted(store.items()))


class OLoRALoss:
    """The O-LoRA method part: ``extra_loss`` returns {"olora_orth": λ1·orth, "olora_l2": λ2·l2}.

    ``prev_store`` maps earlier round -> module -> A (from :func:`load_A_store`, or from
    :func:`collect_lora_A` on each frozen adapter of a stack). A term whose λ is 0 is left out of the
    returned dict (nothing to add to the loss) but its raw value is still computed, without a
    graph, and reported by :meth:`diagnostics`.
    """

    packable = True  # reads adapter weights only, never the batch: padding-free batches are fine

    def __init__(self, prev_store: Mapping[int, Mapping[str, torch.Tensor]], lambda1: float,
                 lambda2: float = 0.0, adapter_name: str = "default") -> None:
        self.lambda1 = check_lambda(lambda1, "O-LoRA lambda1")
        self.lambda2 = check_lambda(lambda2, "O-LoRA lambda2")
        self.adapter_name = adapter_name
        self.prev_rounds = sorted(prev_store)
        self._prev: dict[str, list[torch.Tensor]] = {}
        for rnd in self.prev_rounds:
            for module, a in prev_store[rnd].items():
                self._prev.setdefault(module, []).append(a.detach())
        self._checked = False
        self._on_device: dict[str, torch.Tensor] = {}  # module -> earlier A's concatenated, on the new A's device
        self._last: dict[str, torch.Tensor] = {}
        self._warned = False

    def _check_modules(self, new_modules: Mapping[str, object]) -> None:
        # Every earlier module must still be adapted, or its overlap would silently drop out.
        missing = [m for m in self._prev if m not in new_modules]
        if missing:
            raise CairnError(f"O-LoRA: the earlier rounds adapted {len(missing)} module(s) that adapter "
                             f"{self.adapter_name!r} does not (first: {missing[0]!r}); keep target_modules "
                             f"the same in every O-LoRA round")
        self._checked = True

    def _prev_like(self, module: str, like: torch.Tensor) -> torch.Tensor:
        # Copy the earlier A's to the training device once, not on every step.
        cached = self._on_device.get(module)
        if cached is None or cached.device != like.device or cached.dtype != like.dtype:
            prev = self._prev[module]
            for i, a in enumerate(prev):
                if a.dim() != 2 or a.shape[1] != like.shape[1]:
                    raise CairnError(f"O-LoRA: earlier A #{i} of module {module!r} has shape {tuple(a.shape)} "
                                     f"but adapter {self.adapter_name!r} has A {tuple(like.shape)}; the d_in "
                                     f"must match (same base model and target modules in every round)")
            cached = torch.cat(prev, dim=0).to(device=like.device, dtype=like.dtype)
            self._on_device[module] = cached
        return cached

    def extra_loss(self, model: nn.Module, batch: object, outputs: object) -> dict[str, torch.Tensor]:
        factors = lora_factors(model, self.adapter_name)
        if not self._checked:
            self._check_modules(factors)
        terms: dict[str, torch.Tensor] = {}

        def orth() -> torch.Tensor:
            parts = [olora_overlap_penalty([self._prev_like(m, f.A)], f.A)
                     for m, f in factors.items() if m in self._prev]
            return torch.stack(parts).sum() if parts else next(iter(factors.values())).A.new_zeros(())

        def l2() -> torch.Tensor:
            return l2_penalty(t for f in factors.values() for t in (f.A, f.B))

        for key, lam, fn in (("olora_orth", self.lambda1, orth), ("olora_l2", self.lambda2, l2)):
            if lam > 0:
                raw = fn()
                terms[key] = lam * raw
            else:
                with torch.no_grad():
                    raw = fn()
            self._last[key] = raw.detach()
        task = task_loss_of(outputs)
        if task is not None:
            self._last["task"] = task.detach()
        return terms

    def diagnostics(self) -> dict[str, float]:
        """Raw values of the last ``extra_loss`` call, as floats (call at logging steps only: it syncs)."""
        if not self._last:
            return {}
        out = {
            "olora_orth_raw": float(self._last["olora_orth"]),
            "olora_l2_raw": float(self._last["olora_l2"]),
            "olora_prev_rounds": float(len(self.prev_rounds)),
        }
        if "task" in self._last:
            task = float(self._last["task"])
            weighted = self.lambda1 * out["olora_orth_raw"] + self.lambda2 * out["olora_l2_raw"]
            ratio = weighted / task if task > 0 else float("inf") if weighted > 0 else 0.0
            out["olora_penalty_to_task_ratio"] = ratio
            if ratio > SCALE_WARNING_RATIO and not self._warned:
                self._warned = True
                log.warning("O-LoRA penalty (λ1·orth + λ2·l2 = %.4g) is %.1fx the task loss (%.4g); the "
                            "task will barely be learned — consider a smaller lambda1 (the seed paper "
                            "recommends <= 0.5)", weighted, ratio, task)
        return out


@dataclass
class OLoRAConfig:
    lambda1: list[float] | float = setting("Orthogonality weight; a list gives one value per round.", 0.5)
    lambda2: float = setting("Weight of the unsquared L2 norm of the new adapter.", 0.0)


class OLoRA(PartBase):
    """The O-LoRA part of a method (``olora: {...}`` on a ``trainable: lora`` method)."""

    key = "olora"
    STORE = "olora_A.safetensors"

    def loss_parts(self, model, ctx: RoundContext) -> list:
        from cairn.methods.lora import adapter_name

        if ctx.method.sections["lora"].sequential == "stack":
            prev = {i: collect_lora_A(model, adapter_name(i)) for i in range(1, ctx.k)}
        else:  # merged rounds leave only their A's, saved next to each round's adapter
            prev = {}
            for i in range(1, ctx.k):
                prev.update(load_A_store(ctx.round_dir(i) / self.STORE))
        lam1 = lambda_for_round(self.settings.lambda1, ctx.k - 1, "O-LoRA lambda1")
        return [OLoRALoss(prev, lam1, self.settings.lambda2, adapter_name=adapter_name(ctx.k))]

    def after_round(self, model, ctx: RoundContext) -> None:
        from cairn.methods.lora import adapter_name

        store = {ctx.k: collect_lora_A(model, adapter_name(ctx.k))}
        if ctx.write:  # only the main process of a multi-process run writes it
            save_A_store(ctx.rdir / self.STORE, store)


def _check(method, cfg: OLoRAConfig, source: str) -> None:
    if method.trainable != "lora":
        raise CairnError(f"{source}: method {method.name!r}: O-LoRA constrains LoRA adapters, not "
                         f"trainable: {method.trainable}; set `trainable: lora` or drop `olora`")
    check_lambdas(cfg.lambda1, f"{source}: method {method.name!r}: olora.lambda1")
    check_lambdas(cfg.lambda2, f"{source}: method {method.name!r}: olora.lambda2")


register_section(Section("olora", OLoRAConfig, check=_check, part=OLoRA))
