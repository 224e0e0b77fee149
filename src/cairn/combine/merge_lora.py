"""Merging LoRA adapters (PEFT format) with the functions of :mod:`cairn.combine.merge_fns`.

Three modes, all producing artifacts that vanilla PEFT / transformers load:

- ``per_factor``: merge the A factors with each other and the B factors with each other, the way
  PEFT's ``add_weighted_adapter`` does for its non-SVD types and the way the seed paper merged its
  adapters (Lee & Wynter 2024, TIES and TIES+DARE at density 0.2 with PEFT). The factors themselves
  are the "deltas" (there is no base). Each adapter's scaling s_t = lora_alpha/r (alpha/√r with
  rsLoRA) and weight w_t become per-factor weights sign(w_t s_t)·√|w_t s_t| for A and √|w_t s_t|
  for B (PEFT's rule); they enter the merge function as its weights, in the order that function
  states (default: after trimming and sign election, as PEFT does). The output adapter has
  lora_alpha = r, i.e. scaling 1. Method by method this equals PEFT: ``task_arithmetic`` = PEFT
  ``linear`` (a weighted sum of factors), ``ties``/``dare``/``dare_ties`` = PEFT
  ``ties``/``dare_linear``/``dare_ties``. ``linear`` (average) is the weighted *mean* of the scaled
  factors, Σ_t (w_t/Σw) √s_t A_t, so K identical adapters average to themselves (PEFT's ``linear``
  with weights 1/K would give K times the update). λ multiplies the merged A only, so B·A scales
  by λ, not λ² (PEFT has no λ). Per-factor merging is a heuristic: B·A of merged factors is not the
  merge of the B_t·A_t (cross terms appear), which is why the SVD mode exists.
- ``svd``: merge the updates ΔW_t = s_t B_t A_t themselves (as deltas, with the weights and λ of the
  method), then re-factorise each merged ΔW to ``rank`` by truncated SVD, B = U_r √S_r,
  A = √S_r V_rᵀ (PEFT's ``*_svd`` types put all of S into B; splitting it keeps the two factors on
  the same scale; the product is the same). ``rank`` defaults to the largest input rank; the
  fraction of ‖ΔW‖² the truncation keeps is reported.
- ``full``: the same merged ΔW added to the base weights, written as a full checkpoint
  (θ = θ0 + merged ΔW for adapted tensors, θ0 elsewhere), with the base's config and tokenizer.

Adapters with different ranks: ``svd`` and ``full`` need nothing special (each ΔW is out × in
whatever the rank). ``per_factor`` pads the smaller adapters' A with zero rows and B with zero columns
up to the largest rank; that leaves every B_t·A_t unchanged, and the merge then pairs rank
components by index, which is no more arbitrary than per-factor merging is in the first place
(PEFT refuses different ranks here).

Not supported (refused with a message): DoRA and ``modules_to_save`` /
saved embedding tensors that differ between adapters (identical ones are copied through).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch

from cairn import atomic
from cairn.io.adapters import lora_scaling
from cairn.io.support import TOKENIZER_FILES, copy_support_files
from cairn.combine.merge_fns import MergeSpec, MergeStats, merge_tensor
from cairn.combine.merge_models import (
    DEFAULT_SHARD_BYTES,
    ST_CODES,
    ShardedWriter,
    TensorReader,
    check_output,
    open_model,
    parse_size,
    tensor_generators,
)
from cairn.errors import CairnError, load_safetensors, read_json_file

Mode = Literal["per_factor", "svd", "full"]
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_A|lora_B)\.weight$|"
                       r"^(?P<emodule>.+)\.(?P<efactor>lora_embedding_A|lora_embedding_B)$")


@dataclass
class Adapter:
    path: Path
    config: dict
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, bool]]  # module -> (A, B, is_embedding)
    other: dict[str, torch.Tensor]  # non-LoRA tensors (modules_to_save, saved embedding layers)

    def scaling(self, module: str) -> float:
        return lora_scaling(self.config, module, rank=self.modules[module][0].shape[0])

    def delta(self, module: str) -> torch.Tensor:
        """s · B·A in the "B·A" orientation (out × in; for embeddings dim × vocab)."""
        a, b, _ = self.modules[module]
        return self.scaling(module) * (b.to(torch.float32) @ a.to(torch.float32))


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Read a PEFT LoRA adapter directory; CairnError for anything cairn cannot merge."""
    path = Path(path)
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise CairnError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
    config = read_json_file(cfg_file, "adapter config")  # robust: corrupt JSON -> CairnError naming the file
    if config.get("peft_type", "LORA") != "LORA":
        raise CairnError(f"{cfg_file}: peft_type is {config.get('peft_type')}; only LoRA adapters can be merged")
    if config.get("use_dora"):
        raise CairnError(f"{cfg_file}: DoRA adapters (use_dora: true) are not supported by cairn merge")
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        hint = " (it has adapter_model.bin; re-save with safe_serialization=True)" \
            if (path / "adapter_model.bin").is_file() else ""
        raise CairnError(f"{path} has no {ADAPTER_WEIGHTS}{hint}")
    state = load_safetensors(weights)  # robust: truncated file -> CairnError naming it
    factors: dict[str, dict[str, torch.Tensor]] = {}
    embedding: dict[str, bool] = {}
    other: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _LORA_KEY.match(key)
        if "lora_magnitude_vector" in key:
            raise CairnError(f"{weights}: tensor {key} belongs to DoRA, which cairn merge does not support")
        if match is None:
            other[key] = tensor
            continue
        module = match.group("module") or match.group("emodule")
        factor = (match.group("factor") or match.group("efactor"))[-1]  # "A" or "B"
        factors.setdefault(module, {})[factor] = tensor
        embedding[module] = match.group("emodule") is not None
    modules = {}
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise CairnError(f"{weights}: module {module} has no lora_{missing} tensor")
        a, b = pair["A"], pair["B"]
        if a.shape[0] != b.shape[1]:
            raise CairnError(f"{weights}: module {module} has lora_A rank {a.shape[0]} but lora_B rank {b.shape[1]}")
        modules[module] = (a, b, embedding[module])
    if not modules:
        raise CairnError(f"{weights} contains no LoRA tensors")
    return Adapter(path, config, modules, other)


