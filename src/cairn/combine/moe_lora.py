"""LoRA MoE mixing: K LoRA adapters of one base become routed experts of every adapted linear.

Implements the LoRA variant of MoE mixing in moetify (Lee et al. 2024, arXiv 2408.17280), used by
the seed paper (Lee & Wynter 2024) for its semi-cooperative setting, with router training that
neither moetify nor mergekit ships. Each adapted linear computes

    y = W0·x + Σ_e g_e(x) · s_e · B_e·A_e·x,    g(x) = normalise(W_r·x)

with W_r a per-module router (K × d_in, no bias) and s_e the expert's PEFT scaling (α/r, or α/√r
with rsLoRA). Normalisation: ``softmax`` (top-k then renormalised over the chosen k, as Mixtral) or
``sigmoid`` (moetify's default; top-k keeps the chosen gates *without* renormalising, since sigmoid
gates are independent). ``top_k=None`` is dense routing.

Computation is batched over tokens and experts: the K expert A matrices are stacked into one
(K·r × d_in) matrix and the B matrices into one (d_out × K·r) matrix, so a mixture is two matmuls of
a rank-K·r LoRA plus the router; top-k is applied by zeroing the gates of unchosen experts (with r
small, computing all K low-rank products is cheaper on CPU than gathering per-token expert weights;
see benchmarks/moe.py). Adapters of different ranks are zero-padded to the largest rank, which
changes nothing numerically.

Artifacts: :func:`save_lora_moe` writes ``lora_moe.json`` (manifest), ``routers.safetensors`` and
each expert as a PEFT adapter directory ``experts/<i>/`` (its original adapter_config.json and key
names, original rank and dtype), so every expert still loads with vanilla PEFT.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from cairn import atomic
from cairn.combine import router_init as rinit
from cairn.errors import CairnError, load_safetensors
from cairn.io.adapters import lora_scaling
from cairn.routed_lora import (MIXTURE_ATTR, NORMALISATIONS, RoutedLoRALinear, experts_disabled, routed_layers,
                               routing_weights)

MANIFEST = "lora_moe.json"
ROUTERS_FILE = "routers.safetensors"
_PEFT_PREFIX = "base_model.model."
_INFO_ATTR = MIXTURE_ATTR

# The mixer's historical names for the shared layer (cairn.routed_lora).
LoRAMoELinear = RoutedLoRALinear
lora_moe_layers = routed_layers


# ----------------------------------------------------------------------------- reading PEFT adapters


@dataclass
class LoraAdapter:
    """One PEFT LoRA adapter read from disk: its config and, per module, A (r, d_in), B (d_out, r), scaling."""

    source: str
    config: dict[str, Any]
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    scaling: dict[str, float]
    dtype: torch.dtype

    @property
    def modules(self) -> list[str]:
        return list(self.A)


def read_lora_adapter(path: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."""
    path = Path(path)
    cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.is_file():
        raise CairnError(f"{path} is not a PEFT adapter directory: adapter_config.json is missing")
    if not weights.is_file():
        hint = " (adapter_model.bin found: re-save it with safe_serialization=True)" if (path / "adapter_model.bin").is_file() else ""
        raise CairnError(f"{path}: adapter_model.safetensors is missing{hint}")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CairnError(f"{cfg_file}: invalid JSON ({exc})") from None
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise CairnError(f"{path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters can be mixed")
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise CairnError(f"{path}: {flag}=true is not supported in a LoRA mixture; use plain LoRA adapters")
    if config.get("fan_in_fan_out"):
        raise CairnError(f"{path}: fan_in_fan_out adapters (GPT-2 Conv1D) are not supported")
    tensors = load_safetensors(weights)  # robust: truncated file -> CairnError naming it
    A, B = {}, {}
    for key, value in tensors.items():
        name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        if name.endswith(".lora_A.weight"):
            A[name[: -len(".lora_A.weight")]] = value
        elif name.endswith(".lora_B.weight"):
            B[name[: -len(".lora_B.weight")]] = value
        else:
            raise CairnError(
                f"{weights}: tensor {key!r} is not a LoRA A/B matrix (modules_to_save, embeddings or DoRA?); "
                "a LoRA mixture can only route plain LoRA linear adapters"
            )
    if not A or set(A) != set(B):
        raise CairnError(f"{weights}: lora_A and lora_B tensors do not pair up (modules {sorted(set(A) ^ set(B))[:5]})")
    scaling = {}
    for module, a in A.items():
        r = a.shape[0]
        if B[module].shape[1] != r:
            raise CairnError(f"{weights}: {module} has lora_A rank {r} but lora_B rank {B[module].shape[1]}")
        scaling[module] = lora_scaling(config, module, rank=r)
    dtype = next(iter(A.values())).dtype
    return LoraAdapter(source=str(path), config=config, A=A, B=B, scaling=scaling, dtype=dtype)


