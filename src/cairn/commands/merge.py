"""``cairn merge``: combine fine-tuned models or LoRA adapters without their training data.

Full models are merged relative to a base, streamed tensor by tensor (cairn.combine.merge_models);
PEFT adapter directories (recognised by their adapter_config.json, or forced with --adapters) are
merged per factor, through ΔW + SVD, or into a full model (cairn.combine.merge_lora). The methods
and their papers are described in cairn.combine.merge_fns.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import json

from cairn.combine.merge_fns import ALIASES, METHODS, MergeSpec
from cairn.errors import CairnError


def register(subparsers) -> None:
    methods = list(METHODS) + list(ALIASES)
    p = subparsers.add_parser(
        "merge",
        help="merge fine-tuned models or LoRA adapters (average, task arithmetic, TIES, DARE, DARE+TIES)",
        description=(
            "Merge K fine-tuned models (relative to their common --base) or K PEFT LoRA adapters into one. "
            "Example: cairn merge --method ties --base BASE --models A B C --density 0.2 --out DIR"
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--method", required=True, choices=methods,
                   help="linear/average: weighted mean of the weights; task_arithmetic: base + λ Σ w τ; "
                        "ties: trim, elect sign, disjoint mean; dare: random drop + rescale, then sum; "
                        "dare_ties: DARE then TIES election and disjoint mean")
    p.add_argument("--base", help="the models' common base (a model spec: built-in name or directory); "
                                  "required except for linear; for adapters, only for --adapter-mode full")
    p.add_argument("--models", nargs="+", required=True, metavar="MODEL",
                   help="models (or PEFT adapter directories) to merge")
    p.add_argument("--adapters", action="store_true",
                   help="treat --models as PEFT LoRA adapters (detected automatically from adapter_config.json)")
    p.add_argument("--adapter-mode", choices=["per_factor", "svd", "full"], default="per_factor",
                   help="adapters: merge A and B separately (PEFT add_weighted_adapter, the seed paper), "
                        "merge ΔW=B·A and re-factorise by SVD, or write base + merged ΔW as a full model")
    p.add_argument("--rank", type=int, help="rank of the SVD re-factorisation (default: the largest input rank)")
    p.add_argument("--density", type=float, default=0.2,
                   help="fraction of each delta kept, in (0, 1]: TIES keeps the top fraction by magnitude, "
                        "DARE keeps each entry with this probability (drop rate p = 1 - density)")
    p.add_argument("--drop-rate", type=float, dest="drop_rate",
                   help="DARE's drop probability p in [0, 1); an alternative to --density (density = 1 - p)")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per model (default 1 each)")
    p.add_argument("--lambda", type=float, dest="lam", default=1.0, help="scale of the merged task vector")
    p.add_argument("--sign-method", choices=["total", "frequency"], default="total",
                   help="TIES sign election: sign of the summed mass (paper) or of the count of signs")
    p.add_argument("--weight-order", choices=["paper", "mergekit"], default="paper",
                   help="paper: weights applied after sign election, disjoint mean divides by the count "
                        "(= PEFT); mergekit: weights applied before election, divides by the agreeing weights")
    p.add_argument("--seed", type=int, default=0, help="seed of DARE's random drop")
    p.add_argument("--dtype", default="auto", help="output dtype of floating tensors (auto = the base's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output safetensors shard")
    p.add_argument("--max-relative-delta", type=float, default=0.5,
                   help="stop when ||model - base|| / ||base|| exceeds this for a tensor (the base is likely wrong); "
                        "0 disables the check")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def spec_from_args(args: argparse.Namespace) -> MergeSpec:
    density = args.density
    if args.drop_rate is not None:
        if not 0.0 <= args.drop_rate < 1.0:
            raise CairnError(f"--drop-rate must be in [0, 1) (p = 1 would drop every entry), got {args.drop_rate}")
        density = 1.0 - args.drop_rate
    return MergeSpec(method=args.method, weights=args.weights, density=density, lam=args.lam,
                     sign_method=args.sign_method, weight_order=args.weight_order, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    from cairn.combine.merge_lora import is_adapter_dir, merge_adapters
    from cairn.combine.merge_models import merge_models

    spec = spec_from_args(args)
    flags = [is_adapter_dir(m) for m in args.models]
    if any(flags) and not all(flags):
        mixed = [m for m, f in zip(args.models, flags) if not f]
        raise CairnError(f"some --models are PEFT adapters and some are not (e.g. {mixed[0]}); merge one kind at a time")
    progress = not args.no_progress
    if args.adapters or all(flags):
        from cairn.rundir import require_standalone  # [wire] refuse a round adapter trained on merged rounds

        for m in args.models:
            require_standalone(Path(m), "merging it against the raw base")
        summary = merge_adapters(args.models, args.out, spec, mode=args.adapter_mode, rank=args.rank,
                                 base=args.base, overwrite=args.overwrite, dtype=args.dtype,
                                 max_shard_size=args.max_shard_size, progress=progress)
    else:
        if args.rank is not None:
            raise CairnError("--rank applies to adapter merging only")
        from cairn.io.fft_round import full_folders, record_sources

        with full_folders(args.models) as models:  # delta-stored FFT rounds: restored to temporary full copies
            summary = merge_models(args.base, [str(m) for m in models], args.out, spec, overwrite=args.overwrite,
                                   dtype=args.dtype, max_shard_size=args.max_shard_size,
                                   max_relative_delta=args.max_relative_delta or None, progress=progress)
        if models != [Path(m) for m in args.models]:
            record_sources(Path(args.out) / "cairn_merge.json", "models", args.models)
    print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    """A short human-readable report of a merge's statistics."""
    lines = [f"merged with {summary['method']} -> {summary['out']}"]
    labels = {
        "fraction_trimmed": "fraction trimmed (TIES)",
        "dare_drop_rate_observed": "DARE drop rate observed",
        "dare_drop_rate_requested": "DARE drop rate requested",
        "sign_conflicts_resolved": "sign conflicts resolved",
        "fraction_positions_with_conflict": "fraction of entries with a sign conflict",
        "entries_removed_by_election": "entries removed by sign election",
        "svd_energy_kept_min": "SVD energy kept (min over modules)",
        "svd_energy_kept_mean": "SVD energy kept (mean over modules)",
        "relative_delta_norm": "||model - base|| / ||base||",
        "seconds": "seconds",
    }
    for key, label in labels.items():
        if key in summary and summary[key] is not None:
            value = summary[key]
            if isinstance(value, float):
                value = f"{value:.4g}"
            elif isinstance(value, dict):
                value = json.dumps({k: round(v, 4) for k, v in value.items()})
            lines.append(f"  {label}: {value}")
    for warning in summary.get("warnings", []):
        lines.append(f"  warning: {warning}")
    return "\n".join(lines)
