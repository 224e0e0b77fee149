"""Continuous batching for greedy decoding: a finished row's slot is refilled with the next prompt.

Iteration-level scheduling as Orca introduced it (Yu et al., OSDI 2022) and vLLM / TGI / transformers'
``generate_batch`` use it, done here on the model's own forward and transformers' ``DynamicCache``
(no paged-attention kernel): the running batch is an ordinary left-padded batch whose rows are at
different decoding steps. When rows finish (EOS, a stop string, the token budget) they leave the
batch; the next pending prompts are prefilled in a batch of their own, and their KV rows, mask and
positions are joined to the running batch (the narrower of the two left-padded with masked zeros).
Columns that became padding in every row are cut from the left. So the number of decode steps
approaches ``sum(answer lengths) / batch_size`` instead of the sum over fixed batches of their
longest answer; on a CPU or a GPU a decode step costs about the same at batch 8 as at batch 2
(weight reads dominate), so the saved steps are saved time.

Every row keeps its own positions (counted from its first real token, as ``generate`` counts them)
and sees only its own tokens (the 2D padding mask), so its greedy tokens are the ones ``generate``
computes for it; the batch it shares only changes the shapes of the matrix products, i.e. float
rounding (see :mod:`cairn.eval.generation` on what is guaranteed).

Tokens every prompt starts with (few-shot examples, a task's instruction) are computed once
(:class:`SharedPrefix`, as vLLM's automatic prefix caching does for a common prefix); each prefill
then runs only over the prompts' own tokens (GSM8K with two examples: 214 of ~277 tokens shared,
SmolLM2's tokenizer).

Prompts of unequal length are prefilled padding-free where training packs exactly (llama, qwen2,
qwen3, mistral; :func:`can_prefill_packed`): laid end to end in one row, each attending only to
itself, and their keys and values then laid out as the left-padded batch (:func:`_packed_prefill`).
A padded prefill computes every pad position, and its padding mask keeps attention off the causal
kernel; with long prompts of spread lengths (TRACE's Py150, MeetingBank, 20Minuten) the prompts'
forward is most of the time.

The cache's layers are :func:`roomy_layer` s: a decode step writes its column into spare room of a
buffer instead of ``DynamicLayer``'s concatenation (a copy of the whole cache every step).

Joining and cutting need plain full-attention cache layers (``DynamicLayer``); a model with
sliding-window or linear-attention layers runs one batch at a time (rows still leave the batch,
none join): :func:`can_join` decides.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections import deque
from typing import Callable

import torch
import torch.nn.functional as F


def new_cache(model, roomy: bool = False):
    """An empty ``DynamicCache`` laid out for ``model`` (its layer types, where the class takes a config);
    with ``roomy``, of :func:`roomy_layer` layers (only for a model :func:`can_join` accepts)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config) if "config" in inspect.signature(DynamicCache).parameters \
        else DynamicCache()
    if roomy:
        cache.layers = [roomy_layer() for _ in cache.layers]
    return cache