def check_adapters(adapters: Sequence[LoraAdapter], check_base_name: bool = True) -> list[str]:
    """Check the adapters can be mixed (same base, same target modules, same shapes); return the modules."""
    if not adapters:
        raise CairnError("a LoRA mixture needs at least one adapter")
    first = adapters[0]
    if check_base_name:
        names = {a.source: a.config.get("base_model_name_or_path") for a in adapters}
        given = {v for v in names.values() if v}
        if len(given) > 1:
            listing = "; ".join(f"{s}: {v}" for s, v in names.items())
            raise CairnError(
                "the adapters come from different base models (adapter_config.json base_model_name_or_path: "
                f"{listing}); mix adapters of one base, or pass check_base_name=False if these name the same model"
            )
    modules = first.modules
    for other in adapters[1:]:
        extra = sorted(set(other.modules) - set(modules))
        missing = sorted(set(modules) - set(other.modules))
        if extra or missing:
            raise CairnError(
                f"adapter {other.source} targets different modules than {first.source}: "
                f"only in {other.source}: {_short(extra)}; only in {first.source}: {_short(missing)} "
                f"(target_modules {other.config.get('target_modules')} vs {first.config.get('target_modules')}); "
                "train the adapters with the same target_modules"
            )
        for m in modules:
            if other.A[m].shape[1] != first.A[m].shape[1] or other.B[m].shape[0] != first.B[m].shape[0]:
                raise CairnError(f"adapter {other.source}: module {m} has different in/out sizes than {first.source}")
    return modules


def _short(names: Sequence[str], n: int = 6) -> str:
    return "[" + ", ".join(names[:n]) + (f", ... {len(names) - n} more" if len(names) > n else "") + "]"


def _check_against_model(model: nn.Module, adapter: LoraAdapter, modules: Sequence[str]) -> dict[str, nn.Module]:
    found = dict(model.named_modules())
    targets = {}
    for m in modules:
        mod = found.get(m)
        if isinstance(mod, RoutedLoRALinear):
            mod = mod.base
        if not isinstance(mod, nn.Linear):
            raise CairnError(
                f"adapter {adapter.source} targets {m}, which is not a linear layer of the base model "
                "(adapter trained on another architecture?)"
            )
        a, b = adapter.A[m], adapter.B[m]
        if a.shape[1] != mod.in_features or b.shape[0] != mod.out_features:
            raise CairnError(
                f"adapter {adapter.source}: {m} expects a {a.shape[1]}->{b.shape[0]} linear but the base model's is "
                f"{mod.in_features}->{mod.out_features}; the adapter was trained on a different base model"
            )
        targets[m] = found[m]
    return targets


# ----------------------------------------------------------------------------- building


