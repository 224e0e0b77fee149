"""Model-merging functions: small pure tensor functions and one generalised merge.

Methods and their papers:

- **linear / average**: the weighted average of the weights themselves, Σ_t w_t θ_t / Σ_t w_t
  (the seed paper's "plain average", Lee & Wynter 2024; model soups, Wortsman et al. 2022,
  arXiv 2203.05482). No base is involved.
- **task arithmetic** (Ilharco et al. 2023, arXiv 2212.04089): θ = θ0 + λ Σ_t w_t τ_t with
  τ_t = θ_t − θ0.
- **TIES** (Yadav et al. 2023, arXiv 2306.01708): trim each τ_t to its top ``density`` entries by
  magnitude, elect a sign per entry (sign of the summed mass Σ_t τ̂_t, the paper's rule; or the
  sign of the count of signs, PEFT's ``frequency``), average the entries that agree with the
  elected sign (disjoint mean), θ = θ0 + λ τ_m.
- **DARE** (Yu et al. 2024, arXiv 2311.03099): drop each entry of τ_t with probability
  p = 1 − density and rescale the survivors by 1/(1 − p), so every entry keeps its expected value;
  then combine as task arithmetic. **DARE+TIES** replaces that last step with TIES's sign election
  and disjoint mean.

Like mergekit, task arithmetic, TIES, DARE and DARE+TIES are *one* function,
:func:`generalized_merge`, configured by ``sparsify`` (none | magnitude | random) x ``consensus``
(none | sign_total | sign_frequency). The building blocks follow PEFT's ``utils/merge_utils.py``:
:func:`magnitude_mask`, :func:`random_mask`, :func:`elect_sign`, :func:`disjoint_merge`.

Order of operations (the part mergekit issue #474 shows must be stated):

1. τ_t = θ_t − θ0 (skipped when ``base`` is None: the inputs are already deltas, e.g. LoRA factors).
2. Sparsify each τ_t on its own and *unweighted* (weights never change what is trimmed or dropped).
3. ``weight_order="paper"`` (default; identical to PEFT's ``ties``/``dare_ties``): the sign is
   elected from the unweighted sparsified deltas, then the agreeing entries are combined as
   Σ_{t∈A} w_t τ̂_t / |A| (A = the models whose entry agrees with the elected sign). With all
   weights 1 this is exactly the paper's disjoint mean; the per-model weights act after
   election, as the paper's λ does.
   ``weight_order="mergekit"``: τ̂_t is multiplied by w_t *before* sign election, and the agreeing
   entries are divided by the sum of their weights, Σ_{t∈A} w_t τ̂_t / Σ_{t∈A} w_t (mergekit's
   ``ties`` with ``normalize: true``). A large weight can then flip the elected sign.
   Both orders agree when all weights are equal and positive.
   Without consensus both orders give Σ_t w_t τ̂_t.
4. Scale by λ and add the base: θ = θ0 + λ τ_m.

Trimming is per tensor (as PEFT and mergekit do); the TIES paper's code trims over the whole
flattened task vector of a model, which needs every tensor of the model at once. The number kept is
k = max(1, floor(density · n + 1e-6)) (PEFT and mergekit use int(density · n); the 1e-6 only
guards against 0.29 · 100 = 28.999…). Ties at the threshold are broken by position: every entry
strictly above the k-th largest magnitude is kept, then entries equal to it in increasing flat index
order until k are kept, so exactly k entries survive, deterministically (torch.topk and argsort
leave this order unspecified).

Sign election breaks a zero total (or zero count) towards +1, as PEFT and mergekit do. Entries
that were trimmed or dropped (exact zeros) never count as agreeing.

All arithmetic is done in float32 (or float64 if given); callers cast the result back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch

from cairn.errors import CairnError

Sparsify = Literal["none", "magnitude", "random"]
Consensus = Literal["none", "sign_total", "sign_frequency"]
WeightOrder = Literal["paper", "mergekit"]

# Method name -> (sparsify, consensus); "linear" is not in the family (no base, no deltas).
METHODS: dict[str, tuple[str, str] | None] = {
    "linear": None,
    "task_arithmetic": ("none", "none"),
    "ties": ("magnitude", "sign_total"),
    "dare": ("random", "none"),
    "dare_ties": ("random", "sign_total"),
}
ALIASES = {"average": "linear", "dare_linear": "dare", "ties_dare": "dare_ties", "dare+ties": "dare_ties"}


@dataclass
class MergeSpec:
    """A validated merge configuration; one object is passed down instead of loose arguments.

    ``density`` is the fraction of each delta kept: TIES keeps the top ``density`` by magnitude,
    DARE keeps each entry with probability ``density`` (its drop rate is p = 1 − density, as in
    PEFT and mergekit). ``sign_method`` picks TIES's election rule. ``seed`` makes DARE repeatable.
    """

    method: str
    weights: list[float] | None = None
    density: float = 0.2
    lam: float = 1.0
    sign_method: Literal["total", "frequency"] = "total"
    weight_order: WeightOrder = "paper"
    seed: int = 0

    def __post_init__(self) -> None:
        self.method = ALIASES.get(self.method, self.method)
        if self.method not in METHODS:
            names = ", ".join(list(METHODS) + list(ALIASES))
            raise CairnError(f"unknown merge method {self.method!r}; choose one of: {names}")
        if self.uses_density and not (0.0 < float(self.density) <= 1.0):
            raise CairnError(
                f"density must be in (0, 1] (the fraction of each delta kept; DARE drops p = 1 - density), "
                f"got {self.density}"
            )
        if self.sign_method not in ("total", "frequency"):
            raise CairnError(f"sign method must be 'total' or 'frequency', got {self.sign_method!r}")
        if self.weight_order not in ("paper", "mergekit"):
            raise CairnError(f"weight order must be 'paper' or 'mergekit', got {self.weight_order!r}")
        if not math.isfinite(float(self.lam)):
            raise CairnError(f"lambda must be a finite number, got {self.lam}")
        if self.weights is not None:
            self.weights = [float(w) for w in self.weights]
            if not all(math.isfinite(w) for w in self.weights):
                raise CairnError(f"weights must be finite numbers, got {self.weights}")
            if self.method == "linear" and abs(sum(self.weights)) < 1e-12:
                raise CairnError(f"linear merge divides by the sum of the weights, which is 0: {self.weights}")

    @property
    def sparsify(self) -> str:
        return "none" if self.method == "linear" else METHODS[self.method][0]  # type: ignore[index]

    @property
    def consensus(self) -> str:
        if self.method == "linear" or METHODS[self.method][1] == "none":  # type: ignore[index]
            return "none"
        return "sign_total" if self.sign_method == "total" else "sign_frequency"

    @property
    def uses_density(self) -> bool:
        return self.sparsify != "none"

    @property
    def needs_base(self) -> bool:
        return self.method != "linear"

    def weights_for(self, k: int) -> list[float]:
        """The per-model weights for ``k`` models (default all 1.0), checked for length."""
        if self.weights is None:
            return [1.0] * k
        if len(self.weights) != k:
            raise CairnError(f"got {len(self.weights)} weights for {k} models; give exactly one weight per model")
        return list(self.weights)

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "weights": self.weights,
            "density": self.density if self.uses_density else None,
            "lambda": self.lam if self.needs_base else None,
            "sign_method": self.sign_method if self.consensus != "none" else None,
            "weight_order": self.weight_order if self.consensus != "none" else None,
            "seed": self.seed if self.sparsify == "random" else None,
        }


@dataclass
class MergeStats:
    """Counters a merge accumulates over tensors (or chunks of tensors).

    ``entries`` counts model-entries (K per position), ``positions`` counts tensor entries.
    """

    positions: int = 0
    entries: int = 0
    trimmed: int = 0  # entries zeroed by magnitude trimming
    dropped: int = 0  # entries zeroed by DARE's random drop
    sign_conflicts: int = 0  # positions whose surviving nonzero deltas had both signs
    election_removed: int = 0  # nonzero entries discarded because they disagreed with the elected sign
    extra: dict = field(default_factory=dict)

    def add(self, other: "MergeStats") -> None:
        for name in ("positions", "entries", "trimmed", "dropped", "sign_conflicts", "election_removed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self, spec: MergeSpec) -> dict:
        out: dict = {"positions": self.positions}
        if spec.sparsify == "magnitude":
            out["fraction_trimmed"] = self.trimmed / max(self.entries, 1)
        if spec.sparsify == "random":
            out["dare_drop_rate_observed"] = self.dropped / max(self.entries, 1)
            out["dare_drop_rate_requested"] = 1.0 - spec.density
        if spec.consensus != "none":
            out["sign_conflicts_resolved"] = self.sign_conflicts
            out["fraction_positions_with_conflict"] = self.sign_conflicts / max(self.positions, 1)
            out["entries_removed_by_election"] = self.election_removed
        out.update(self.extra)
        return out


# ---------------------------------------------------------------- sparsification


def keep_count(n: int, density: float) -> int:
    """How many of ``n`` entries TIES keeps: max(1, floor(density · n)), guarded against float fuzz."""
    if density >= 1.0:
        return n
    return min(n, max(1, math.floor(density * n + 1e-6)))


def trim_threshold(magnitudes: np.ndarray, k: int) -> tuple[float, int]:
    """The k-th largest value of ``magnitudes`` and how many entries lie strictly above it.

    ``magnitudes`` is a 1-D float array that is **reordered in place** (np.partition, O(n), no copy;
    the streamed merge relies on this to keep memory at one tensor). Returns (threshold, n_above);
    the caller keeps every entry above the threshold plus the first ``k - n_above`` equal to it.
    """
    n = magnitudes.shape[0]
    if k >= n:
        return -math.inf, 0
    magnitudes.partition(n - k)
    threshold = float(magnitudes[n - k])
    n_above = int(np.count_nonzero(magnitudes[n - k + 1 :] > threshold))
    return threshold, n_above


def threshold_mask(magnitudes: torch.Tensor, threshold: float, ties_left: int) -> tuple[torch.Tensor, int]:
    """Keep-mask for one (flat) chunk: entries above ``threshold``, then ties in index order.

    ``ties_left`` is how many entries equal to the threshold may still be kept (over the whole
    tensor, chunks in order); returns the mask and the updated ``ties_left``.
    """
    mask = magnitudes > threshold
    if ties_left > 0:
        equal = magnitudes == threshold
        n_equal = int(torch.count_nonzero(equal))
        if n_equal:
            if n_equal > ties_left:
                equal &= torch.cumsum(equal, dim=0) <= ties_left
                n_equal = ties_left
            mask |= equal
            ties_left -= n_equal
    return mask, ties_left


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: a boolean mask keeping exactly ``keep_count(n, density)`` entries of largest |delta|.

    Ties at the threshold are kept in increasing flat-index order (see the module docstring).
    """
    flat = delta.detach().reshape(-1).abs().to(torch.float32)
    k = keep_count(flat.numel(), density)
    threshold, n_above = trim_threshold(flat.numpy().copy(), k)
    mask, _ = threshold_mask(flat, threshold, k - n_above)
    return mask.reshape(delta.shape)


