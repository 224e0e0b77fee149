"""Padding-free training micro-batches: a micro-batch's examples laid end to end in one row.

Why: a padded micro-batch is as wide as its longest example, and every linear layer multiplies the
pad positions too. On SFT data whose lengths vary (TRACE's ScienceQA: 150 to 1,000 tokens) that is
a large share of the work. Packing (TRL's ``padding_free``, transformers' ``DataCollatorWithFlattening``)
removes the pads; what must stay exact is that no example attends to another and that positions
restart at 0 for each example (rotary embeddings read them).

Attention isolation. With flash-attention 2 (GPU), transformers reads the restarting position ids
and runs its variable-length kernel. With sdpa or eager it would instead build a dense block-causal
mask over the whole packed row, i.e. L² attention work for a row of L tokens — eight times the
attention of eight 1k-token examples. So cairn registers its own attention function
(``cairn_packed``, through transformers' ``AttentionInterface``) that runs torch's causal SDPA on
each example's slice of the row: exactly the attention each example gets alone, for the cost of
one kernel call per example per layer. Only this function and the collation are hand-written.

The loss is unchanged: the answer-token targets are the same tokens at the same logits, summed and
divided by the same count (:func:`cairn.train.loop.answer_token_loss`); the matmuls run on a
different shape, so values agree to float rounding (tested against the padded batch). With dropout,
fewer (no pad) positions draw random masks, so the random stream differs from a padded run's.

Packing is used where it is known to be exact: decoder-only models of the families below, with
the answer-only loss path, and loss parts that do not read per-example batch rows (O-LoRA, N-LoRA,
EWC declare ``packable = True``; LoRAMoE's localized balancing reads each example's row, so it trains
padded). Anything else trains padded; :func:`packing_blocker` says why.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from cairn.data.encode import IGNORE_INDEX, Encoded

ATTENTION_NAME = "cairn_packed"
# Families whose attention is plain causal self-attention with rotary/absolute positions read from
# position_ids, and which call the AttentionInterface (tested: llama, qwen2).
FAMILIES = frozenset({"llama", "qwen2", "qwen3", "mistral"})


def pack_sequences(seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    """Token sequences end to end in one row: ``input_ids`` and ``position_ids`` (1, total), the
    positions restarting at 0 for each sequence, and ``cu_seq_lens`` (int32, len(seqs)+1), the
    sequence boundaries."""
    ids, positions, bounds = [], [], [0]
    for seq in seqs:
        ids.extend(seq)
        positions.extend(range(len(seq)))
        bounds.append(bounds[-1] + len(seq))
    return {"input_ids": torch.tensor([ids], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "cu_seq_lens": torch.tensor(bounds, dtype=torch.int32)}


def packed_forward_kwargs(bounds: torch.Tensor) -> dict:
    """What a packed row's forward passes besides its ids and positions: the boundaries, read by
    :func:`packed_attention` (and by transformers' flash-attention 2 varlen path)."""
    longest = int((bounds[1:] - bounds[:-1]).max())
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}


def collate_packed(batch: list[Encoded]) -> dict[str, torch.Tensor]:
    """One row holding every example of ``batch`` end to end, with restarting position ids
    (:func:`pack_sequences`).

    The first label of each example is masked: in the row, the previous example's last position
    would otherwise be trained to predict it (in a padded batch that label is never a target
    either: position t predicts t+1).
    """
    labels = [t for e in batch for t in (IGNORE_INDEX, *e.labels[1:])]
    return {**pack_sequences([e.input_ids for e in batch]),
            "labels": torch.tensor([labels], dtype=torch.long),
            "is_world_knowledge": torch.tensor([e.is_world for e in batch], dtype=torch.bool)}


def _float32_attention_on_cpu(query: torch.Tensor) -> bool:
    """Whether to run a CPU attention kernel in float32 rather than in bf16 (autocast or bf16 inputs).

    torch's CPU flash-attention kernel, forward + backward, took 2.3-2.5x longer in bf16 than in
    float32 at SFT example lengths (60-160 tokens, 9 heads of 64, GQA) on an AVX512-BF16 CPU
    without AMX; it accumulates in float32 either way, so float32 is also the more exact. With AMX
    tiles torch's bf16 kernels use them, so there (untested here) attention stays in bf16. Decided by
    the CPU's features only, so a run and its resume take the same path. Training only (grad
    enabled): generation's padding-free prefill keeps the kernel plain ``generate`` would run.
    """
    if query.device.type != "cpu" or not torch.is_grad_enabled():
        return False
    if not (torch.is_autocast_enabled("cpu") or query.dtype == torch.bfloat16):
        return False
    return not _cpu_has_amx()


def _cpu_has_amx() -> bool:
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private torch API: absent means unknown
    return bool(amx is not None and amx())


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, **kwargs):
    """Causal SDPA on each example's slice of a packed row (query/key/value: (1, heads, L, dim));
    a padded batch (no ``cu_seq_lens_q``) goes to transformers' SDPA as it is. On a CPU either runs
    in float32 where :func:`_float32_attention_on_cpu` says so."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.pop("cu_seq_lens_q", None)
    dtype = value.dtype
    upcast = _float32_attention_on_cpu(query)
    if upcast:
        query, key, value = query.float(), key.float(), value.float()
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
    # CPU autocast would cast the kernel's inputs back to bf16
    with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
        if bounds is None or query.shape[0] != 1:
            out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                                  scaling=scaling, is_causal=is_causal, **kwargs)
            return out.to(dtype), weights
        kwargs.pop("cu_seq_lens_k", None)
        cuts = bounds.tolist()
        outs = []
        for start, end in zip(cuts[:-1], cuts[1:]):
            out, _ = sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end],
                                            value[:, :, start:end], None, dropout=dropout, scaling=scaling,
                                            is_causal=True)
            outs.append(out)  # (1, n, heads, dim)
    return torch.cat(outs, dim=1).to(dtype), None


def float32_attention_round(model, device: torch.device, autocast_bf16: bool) -> bool:
    """Whether a padded bf16-autocast round on a CPU should route attention through
    :func:`packed_attention` anyway, for its float32 kernel (a family whose attention goes through
    transformers' AttentionInterface, on SDPA, on a CPU without AMX)."""
    config = getattr(model, "config", None)
    return (device.type == "cpu" and autocast_bf16 and getattr(config, "model_type", None) in FAMILIES
            and getattr(config, "_attn_implementation", None) in ("sdpa", None) and not _cpu_has_amx())


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, packed_attention)


def packing_blocker(model, loss_parts, *, sharded: bool, stock_path: bool) -> str | None:
    """Why this round cannot train packed (None: it can)."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if sharded:
        return "the model is sharded (FSDP/ZeRO-3)"
    if stock_path:
        return "the model's loss comes from its own forward (logit soft-capping or router aux loss)"
    if family not in FAMILIES:
        return f"model type {family!r} is not among the families packing is tested on ({', '.join(sorted(FAMILIES))})"
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True):
        return f"the model uses sliding-window attention ({window})"
    blocked = [type(p).__name__ for p in loss_parts if not getattr(p, "packable", False)]
    if blocked:
        return f"loss part(s) {', '.join(blocked)} read each example's batch row"
    return None


@contextlib.contextmanager
def packed_attention_enabled(model) -> Iterator[None]:
    """Route the model's attention through :func:`packed_attention` while inside (flash-attention 2
    keeps its own kernel: transformers reads the packed position ids itself)."""
    config = model.config
    current = getattr(config, "_attn_implementation", None)
    if current == "flash_attention_2":
        yield
        return
    _register()
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = current
