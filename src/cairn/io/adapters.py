"""Reading saved PEFT LoRA adapters: their config, their A/B factors, and the one scaling rule.

PEFT's own rule (``peft.tuners.lora.LoraLayer.update_layer``), in one place for merging, mixing,
the round diagnostics and evaluation: a module's rank is ``rank_pattern``'s entry for it (else
``r``), its alpha ``alpha_pattern``'s (else ``lora_alpha``), and its scaling ``alpha / r`` — or
``alpha / √r`` with rsLoRA (``use_rslora``, Kalajdzievski 2023, arXiv 2312.03732). A pattern key
matches a module whose name ends in it (``peft.utils.other.get_pattern_key``). Hand-written because
PEFT computes this only while building live layers, not for an adapter file on disk.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from cairn.errors import CairnError

_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


def pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's rule: the value of the first key that matches the end of the module's name, else ``default``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scaling(config: dict, module: str, rank: int | None = None) -> float:
    """The scaling PEFT applies to ``module``'s B·A for an adapter with this ``adapter_config.json``."""
    r = rank if rank is not None else int(pattern_value(config.get("rank_pattern"), module, config.get("r", 8)))
    alpha = float(pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def read_adapter_config(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise CairnError(f"{adapter_dir} is not a PEFT adapter directory: adapter_config.json is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CairnError(f"{path}: invalid JSON ({exc})") from None


def adapter_factors(adapter_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """module -> {"A": (r, d_in), "B": (d_out, r)} in float32, streamed from adapter_model.safetensors."""
    from safetensors import safe_open

    factors: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            m = _PEFT_KEY.match(key)
            if m:
                factors.setdefault(m["module"], {})[m["which"]] = f.get_tensor(key).float()
    return factors