def random_mask(shape: torch.Size | tuple[int, ...], density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE drop: keep each entry independently with probability ``density`` (p = 1 − density).

    Uses ``torch.rand(..) < density``; drawing a tensor in consecutive chunks from one generator
    gives the same mask as drawing it at once, which lets the streamed merge reproduce this function.
    """
    if density >= 1.0:
        return torch.ones(shape, dtype=torch.bool)
    return torch.rand(shape, generator=generator) < density


# ---------------------------------------------------------------- consensus and combination


def elect_sign(deltas: torch.Tensor, method: Literal["total", "frequency"] = "total",
               signs: torch.Tensor | None = None) -> torch.Tensor:
    """TIES sign election over the stacked deltas (models on dim 0): +1 or −1 per position.

    ``total`` (paper): sign of Σ_t τ̂_t. ``frequency`` (PEFT): sign of Σ_t sign(τ̂_t).
    A zero total is elected +1. ``signs`` may pass ``deltas.sign()`` when already computed.
    """
    if method == "total":
        score = deltas.sum(dim=0)
    else:
        score = (deltas.sign() if signs is None else signs).sum(dim=0)
    return torch.where(score >= 0, 1.0, -1.0).to(deltas.dtype)


def agreement_mask(deltas: torch.Tensor, sign: torch.Tensor, signs: torch.Tensor | None = None) -> torch.Tensor:
    """Which (model, position) entries are nonzero and share the elected sign (zeros never agree)."""
    return (deltas.sign() if signs is None else signs) == sign.unsqueeze(0)


def disjoint_merge(deltas: torch.Tensor, agree: torch.Tensor, weights: torch.Tensor | None = None,
                   divide_by: Literal["count", "weight"] = "count") -> torch.Tensor:
    """TIES disjoint mean: Σ_{t∈A} w_t τ̂_t divided by |A| (``count``) or by Σ_{t∈A} w_t (``weight``).

    Positions where no model agrees (all trimmed) get 0. ``weights`` has one entry per model
    (None: all 1, which skips the multiplications).
    """
    agree_f = agree.to(deltas.dtype)
    if weights is None:
        return (deltas * agree_f).sum(dim=0) / agree_f.sum(dim=0).clamp_(min=1.0)
    w = weights.reshape((-1,) + (1,) * (deltas.dim() - 1)).to(deltas.dtype)
    total = (deltas * w * agree_f).sum(dim=0)
    divisor = agree_f.sum(dim=0) if divide_by == "count" else (w * agree_f).sum(dim=0)
    return total / divisor.masked_fill_(divisor == 0, 1.0)


def combine_deltas(
    deltas: torch.Tensor, weights: Sequence[float], consensus: str = "none", weight_order: WeightOrder = "paper"
) -> tuple[torch.Tensor, MergeStats]:
    """Step 3 of the module docstring on already-sparsified, stacked deltas (models on dim 0).

    Elementwise over positions, so the streamed merge may call it chunk by chunk.
    Returns τ_m (before λ) and the sign-election counters. A nonzero entry disagrees with the
    elected sign exactly when its position holds both signs, so "conflicts" counts positions with a
    disagreeing entry and "removed" counts those entries.
    """
    stats = MergeStats()
    unit = all(x == 1.0 for x in weights)
    w = None if unit else torch.tensor(list(weights), dtype=deltas.dtype)
    if consensus == "none":
        if w is None:
            return deltas.sum(dim=0), stats
        return (deltas * w.reshape((-1,) + (1,) * (deltas.dim() - 1))).sum(dim=0), stats
    method = "total" if consensus == "sign_total" else "frequency"
    # mergekit order: the weighted deltas vote; paper order: the unweighted ones do.
    voters = deltas if w is None or weight_order == "paper" else deltas * w.reshape((-1,) + (1,) * (deltas.dim() - 1))
    signs = voters.sign()
    sign = elect_sign(voters, method, signs)
    agree = agreement_mask(voters, sign, signs)
    merged = disjoint_merge(deltas, agree, w, divide_by="count" if weight_order == "paper" else "weight")
    disagree = signs == -sign.unsqueeze(0)
    stats.election_removed = int(torch.count_nonzero(disagree))
    stats.sign_conflicts = int(torch.count_nonzero(disagree.any(dim=0)))
    return merged, stats


# ---------------------------------------------------------------- whole merges of one tensor


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Weighted average of the tensors themselves: Σ_t w_t θ_t / Σ_t w_t (default: plain mean)."""
    w = [1.0] * len(tensors) if weights is None else list(weights)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    stacked = torch.stack([t.to(dtype) for t in tensors])
    wt = torch.tensor(w, dtype=stacked.dtype).reshape((-1,) + (1,) * (stacked.dim() - 1))
    return (stacked * wt).sum(dim=0) / sum(w)


def generalized_merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    sparsify: Sparsify = "none",
    consensus: Consensus = "none",
    density: float = 1.0,
    weights: Sequence[float] | None = None,
    lam: float = 1.0,
    weight_order: WeightOrder = "paper",
    generators: Sequence[torch.Generator] | None = None,
) -> tuple[torch.Tensor, MergeStats]:
    """Task arithmetic / TIES / DARE / DARE+TIES on one tensor, in the order of the module docstring.

    ``tensors`` are the fine-tuned tensors (or deltas when ``base`` is None). ``generators`` gives
    one torch.Generator per model for DARE (None: the global RNG). Returns θ0 + λ τ_m (or λ τ_m
    without a base) in float32, and the counters.
    """
    k = len(tensors)
    w = [1.0] * k if weights is None else list(weights)
    if len(w) != k:
        raise CairnError(f"got {len(w)} weights for {k} tensors")
    stats = MergeStats()
    ref = base if base is not None else tensors[0]
    dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
    deltas = []
    for t, tensor in enumerate(tensors):
        delta = tensor.to(dtype) - base.to(dtype) if base is not None else tensor.to(dtype)
        if sparsify == "magnitude":
            mask = magnitude_mask(delta, density)
            stats.trimmed += mask.numel() - int(torch.count_nonzero(mask))
            delta = delta * mask
        elif sparsify == "random":
            mask = random_mask(delta.shape, density, None if generators is None else generators[t])
            stats.dropped += mask.numel() - int(torch.count_nonzero(mask))
            delta = delta * mask / density
        deltas.append(delta)
    merged, election = combine_deltas(torch.stack(deltas), w, consensus, weight_order)
    stats.add(election)
    stats.positions += ref.numel()
    stats.entries += ref.numel() * k
    merged = merged * lam
    if base is not None:
        merged = base.to(dtype) + merged
    return merged, stats