def _stack(adapters: Sequence[LoraAdapter], module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack the experts of one module, zero-padding ranks to the largest."""
    r_max = max(a.A[module].shape[0] for a in adapters)
    d_in, d_out = adapters[0].A[module].shape[1], adapters[0].B[module].shape[0]
    A = torch.zeros(len(adapters), r_max, d_in, dtype=torch.float32)
    B = torch.zeros(len(adapters), d_out, r_max, dtype=torch.float32)
    for e, ad in enumerate(adapters):
        r = ad.A[module].shape[0]
        A[e, :r] = ad.A[module].float()
        B[e, :, :r] = ad.B[module].float()
    scaling = torch.tensor([ad.scaling[module] for ad in adapters], dtype=torch.float32)
    return A, B, scaling


def _expert_record(adapter: LoraAdapter) -> dict[str, Any]:
    return {
        "source": adapter.source,
        "config": adapter.config,
        "ranks": {m: int(a.shape[0]) for m, a in adapter.A.items()},
        "dtype": str(adapter.dtype).removeprefix("torch."),
    }


def _init_routers(
    model: nn.Module,
    modules: Sequence[str],
    num_experts: int,
    router_init: str,
    router_prompts: Sequence[Sequence[str]] | None,
    tokenizer,
    seed: int,
) -> dict[str, torch.Tensor | None]:
    if router_init == "zeros":
        return {m: None for m in modules}
    if router_init == "random":
        mods = dict(model.named_modules())
        return {
            m: rinit.random_router(num_experts, mods[m].in_features, seed=seed + i) for i, m in enumerate(modules)
        }
    if tokenizer is None:
        raise CairnError(f"router_init={router_init!r} needs the base model's tokenizer")
    with experts_disabled(model):
        return rinit.hidden_state_routers(model, tokenizer, router_prompts, modules, rinit.reduce_for(router_init))


def build_lora_moe(
    base_model: nn.Module,
    adapters: Sequence[str | Path],
    top_k: int | None = None,
    normalisation: str = "softmax",
    router_init: str = "random",
    router_prompts: Sequence[Sequence[str]] | None = None,
    tokenizer=None,
    seed: int = 0,
    check_base_name: bool = True,
    dropout: float = 0.0,
) -> nn.Module:
    """Turn ``base_model`` (modified in place and returned) into a LoRA mixture of ``adapters``.

    Every linear the adapters target becomes a :class:`RoutedLoRALinear`; the base and the experts are
    frozen, the routers trainable. ``router_prompts`` is one list of texts per adapter (needed for
    ``router_init`` "prompts", "last_token" and "data"; with ``tokenizer``).
    """
    if routed_layers(base_model):
        raise CairnError("the model is already a LoRA mixture; build the mixture on a plain base model")
    loaded = [read_lora_adapter(p) for p in adapters]
    k = len(loaded)
    modules = check_adapters(loaded, check_base_name)
    if top_k is not None and not 1 <= top_k <= k:
        raise CairnError(f"top_k={top_k} but there are {k} adapters; choose 1 <= top_k <= {k} (or None for dense)")
    if normalisation not in NORMALISATIONS:
        raise CairnError(f"unknown router normalisation {normalisation!r}; choose softmax or sigmoid")
    rinit.check_router_prompts(router_init, router_prompts, k)
    for ad in loaded:
        _check_against_model(base_model, ad, modules)

    routers = _init_routers(base_model, modules, k, router_init, router_prompts, tokenizer, seed)
    for p in base_model.parameters():
        p.requires_grad_(False)
    for m in modules:
        A, B, scaling = _stack(loaded, m)
        parent_name, _, child = m.rpartition(".")
        parent = base_model.get_submodule(parent_name)
        layer = RoutedLoRALinear(getattr(parent, child), A, B, scaling, routers[m], top_k, normalisation, dropout)
        setattr(parent, child, layer)
    setattr(
        base_model,
        _INFO_ATTR,
        {
            "kind": "lora_moe",
            "top_k": top_k,
            "normalisation": normalisation,
            "router_init": router_init,
            "modules": list(modules),
            "experts": [_expert_record(ad) for ad in loaded],
        },
    )
    return base_model


# ----------------------------------------------------------------------------- save / load


def _expert_tensors(layers: dict[str, RoutedLoRALinear], e: int, record: dict[str, Any]) -> dict[str, torch.Tensor]:
    dtype = getattr(torch, record["dtype"])
    out = {}
    for name, layer in layers.items():
        r = record["ranks"][name]
        out[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A[e, :r].detach().to("cpu", dtype).contiguous()
        out[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B[e, :, :r].detach().to("cpu", dtype).contiguous()
    return out


def save_lora_moe(model: nn.Module, out: str | Path, overwrite: bool = False) -> Path:
    """Write the mixture: manifest, routers, and each expert as a PEFT adapter dir under experts/<i>/."""
    from safetensors.torch import save_file

    info = getattr(model, _INFO_ATTR, None)
    layers = routed_layers(model)
    if info is None or not layers:
        raise CairnError("save_lora_moe needs a LoRA mixture (from build_lora_moe, load_lora_moe or apply_loramoe)")
    out = Path(out)
    if out.exists() and not overwrite:
        raise CairnError(f"{out} already exists; choose another output directory or pass overwrite=True")
    with atomic.atomic_dir(out, overwrite=overwrite) as tmp:
        experts = []
        for e, record in enumerate(info["experts"]):
            d = tmp / "experts" / str(e)
            d.mkdir(parents=True)
            save_file(_expert_tensors(layers, e, record), str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
            atomic.write_json(d / "adapter_config.json", record["config"])
            experts.append({"dir": f"experts/{e}", "source": record["source"]})
        routers = {f"{n}.router.weight": l.router.weight.detach().cpu().contiguous() for n, l in layers.items()}
        save_file(routers, str(tmp / ROUTERS_FILE), metadata={"format": "pt"})
        manifest = {
            "format": "cairn-lora-moe",
            "version": 1,
            "kind": info.get("kind", "lora_moe"),
            "num_experts": len(experts),
            "top_k": info["top_k"],
            "normalisation": info["normalisation"],
            "router_init": info["router_init"],
            "modules": list(layers),
            "experts": experts,
            "dropout": next(iter(layers.values())).dropout_p,  # the experts' input dropout, for resumed training
        }
        manifest.update({k: v for k, v in info.items() if k.startswith("train_")})
        atomic.write_json(tmp / MANIFEST, manifest)
    return out


def load_lora_moe(path: str | Path, base_model: nn.Module) -> nn.Module:
    """Rebuild a saved mixture on ``base_model`` (modified in place and returned)."""
    from safetensors.torch import load_file

    path = Path(path)
    mfile = path / MANIFEST
    if not mfile.is_file():
        raise CairnError(f"{path} is not a cairn LoRA mixture: {MANIFEST} is missing")
    manifest = json.loads(mfile.read_text(encoding="utf-8"))
    if manifest.get("format") != "cairn-lora-moe":
        raise CairnError(f"{mfile}: unknown format {manifest.get('format')!r}")
    model = build_lora_moe(
        base_model,
        [path / e["dir"] for e in manifest["experts"]],
        top_k=manifest["top_k"],
        normalisation=manifest["normalisation"],
        router_init="zeros",
        check_base_name=False,
        dropout=float(manifest.get("dropout", manifest.get("train_loramoe", {}).get("dropout", 0.0))),
    )
    routers = load_file(str(path / ROUTERS_FILE))
    layers = routed_layers(model)
    if set(routers) != {f"{n}.router.weight" for n in layers}:
        raise CairnError(f"{path / ROUTERS_FILE} does not match the experts' modules; the mixture directory is damaged")
    with torch.no_grad():
        for name, layer in layers.items():
            layer.router.weight.copy_(routers[f"{name}.router.weight"])
    info = getattr(model, _INFO_ATTR)
    info["router_init"] = manifest["router_init"]
    info["kind"] = manifest.get("kind", "lora_moe")
    for record, e in zip(info["experts"], manifest["experts"]):
        record["source"] = e.get("source", record["source"])
    info.update({k: v for k, v in manifest.items() if k.startswith("train_")})
    return model


def mixture_info(model: nn.Module) -> dict[str, Any] | None:
    """The mixture's description (experts, top_k, normalisation, ...), or None for a plain model."""
    info = getattr(model, _INFO_ATTR, None)
    return copy.deepcopy(info) if info is not None else None
