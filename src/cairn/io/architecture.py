"""The architecture table: config.json keys that fix a model's tensor layout, and how two configs differ.

One table for merging (:mod:`cairn.combine.merge_models`) and FFT MoE mixing
(:mod:`cairn.combine.moe_fft`): two models whose values differ for a key present in both are
different architectures, whose weights cannot be combined.
"""

from __future__ import annotations

from typing import Any

ARCH_KEYS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
             "hidden_act", "n_embd", "n_layer", "n_head", "d_model")


def architecture_differences(reference: dict[str, Any], other: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, reference value, other value) for every table key both configs set to different values."""
    out = []
    for key in ARCH_KEYS:
        a, b = reference.get(key), other.get(key)
        if a is not None and b is not None and a != b:
            out.append((key, a, b))
    return out