def _generators(seed: int | None, k: int) -> list[torch.Generator] | None:
    return None if seed is None else [torch.Generator().manual_seed(seed + t) for t in range(k)]


def task_arithmetic(tensors, base, weights=None, lam: float = 1.0) -> torch.Tensor:
    """Ilharco et al. 2023: θ0 + λ Σ_t w_t (θ_t − θ0)."""
    return generalized_merge(tensors, base, weights=weights, lam=lam)[0]


def ties(tensors, base, density: float, weights=None, lam: float = 1.0, sign_method="total", weight_order="paper"):
    """Yadav et al. 2023: trim to ``density`` → elect sign → disjoint mean (weights per ``weight_order``) → λ."""
    consensus = "sign_total" if sign_method == "total" else "sign_frequency"
    return generalized_merge(
        tensors, base, sparsify="magnitude", consensus=consensus, density=density, weights=weights, lam=lam,
        weight_order=weight_order,
    )[0]


def dare(tensors, base, density: float, weights=None, lam: float = 1.0, seed: int | None = 0) -> torch.Tensor:
    """Yu et al. 2024: drop with p = 1 − density, rescale by 1/density, then task arithmetic."""
    return generalized_merge(
        tensors, base, sparsify="random", density=density, weights=weights, lam=lam,
        generators=_generators(seed, len(tensors)),
    )[0]