def can_join(model) -> bool:
    """Whether every KV-cache layer of ``model`` is a plain ``DynamicLayer`` (rows can be joined and
    columns cut); False for sliding-window/linear-attention layers or a transformers without layers."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return False
    layers = getattr(new_cache(model), "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


# Spare columns a roomy cache layer allocates when it fills up: one copy of the cache per ROOM steps.
ROOM = 64


def roomy_layer():
    """A new ``DynamicLayer`` whose keys and values are views of buffers with ``ROOM`` spare columns.

    ``DynamicLayer.update`` concatenates, i.e. allocates and copies the whole cache at every decode
    step (17% of a GSM8K run's time on a CPU, profiled); here a step writes its column into the
    spare room, and only a full buffer, dropping rows (``batch_select_indices``) or a join (``adopt``)
    copies. Cutting leading columns (``cut``) only moves the view's start. The values the
    attention reads are the same; only where they are stored differs.
    """
    return _roomy_class()()


@functools.cache
def _roomy_class():
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        def adopt(self, keys: torch.Tensor, values: torch.Tensor, need: int = 0) -> None:
            """Hold (a copy of) ``keys``/``values``, with room after them for at least ``need`` columns."""
            shape = (*keys.shape[:2], keys.shape[2] + max(ROOM, need), keys.shape[3])
            self._k, self._v = keys.new_empty(shape), values.new_empty(shape)
            self._k[:, :, :keys.shape[2]], self._v[:, :, :keys.shape[2]] = keys, values
            self._start, self._end = 0, keys.shape[2]
            self.keys, self.values = self._k[:, :, :self._end], self._v[:, :, :self._end]
            self.is_initialized, self.device = True, keys.device

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.adopt(key_states, value_states)
                return self.keys, self.values
            add = key_states.shape[2]
            if self._end + add > self._k.shape[2]:
                self.adopt(self.keys, self.values, add)  # full: a new buffer, the columns in use at its start
            self._k[:, :, self._end:self._end + add], self._v[:, :, self._end:self._end + add] = key_states, value_states
            self._end += add
            self.keys, self.values = self._k[:, :, self._start:self._end], self._v[:, :, self._start:self._end]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[:, :, self._start:self._end], self._v[:, :, self._start:self._end]

        def cut(self, lead: int) -> None:
            """Drop the first ``lead`` columns in use (padding in every row)."""
            self._start += lead
            self.keys, self.values = self._k[:, :, self._start:self._end], self._v[:, :, self._start:self._end]

    return RoomyLayer


class _Batch:
    """The running batch: KV cache, 2D mask (left padding), last positions, next input tokens, and
    which prompt each row holds. Every row's newest token sits in the last column."""

    def __init__(self, cache, mask, pos, rows):
        self.cache, self.mask, self.pos, self.rows = cache, mask, pos, rows
        self.tok = None  # the token each row feeds next (set after a forward's argmax)

    def select(self, keep: list[int], cut: bool) -> None:
        """Keep only rows ``keep``; with ``cut``, drop leading columns that are padding in every row."""
        if len(keep) < len(self.rows):
            idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
            if keep:
                self.cache.batch_select_indices(idx)
            self.mask, self.pos, self.tok = self.mask[idx], self.pos[idx], self.tok[idx]
            self.rows = [self.rows[b] for b in keep]
        if cut and self.rows:
            lead = int(self.mask.any(0).long().argmax())  # the first column some row uses
            if lead > 0:
                for layer in self.cache.layers:
                    layer.cut(lead)
                self.mask = self.mask[:, lead:]

    def join(self, other: "_Batch") -> None:
        """Append ``other``'s rows (a freshly prefilled batch), left-padding the narrower one."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        pad = [(0, 0, width - part.mask.shape[1], 0) for part in (self, other)]  # masked zeros: softmax weight 0
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.adopt(torch.cat([F.pad(mine.keys, pad[0]), F.pad(theirs.keys, pad[1])]),
                       torch.cat([F.pad(mine.values, pad[0]), F.pad(theirs.values, pad[1])]))
        self.mask = torch.cat([F.pad(self.mask, pad[0][2:]), F.pad(other.mask, pad[1][2:])])
        self.pos, self.tok = torch.cat([self.pos, other.pos]), torch.cat([self.tok, other.tok])
        self.rows = self.rows + other.rows


class SharedPrefix:
    """The KV cache of the tokens every prompt starts with (few-shot examples, a task's instruction),
    computed once; each prefill then computes only the prompts' own tokens after it.

    A prefilled row is laid out ``[prefix | padding | own tokens]``: the padding hole is masked and
    positions continue from the prefix's length, so the row attends to exactly the tokens ``generate``
    gives it, at the same positions. Taken over ALL prompts of a call (never a process's share), so
    every process computes the same prefix and the same rows.
    """

    def __init__(self, model, tokens: list[int], fwd):
        cache_kw, keep_kw = fwd
        self.length = len(tokens)
        cache = new_cache(model)
        device = next(model.parameters()).device
        ids = torch.tensor([tokens], device=device)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(len(tokens),
              device=device)[None], use_cache=True, **{cache_kw: cache}, **keep_kw)
        self.kv = [(layer.keys, layer.values) for layer in cache.layers]

    @staticmethod
    def of(prompts: list[list[int]], least: int) -> list[int]:
        """The tokens every prompt starts with, leaving each prompt at least one token of its own;
        [] when fewer than ``least`` (not worth a separate forward) or fewer than two prompts."""
        if len(prompts) < 2:
            return []
        shared = os.path.commonprefix(prompts)[:min(len(p) for p in prompts) - 1]
        return shared if len(shared) >= least else []

    def cache_for(self, model, rows: int):
        """A new cache holding the prefix in each of ``rows`` rows."""
        cache = new_cache(model, roomy=True)
        for i, (k, v) in enumerate(self.kv):
            cache.update(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1), i)
        return cache


def can_prefill_packed(model) -> bool:
    """Whether prompts can be prefilled padding-free (:func:`_packed_prefill`): the model families
    whose padding-free training is exact (:func:`cairn.train.packing.packing_blocker`), with a cache
    :func:`can_join` accepts, and not flash-attention 2 (whose packed path is untested here)."""
    from cairn.train.packing import packing_blocker
    from cairn.train.setup import hf_model

    hf = hf_model(model)
    return (can_join(model) and getattr(hf.config, "_attn_implementation", None) in ("sdpa", "eager", None)
            and packing_blocker(hf, [], sharded=False, stock_path=False) is None)


def _packed_prefill(model, own: list[list[int]], device, fwd, roomy: bool):
    """The prompts' forward padding-free: laid end to end in one row, each attending only to itself
    (:func:`cairn.train.packing.packed_attention`), positions restarting at 0. Then each prompt's
    keys and values are laid out as the left-padded batch :func:`_prefill` makes (masked zeros where
    it has pad columns). Returns the batch's cache and each prompt's last logits.

    Why: a batch of prompts of unequal length is padded to its longest, and with a padding mask
    attention cannot use the causal kernel; with TRACE's prompts (Py150: 19 to 1,024 tokens) the
    prompts' forward is most of a run. The values are the same up to the float rounding of a
    differently shaped product.
    """
    from cairn.train.packing import pack_sequences, packed_attention_enabled, packed_forward_kwargs
    from cairn.train.setup import hf_model

    cache_kw, _ = fwd
    row = {k: v.to(device) for k, v in pack_sequences(own).items()}
    cu, width = row["cu_seq_lens"], max(map(len, own))
    packed = new_cache(model)
    with packed_attention_enabled(hf_model(model)):
        logits = model(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=True,
                       **{cache_kw: packed}, **packed_forward_kwargs(cu), logits_to_keep=cu[1:].long() - 1).logits[0]
    cache = new_cache(model, roomy)
    bounds = cu.tolist()
    for i, layer in enumerate(packed.layers):
        keys, values = (t.new_zeros(len(own), t.shape[1], width, t.shape[3]) for t in (layer.keys, layer.values))
        for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            keys[b, :, width - (end - start):] = layer.keys[0, :, start:end]
            values[b, :, width - (end - start):] = layer.values[0, :, start:end]
        cache.update(keys, values, i)
    return cache, logits


def _prefill(model, ids_of: Callable[[int], list[int]], rows: list[int], pad_id: int, device, fwd,
             prefix: SharedPrefix | None = None, roomy: bool = False, packed: bool = False):
    """One forward over the prompts ``rows`` (left-padded together, after the shared prefix if any;
    with ``packed`` and no prefix, padding-free: :func:`_packed_prefill`): their batch and last logits."""
    cache_kw, keep_kw = fwd
    skip = prefix.length if prefix else 0
    own = [ids_of(i)[skip:] for i in rows]
    width = max(len(t) for t in own)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, t in enumerate(own):  # left padding: every prompt ends at the last column
        ids[b, width - len(t):] = torch.tensor(t)
        mask[b, width - len(t):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (skip + mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate computes them
    if packed and not prefix and len(rows) > 1 and min(map(len, own)) < width:
        cache, logits = _packed_prefill(model, own, device, fwd, roomy)
        return _Batch(cache, mask, pos[:, -1:], list(rows)), logits
    cache = prefix.cache_for(model, len(rows)) if prefix else new_cache(model, roomy)
    full_mask = torch.cat([mask.new_ones((len(rows), skip)), mask], dim=1) if skip else mask
    logits = model(input_ids=ids, attention_mask=full_mask, position_ids=pos, use_cache=True,
                   **{cache_kw: cache}, **keep_kw).logits[:, -1]
    return _Batch(cache, full_mask, pos[:, -1:], list(rows)), logits


@torch.no_grad()
def greedy_stream(model, ids_of: Callable[[int], list[int]], stream: list[int], batch_size: int,
                  finished: Callable[[list[int]], bool], pad_id: int, fwd, joinable: bool,
                  on_done: Callable[[], None] | None = None,
                  prefix: SharedPrefix | None = None) -> dict[int, list[int]]:
    """Greedy continuations (token ids, EOS included) of the prompts ``stream``, in that order of admission.

    At most ``batch_size`` rows run at once. ``finished(tokens)`` says when a row is done. With
    ``joinable`` (see :func:`can_join`) freed slots are refilled at once (continuous batching);
    without it the next prompts are admitted only when the whole batch is done (one batch at a time).
    ``prefix``: the shared prefix of every prompt, already computed (with ``joinable`` only).
    """
    device = next(model.parameters()).device
    cache_kw, keep_kw = fwd
    packed = joinable and can_prefill_packed(model)
    new: dict[int, list[int]] = {i: [] for i in stream}
    pending = deque(stream)
    run: _Batch | None = None

    def choose(batch: _Batch, logits) -> list[int]:
        """Append each row's argmax; the rows still running."""
        batch.tok = logits.argmax(-1)
        keep = []
        for b, t in enumerate(batch.tok.tolist()):
            row = new[batch.rows[b]]
            row.append(t)  # EOS included, as generate returns it; decoding skips it
            if finished(row):
                if on_done:
                    on_done()
            else:
                keep.append(b)
        return keep

    while True:
        while pending and (run is None or len(run.rows) < (batch_size if joinable else 1)):
            free = batch_size - (len(run.rows) if run else 0)
            fresh, logits = _prefill(model, ids_of, [pending.popleft() for _ in range(min(free, len(pending)))],
                                     pad_id, device, fwd, prefix, roomy=joinable, packed=packed)
            fresh.select(choose(fresh, logits), cut=False)
            if fresh.rows:
                if run is None or not run.rows:
                    run = fresh
                else:
                    run.join(fresh)
        if run is None or not run.rows:
            return new
        run.mask = torch.cat([run.mask, run.mask.new_ones((run.mask.shape[0], 1))], dim=1)
        run.pos = run.pos + 1
        logits = model(input_ids=run.tok[:, None], attention_mask=run.mask, position_ids=run.pos, use_cache=True,
                       **{cache_kw: run.cache}, **keep_kw).logits[:, -1]
        run.select(choose(run, logits), cut=joinable)
