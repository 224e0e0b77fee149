"""cairn: add new knowledge to an LLM round after round without losing what it already knew.

Each contribution (a fine-tuning round, a merge, a mixture) is a stone on the cairn. See the README
for the command-line interface and the Python API; the packages below hold one concept each:

- ``cairn.data``     tasks, built-in demo tasks, tokenisation with answer-only loss masks
- ``cairn.train``    the one training loop (Accelerate) and its atomic checkpoints
- ``cairn.methods``  method parts: what is trainable, extra loss terms, round data
- ``cairn.combine``  merging and MoE mixing of already-trained models/adapters
- ``cairn.eval``     task metrics, generation, old-knowledge suite, continual-learning figures
- ``cairn.report``   tables, plots and the HTML report

The public functions below are imported on first use (PEP 562 module ``__getattr__``), so
``import cairn`` does not import torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (module, attribute)
_API: dict[str, tuple[str, str]] = {
    # configs
    "load_config": ("cairn.config", "load_config"),
    "config_from_dict": ("cairn.config", "config_from_dict"),
    "ExperimentConfig": ("cairn.config", "ExperimentConfig"),
    # running and resuming
    "run_experiment": ("cairn.experiment", "run_experiment"),
    "load_method_model": ("cairn.experiment", "load_method_model"),
    "method_fingerprint": ("cairn.fingerprint", "method_fingerprint"),
    # combining
    "merge_models": ("cairn.combine.merge_models", "merge_models"),
    "merge_adapters": ("cairn.combine.merge_lora", "merge_adapters"),
    "build_fft_moe": ("cairn.combine.moe_fft", "build_fft_moe"),
    "build_lora_moe": ("cairn.combine.moe_lora", "build_lora_moe"),
    # evaluation
    "evaluate_suite": ("cairn.eval.suites", "evaluate_suite"),
    "evaluate_tasks": ("cairn.eval.task_eval", "evaluate_tasks"),
    "load_model": ("cairn.models", "load_model"),
    "load_tokenizer": ("cairn.models", "load_tokenizer"),
    # artifacts
    "build_report": ("cairn.report", "build_report"),
    "export_round": ("cairn.commands.export", "export_round"),
    "open_tracking": ("cairn.tracking", "open_tracking"),
    "CairnError": ("cairn.errors", "CairnError"),
}

__all__ = ["__version__", "load_for_eval", *_API]


def load_for_eval(spec: str, dtype: str = "float32", device: str | None = None):
    """(model, tokenizer) ready for scoring, like ``cairn eval MODEL``: a built-in name, a model folder or
    hub id, a PEFT adapter folder (its base loaded under it), or a method's run directory (its last
    finished round rebuilt); on ``device`` (default: cuda when available)."""
    from cairn.commands.eval import load_for_eval as _load

    model, tokenizer, _, _ = _load(spec, dtype, device)
    return model, tokenizer


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attr = _API[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'cairn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from cairn.combine.merge_lora import merge_adapters
    from cairn.combine.merge_models import merge_models
    from cairn.config import ExperimentConfig, config_from_dict, load_config
    from cairn.errors import CairnError
    from cairn.eval.suites import evaluate_suite
    from cairn.experiment import load_method_model, run_experiment
    from cairn.report import build_report
