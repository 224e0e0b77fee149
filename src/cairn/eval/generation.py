"""Batched greedy generation with stop strings, for generation-scored tasks (GSM8K, TRACE tasks).

Greedy decoding as lm-evaluation-harness's ``generate_until`` does it with the Hugging Face backend
(Gao et al., Zenodo 10256836): prompts encoded with the tokenizer's default special tokens, left
padding, the model's KV cache, generation stopped at EOS or when any stop string appears, the
output decoded without special tokens and cut at the first stop string. Prompts are sorted by
length (longest first) so a batch wastes little padding; outputs come back in the input order.

Under ``torchrun``/``accelerate launch`` (a process group of several processes) the batches are
dealt out round-robin to the processes and the outputs gathered, so every process returns the
full list. Whole batches are dealt (never single prompts), so each batch is padded and computed
exactly as in one process and the outputs are identical; call it on EVERY process.

The decoding loop is hand-written (``model.generate`` has no way to do this): a row that has met
EOS or a stop string LEAVES the batch — its input, mask, positions and KV-cache rows are dropped
with the cache's own ``batch_select_indices`` — so the remaining steps compute only the rows still
running. With ``generate`` a finished row keeps being computed until the longest row ends, which
on long-answer tasks (answers of very different lengths) is most of the work. The model's own
forward, cache class (transformers' ``DynamicCache``) and mask handling are used unchanged;
encoder-decoder models fall back to ``model.generate``.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

from cairn import dist


class _StopOnStrings:
    """Per-row stop-string check on the newest tokens of a row.

    A stop string can only newly appear in text that ends with the newest token, and ``window``
    tokens cover the longest stop string, so only that tail is decoded (a few microseconds).
    """

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.window = 2 * max((len(s) for s in self.stop), default=0) + 8  # tokens ≥ 1 char, + merges

    def hit(self, tokens: list[int]) -> bool:
        if not self.stop:
            return False
        text = self.tokenizer.decode(tokens[-self.window:], skip_special_tokens=True)
        return any(s in text for s in self.stop)


def cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """Text before the first occurrence of any stop string (lm-eval's post-processing)."""
    for s in stop or []:
        if s:
            text = text.split(s)[0]
    return text


def _eos_ids(model, tokenizer) -> set[int]:
    """EOS ids as ``generate`` uses them: the tokenizer's EOS plus the model's generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if extra is not None:
        ids |= set(extra if isinstance(extra, (list, tuple)) else [extra])
    return ids


def _forward_kwargs(model) -> tuple[str, dict]:
    """The forward's name for the KV cache (``cache`` in newer transformers, ``past_key_values`` before)
    and ``logits_to_keep=1`` where supported (the prompt's full-vocabulary logits are never needed)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), (
        {"logits_to_keep": 1} if "logits_to_keep" in params else {})


@torch.no_grad()
def _greedy(model, ids, mask, max_new_tokens, eos, stopper, fwd) -> list[list[int]]:
    """Greedy continuations of one left-padded batch; finished rows leave the batch."""
    from transformers import DynamicCache

    n = ids.shape[0]
    new: list[list[int]] = [[] for _ in range(n)]
    alive = list(range(n))  # batch row -> original row
    cache = DynamicCache(config=model.config) if "config" in inspect.signature(DynamicCache).parameters \
        else DynamicCache()
    cache_kw, keep_kw = fwd
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate computes them
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                   **{cache_kw: cache}, **keep_kw).logits[:, -1]
    pos = pos[:, -1:]
    for _ in range(max_new_tokens):
        tok = logits.argmax(-1)
        keep = []
        for b, t in enumerate(tok.tolist()):
            row = new[alive[b]]
            row.append(t)  # EOS included, as generate returns it; decoding skips it
            if t in eos or stopper.hit(row) or len(row) >= max_new_tokens:
                continue
            keep.append(b)
        if not keep:
            break
        if len(keep) < len(alive):
            idx = torch.tensor(keep, device=ids.device)
            cache.batch_select_indices(idx)
            tok, mask, pos = tok[idx], mask[idx], pos[idx]
            alive = [alive[b] for b in keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        pos = pos + 1
        logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                       **{cache_kw: cache}, **keep_kw).logits[:, -1]
    return new


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    stop: list[str] | None = None,
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """Greedy continuations of ``prompts`` (without the prompt), cut at the first stop string."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    device = next(model.parameters()).device
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos, stopper = _eos_ids(model, tokenizer), _StopOnStrings(tokenizer, stop or [])
    fwd = _forward_kwargs(model)
    outputs: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    world, rank = dist.world_size(), dist.rank()
    if world > 1 and torch.distributed.is_initialized():
        mine = batches[rank::world]  # whole batches, so each is computed exactly as in one process
    else:
        world, mine = 1, batches
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress or not dist.is_main(), leave=False)
    try:
        for batch in mine:
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, i in enumerate(batch):  # left padding: every prompt ends at the last column
                ids[b, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[b, width - len(encoded[i]):] = 1
            if getattr(model.config, "is_encoder_decoder", False):
                news = _generate_fallback(model, ids.to(device), mask.to(device), max_new_tokens, pad_id, tokenizer)
            else:
                news = _greedy(model, ids.to(device), mask.to(device), max_new_tokens, eos, stopper, fwd)
            for b, i in enumerate(batch):
                outputs[i] = cut_at_stop(tokenizer.decode(news[b], skip_special_tokens=True), stop)
            bar.update(len(batch) * world)
    finally:
        bar.close()
        model.train(was_training)
    if world > 1:
        for part in dist.gather_objects([(i, outputs[i]) for batch in mine for i in batch]):
            for i, text in part:
                outputs[i] = text
    return outputs


def _generate_fallback(model, ids, mask, max_new_tokens, pad_id, tokenizer) -> list[list[int]]:
    """``model.generate`` for architectures the hand-written loop does not cover (encoder-decoder)."""
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         num_beams=1, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
    return out.tolist()