def _check_adapters(adapters: Sequence[Adapter]) -> list[str]:
    first = adapters[0]
    for ad in adapters[1:]:
        for module in first.modules:
            if module not in ad.modules:
                raise CairnError(f"module {module} is adapted in {first.path} but not in {ad.path}; "
                                 f"adapters must adapt the same modules (target_modules)")
        for module in ad.modules:
            if module not in first.modules:
                raise CairnError(f"module {module} is adapted in {ad.path} but not in {first.path}; "
                                 f"adapters must adapt the same modules (target_modules)")
            (a0, b0, e0), (a1, b1, e1) = first.modules[module], ad.modules[module]
            if a0.shape[1] != a1.shape[1] or b0.shape[0] != b1.shape[0] or e0 != e1:
                raise CairnError(
                    f"module {module} is {b0.shape[0]}x{a0.shape[1]} in {first.path} but {b1.shape[0]}x{a1.shape[1]} "
                    f"in {ad.path}: the adapters belong to different base architectures")
        for key, tensor in ad.other.items():
            if key not in first.other or first.other[key].shape != tensor.shape or not torch.equal(first.other[key], tensor):
                raise CairnError(f"tensor {key} (modules_to_save or a saved embedding layer) differs between "
                                 f"{first.path} and {ad.path}; cairn merges only LoRA factors")
        if ad.config.get("fan_in_fan_out") != first.config.get("fan_in_fan_out"):
            raise CairnError(f"{ad.path} and {first.path} disagree on fan_in_fan_out")
    warnings = []
    bases = {str(a.config.get("base_model_name_or_path")) for a in adapters}
    if len(bases) > 1:
        warnings.append(f"the adapters name different base models: {sorted(bases)}")
    return warnings


def _factor_weights(adapter: Adapter, module: str, weight: float) -> tuple[float, float]:
    """PEFT's per-factor weights: sign(w s)·√|w s| for A and √|w s| for B."""
    ws = weight * adapter.scaling(module)
    root = math.sqrt(abs(ws))
    return (root if ws >= 0 else -root), root