def dare_ties(tensors, base, density: float, weights=None, lam: float = 1.0, sign_method="total",
              weight_order="paper", seed: int | None = 0) -> torch.Tensor:
    """DARE drop-and-rescale followed by TIES sign election and disjoint mean, then λ."""
    consensus = "sign_total" if sign_method == "total" else "sign_frequency"
    return generalized_merge(
        tensors, base, sparsify="random", consensus=consensus, density=density, weights=weights, lam=lam,
        weight_order=weight_order, generators=_generators(seed, len(tensors)),
    )[0]


def merge_tensor(spec: MergeSpec, tensors: Sequence[torch.Tensor], base: torch.Tensor | None,
                 generators: Sequence[torch.Generator] | None = None) -> tuple[torch.Tensor, MergeStats]:
    """Apply ``spec`` to one tensor (the in-memory path used for LoRA factors and small tensors)."""
    weights = spec.weights_for(len(tensors))
    if spec.method == "linear":
        stats = MergeStats(positions=tensors[0].numel(), entries=tensors[0].numel() * len(tensors))
        return linear(tensors, weights), stats
    return generalized_merge(
        tensors, base, sparsify=spec.sparsify, consensus=spec.consensus, density=spec.density,  # type: ignore[arg-type]
        weights=weights, lam=spec.lam, weight_order=spec.weight_order, generators=generators,
    )
