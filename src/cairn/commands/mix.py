"""``cairn mix``: mix fine-tuned models or LoRA adapters of one base into a mixture of experts.

Full models become a Mixtral-format MoE (their MLPs are the experts, everything else from the base;
loads with vanilla transformers); PEFT LoRA adapters become a routed LoRA-MoE saved with its experts
in PEFT format (moetify, Lee et al. 2024, arXiv 2408.17280). Routers are initialised at random or
from hidden states of positive prompts per expert; training them is a step of an experiment config
(``combine: [{kind: moe, router_training: {...}}]``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "mix",
        help="mix fine-tuned models (Mixtral MoE) or LoRA adapters (routed LoRA-MoE) into experts",
        description="Build a mixture of experts from K models fine-tuned from one base (Mixtral format) or "
                    "K LoRA adapters of one base (routed LoRA-MoE). Example: cairn mix --base smollm2-135m "
                    "--experts A B C --top-k 2 --router-prompts a.txt b.txt c.txt --out DIR",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--base", required=True, help="the experts' common base (built-in name or model folder)")
    p.add_argument("--experts", nargs="+", required=True, metavar="PATH",
                   help="fine-tuned model folders, or PEFT adapter folders (detected from adapter_config.json)")
    p.add_argument("--out", required=True, type=Path, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (LoRA: 0 = dense)")
    p.add_argument("--router-init", choices=["random", "prompts", "last_token"], default=None,
                   help="router initialisation (default: prompts when --router-prompts is given, else random)")
    p.add_argument("--router-prompts", nargs="+", type=Path, metavar="FILE",
                   help="one text file per expert, one positive prompt per line")
    p.add_argument("--normalisation", choices=["softmax", "sigmoid"], default="softmax",
                   help="LoRA-MoE router normalisation")
    p.add_argument("--moe-layers", type=int, nargs="+", help="FFT: layers that become MoE (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of random router initialisation")  # report2: help text
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run)


def _prompts(files: list[Path] | None, k: int) -> list[list[str]] | None:
    from cairn.errors import CairnError

    if not files:
        return None
    if len(files) != k:
        raise CairnError(f"--router-prompts needs one file per expert: {k} experts, {len(files)} files")
    out = []
    for f in files:
        if not f.is_file():
            raise CairnError(f"router prompt file {f} does not exist")
        from cairn.errors import read_text_file  # robust: non-UTF-8 -> CairnError naming the file

        lines = [line.strip() for line in read_text_file(f, "router prompt file").splitlines() if line.strip()]
        if not lines:
            raise CairnError(f"router prompt file {f} is empty; give at least one prompt per line")
        out.append(lines)
    return out


def run(args: argparse.Namespace) -> int:
    from cairn.errors import CairnError
    from cairn.models import load_model, load_tokenizer, resolve_model_path

    experts = [Path(e) for e in args.experts]
    for e in experts:
        if not e.is_dir():
            raise CairnError(f"expert {e} is not a folder")
    kinds = {(e / "adapter_config.json").is_file() for e in experts}
    from cairn.rundir import require_standalone  # [wire] refuse a round adapter trained on merged rounds

    for e in experts:
        require_standalone(e, "mixing it as an expert of the raw base")
    if len(kinds) > 1:
        raise CairnError("--experts mixes LoRA adapters and full models; give one kind")
    if args.out.exists() and not args.overwrite:
        raise CairnError(f"{args.out} already exists; choose another --out or pass --overwrite")
    prompts = _prompts(args.router_prompts, len(experts))
    init = args.router_init or ("prompts" if prompts else "random")
    if init != "random" and prompts is None:
        raise CairnError(f"--router-init {init} needs --router-prompts (one file per expert)")
    tokenizer = load_tokenizer(args.base)
    if kinds == {True}:
        from cairn.combine.moe_lora import build_lora_moe, mixture_info, save_lora_moe

        model = build_lora_moe(load_model(args.base), experts, top_k=args.top_k or None,
                               normalisation=args.normalisation, router_init=init, router_prompts=prompts,
                               tokenizer=tokenizer, seed=args.seed)
        save_lora_moe(model, args.out, overwrite=args.overwrite)
        stats = mixture_info(model)
    else:
        from cairn.combine.moe_fft import MANIFEST, build_fft_moe
        from cairn.io.fft_round import full_folders, record_sources

        with full_folders(experts) as full:  # delta-stored FFT rounds: restored to temporary full copies
            stats = build_fft_moe(resolve_model_path(args.base), full, args.out, top_k=args.top_k,
                                  moe_layers=args.moe_layers, router_init=init, router_prompts=prompts,
                                  overwrite=args.overwrite, tokenizer=tokenizer, seed=args.seed)
        if full != experts:
            record_sources(args.out / MANIFEST, "experts", experts)
            stats["experts"] = [str(e) for e in experts]
    print(json.dumps(stats, indent=2, default=str))
    print(f"mixture written to {args.out}")
    return 0