def _pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    r = a.shape[0]
    if r == rank:
        return a, b
    return torch.cat([a, a.new_zeros(rank - r, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)


def _merge_per_factor(spec: MergeSpec, adapters: Sequence[Adapter], module: str, weights: list[float],
                      stats: MergeStats) -> tuple[torch.Tensor, torch.Tensor]:
    rank = max(ad.modules[module][0].shape[0] for ad in adapters)
    factors = [_pad_rank(ad.modules[module][0].to(torch.float32), ad.modules[module][1].to(torch.float32), rank)
               for ad in adapters]
    if spec.method == "linear":
        # The weighted mean of the scaled factors: a sum with weights (w_t / Σw)·√s_t.
        total = sum(weights)
        roots = [math.sqrt(ad.scaling(module)) * w / total for ad, w in zip(adapters, weights)]
        spec_a = spec_b = MergeSpec(method="task_arithmetic", weights=roots)
    else:
        pairs = [_factor_weights(ad, module, w) for ad, w in zip(adapters, weights)]
        # λ scales the A factors only, so that the product B·A is scaled by λ (not λ²).
        spec_a = MergeSpec(**{**_spec_args(spec), "weights": [p[0] for p in pairs]})
        spec_b = MergeSpec(**{**_spec_args(spec), "weights": [p[1] for p in pairs], "lam": 1.0})
    merged = []
    for i, (name, factor_spec) in enumerate((("lora_A", spec_a), ("lora_B", spec_b))):
        key = f"{module}.{name}"
        gens = tensor_generators(spec.seed, key, len(adapters)) if spec.sparsify == "random" else None
        tensor, st = merge_tensor(factor_spec, [f[i] for f in factors], None, generators=gens)
        stats.add(st)
        merged.append(tensor)
    return merged[0], merged[1]


def _merged_delta(spec: MergeSpec, adapters: Sequence[Adapter], module: str, weights: list[float],
                  stats: MergeStats) -> torch.Tensor:
    gens = tensor_generators(spec.seed, module, len(adapters)) if spec.sparsify == "random" else None
    inner = MergeSpec(**{**_spec_args(spec), "weights": weights})
    tensor, st = merge_tensor(inner, [ad.delta(module) for ad in adapters], None, generators=gens)
    stats.add(st)
    return tensor


def _spec_args(spec: MergeSpec) -> dict:
    return {"method": spec.method, "weights": spec.weights, "density": spec.density, "lam": spec.lam,
            "sign_method": spec.sign_method, "weight_order": spec.weight_order, "seed": spec.seed}


def svd_factorize(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Truncated SVD ΔW ≈ B·A with B = U_r √S_r, A = √S_r V_rᵀ; returns (A, B, fraction of ‖ΔW‖² kept).

    When ``rank`` exceeds min(out, in) the extra components are zero.
    """
    u, s, vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
    r = min(rank, s.shape[0])
    root = s[:r].sqrt()
    b = u[:, :r] * root
    a = root.unsqueeze(1) * vh[:r]
    total = float(s.square().sum())
    kept = float(s[:r].square().sum()) / total if total > 0 else 1.0
    return _pad_rank(a, b, rank) + (kept,)


def _adapter_key(module: str, factor: str, embedding: bool) -> str:
    return f"{module}.lora_embedding_{factor}" if embedding else f"{module}.lora_{factor}.weight"


def _base_tensor_name(module: str) -> str:
    """PEFT's saved module path → the base checkpoint's tensor name."""
    name = module.removeprefix("base_model.model.")
    return f"{name}.weight"


def _write_adapter(out: Path, adapters: Sequence[Adapter], tensors: dict[str, torch.Tensor], rank: int,
                   dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    first = adapters[0]
    config = dict(first.config)
    targets: set[str] = set()
    for ad in adapters:
        tm = ad.config.get("target_modules")
        if isinstance(tm, list):
            targets.update(tm)
    if targets and all(isinstance(ad.config.get("target_modules"), list) for ad in adapters):
        config["target_modules"] = sorted(targets)
    config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={}, use_dora=False)
    atomic.write_json(out / "adapter_config.json", config)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(out / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    copy_support_files(first.path, out, only=TOKENIZER_FILES)


def merge_adapters(
    adapters: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    method: str | MergeSpec = "ties",
    mode: Mode = "per_factor",
    rank: int | None = None,
    base: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    dtype: str | None = None,
    max_shard_size: str | int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    **params,
) -> dict:
    """Merge PEFT LoRA adapters into one adapter (``per_factor``, ``svd``) or a full model (``full``).

    ``method`` is a :class:`MergeSpec` or a name with parameters in ``params`` (weights, density,
    lam, sign_method, weight_order, seed); see the module docstring for what each mode does.
    ``rank`` (svd only) defaults to the largest input rank. ``base`` is required for ``full``.
    Returns statistics, also written to ``out/cairn_merge.json``.
    """
    spec = method if isinstance(method, MergeSpec) else MergeSpec(method=method, **params)
    if mode not in ("per_factor", "svd", "full"):
        raise CairnError(f"adapter merge mode must be per_factor, svd or full, got {mode!r}")
    if len(adapters) < 2:
        raise CairnError(f"merging needs at least two adapters, got {len(adapters)}")
    weights = spec.weights_for(len(adapters))
    if rank is not None and mode != "svd":
        raise CairnError("--rank applies to the svd mode only (per_factor keeps the largest input rank)")
    if rank is not None and rank < 1:
        raise CairnError(f"rank must be a positive integer, got {rank}")
    if mode == "full" and base is None:
        raise CairnError("mode full writes base + merged update; give the base model with --base")
    loaded = [load_adapter(a) for a in adapters]
    warnings = _check_adapters(loaded)
    out = Path(out)
    base_in = open_model(base, "base") if mode == "full" else None
    check_output(out, overwrite, [a.path for a in loaded] + ([base_in.path] if base_in else []))

    started = time.perf_counter()
    stats = MergeStats()
    modules = sorted(loaded[0].modules)
    ranks = sorted({ad.modules[m][0].shape[0] for ad in loaded for m in modules})
    out_rank = max(ranks) if rank is None else rank
    in_dtype = loaded[0].modules[modules[0]][0].dtype
    if dtype not in (None, "auto"):
        in_dtype = getattr(torch, str(dtype))
    energy: list[float] = []
    from tqdm.auto import tqdm

    with atomic.atomic_dir(out, overwrite=overwrite) as tmp:
        if mode in ("per_factor", "svd"):
            tensors: dict[str, torch.Tensor] = {}
            for module in tqdm(modules, desc=f"merge {spec.method} ({mode})", unit="module", disable=not progress,
                               leave=False):
                emb = loaded[0].modules[module][2]
                if mode == "per_factor":
                    a, b = _merge_per_factor(spec, loaded, module, weights, stats)
                else:
                    a, b, kept = svd_factorize(_merged_delta(spec, loaded, module, weights, stats), out_rank)
                    energy.append(kept)
                tensors[_adapter_key(module, "A", emb)] = a
                tensors[_adapter_key(module, "B", emb)] = b
            tensors.update(loaded[0].other)
            _write_adapter(tmp, loaded, tensors, out_rank, in_dtype)
        else:
            _write_full(tmp, spec, loaded, modules, weights, stats, base_in, dtype, parse_size(max_shard_size),
                        progress)
        summary = {
            "kind": "adapter_merge",
            "mode": mode,
            **spec.as_dict(),
            "adapters": [str(a) for a in adapters],
            "base": str(base) if base is not None else None,
            "modules": len(modules),
            "input_ranks": ranks,
            "output_rank": out_rank if mode != "full" else None,
            **stats.summary(spec),
            "seconds": round(time.perf_counter() - started, 3),
        }
        if energy:
            summary["svd_energy_kept_min"] = min(energy)
            summary["svd_energy_kept_mean"] = sum(energy) / len(energy)
        if warnings:
            summary["warnings"] = warnings
        atomic.write_json(tmp / "cairn_merge.json", summary)
    summary["out"] = str(out)
    return summary


def _write_full(tmp: Path, spec: MergeSpec, adapters: Sequence[Adapter], modules: list[str], weights: list[float],
                stats: MergeStats, base_in, dtype: str | None, max_shard_bytes: int, progress: bool) -> None:
    """θ0 + merged ΔW for adapted tensors, θ0 elsewhere, streamed tensor by tensor from the base."""
    from tqdm.auto import tqdm

    by_tensor = {}
    for module in modules:
        name = _base_tensor_name(module)
        if name not in base_in.tensors:
            raise CairnError(f"adapter module {module} has no tensor {name} in the base {base_in.spec} "
                             f"({base_in.path}); is this the adapters' base model?")
        by_tensor[name] = module
    for key in adapters[0].other:
        if ".base_layer." not in key:
            raise CairnError(f"adapter tensor {key} (modules_to_save) cannot be folded into a full model by cairn; "
                             f"use mode per_factor or svd")
    out_dtype = getattr(torch, dtype) if dtype not in (None, "auto") else None
    names = sorted(base_in.tensors, key=lambda n: (str(base_in.tensors[n].file), base_in.tensors[n].offset))
    dtypes = {n: out_dtype if out_dtype is not None and base_in.tensors[n].dtype.is_floating_point
              else base_in.tensors[n].dtype for n in names}
    writer = ShardedWriter(tmp, [(n, ST_CODES[dtypes[n]], base_in.tensors[n].shape) for n in names], max_shard_bytes)
    fan_in_fan_out = bool(adapters[0].config.get("fan_in_fan_out"))
    with TensorReader() as reader:
        for name in tqdm(names, desc=f"merge {spec.method} (full)", unit="tensor", disable=not progress, leave=False):
            ref = base_in.tensors[name]
            tensor = reader.read_full(ref)
            module = by_tensor.get(name)
            if module is not None:
                delta = _merged_delta(spec, adapters, module, weights, stats)
                # PEFT stores embedding updates as (B·A)ᵀ and Conv1D-style (fan_in_fan_out) weights transposed.
                if adapters[0].modules[module][2] or fan_in_fan_out:
                    delta = delta.T
                if tuple(delta.shape) != ref.shape:
                    raise CairnError(f"tensor {name}: the adapters' update is {list(delta.shape)} but the base "
                                     f"{base_in.spec} has {list(ref.shape)}; is this the adapters' base model?")
                tensor = tensor.to(torch.float32) + delta
            writer.write(name, tensor.to(dtypes[name]).reshape(-1))
    writer.close()
    copy_support_files(base_in.path, tmp)
    if out_dtype is not None:
        config = json.loads((tmp / "config.json").read_text())
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
        atomic.write_json(tmp / "config.json", config)
