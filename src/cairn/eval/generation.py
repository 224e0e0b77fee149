"""Batched greedy generation with stop strings, for generation-scored tasks (GSM8K, TRACE tasks).

Greedy decoding as lm-evaluation-harness's ``generate_until`` does it with the Hugging Face backend
(Gao et al., Zenodo 10256836): prompts encoded with the tokenizer's default special tokens, left
padding, the model's KV cache, generation stopped at EOS or when any stop string appears, the
output decoded without special tokens and cut at the first stop string. Prompts are sorted by
length (longest first) so a batch wastes little padding; outputs come back in the input order.

The decoding loop is hand-written (``model.generate`` has no way to do this) and batches
continuously (:mod:`cairn.eval.continuous`): a row that has met EOS, a stop string (checked on the
fly, per row) or its token budget leaves the batch, and its slot is refilled with the next pending
prompt, so the number of decode steps approaches ``sum(answer lengths) / batch_size`` instead of
the sum over fixed batches of their longest answer. Tokens every prompt starts with (few-shot
examples, a task's instruction; at least ``SHARED_PREFIX_MIN``) are computed once, and each
prefill computes only the prompt's own tokens. The model's own forward and cache class
(transformers' ``DynamicCache``) are used; models whose cache has sliding-window or linear-attention
layers run one batch at a time (rows leave, none join); encoder-decoder models fall back to
``model.generate``.

Streams and processes. The sorted prompts are cut into streams of ``stream_size`` prompts (a whole
number of batches; a function of the batch size only), and each stream is decoded on its own.
Sorting is the length-bucket policy: a stream is a band of similar prompt lengths, admitted longest
first, so a joining prompt is never wider than the running batch and pads little against it. Under ``torchrun``/``accelerate launch`` (a process group of several
processes) the streams are dealt out round-robin to the processes and the outputs gathered, so
every process returns the full list; call it on EVERY process. A stream is computed exactly as in
one process (same rows joining at the same steps, same shapes), so the outputs are identical to
one process's, bit for bit.

What equals ``model.generate``. Each row keeps its own positions and sees only its own tokens, so
its greedy tokens are mathematically those ``generate`` computes; the batch a row shares (and the
shared prefix computed apart) only changes the shapes of the matrix products, i.e. float rounding,
which can change an output only where two tokens' logits tie to the last bits. On the tiny test
models the outputs are identical; the benchmark (``benchmarks/generation.py``) counts the outputs
that differ from a plain batched ``generate`` on the built-in model (0 in every run so far).
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

from cairn import dist
from cairn.cpu_allocator import keep_freed_memory
from cairn.eval.continuous import SharedPrefix, can_join, greedy_stream

# Prompts per stream, in batches. Continuous batching gains within a stream (at its end the last rows
# drain a shrinking batch), processes share the work stream by stream: 8 batches keep the step count
# within ~10% of one stream for all prompts (simulated answer-length mixes) and still give every
# process a stream once there are 8 x batch_size prompts per process.
STREAM_BATCHES = 8
# Shortest prefix shared by every prompt that is computed once (shorter: not worth a forward of its own).
SHARED_PREFIX_MIN = 16


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
def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    stop: list[str] | None = None,
    progress: bool = False,
    desc: str = "generate",
    max_prompt_tokens: int | None = None,
    continuous: bool = True,
) -> list[str]:
    """Greedy continuations of ``prompts`` (without the prompt), cut at the first stop string.

    ``max_prompt_tokens`` keeps only the last that many tokens of a longer prompt (left truncation,
    as TRACE's evaluation does with ``max_prompt_len``: the question at the end is kept).
    ``continuous=False`` runs one batch at a time (finished rows leave, none join): the loop before
    continuous batching, for comparison; the outputs are the same up to float rounding.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ValueError("max_prompt_tokens must be >= 1")
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    if max_prompt_tokens is not None:
        encoded = [ids[-max_prompt_tokens:] for ids in encoded]
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos, stopper = _eos_ids(model, tokenizer), _StopOnStrings(tokenizer, stop or [])
    finished = lambda row: row[-1] in eos or stopper.hit(row) or len(row) >= max_new_tokens  # noqa: E731
    fwd = _forward_kwargs(model)
    if next(model.parameters()).device.type == "cpu":
        keep_freed_memory()  # the growing caches' re-allocations stop page-faulting (~5% on Py150)
    outputs: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    size = stream_size(batch_size)
    streams = [order[s:s + size] for s in range(0, len(order), size)]
    world, rank = dist.world_size(), dist.rank()
    if world > 1 and torch.distributed.is_initialized():
        mine = streams[rank::world]  # whole streams, so each is computed exactly as in one process
    else:
        world, mine = 1, streams
    seq2seq = getattr(model.config, "is_encoder_decoder", False)
    joinable = continuous and not seq2seq and can_join(model)
    shared = SharedPrefix.of(encoded, least=SHARED_PREFIX_MIN) if joinable else []
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress or not dist.is_main(), leave=False)
    try:
        prefix = SharedPrefix(model, shared, fwd) if shared and mine else None
        for stream in mine:
            if seq2seq:
                news = {}
                for s in range(0, len(stream), batch_size):
                    batch = stream[s:s + batch_size]
                    news.update(zip(batch, _generate_fallback(model, encoded, batch, max_new_tokens, pad_id,
                                                              tokenizer)))
                    bar.update(len(batch) * world)
            else:
                news = greedy_stream(model, encoded.__getitem__, stream, batch_size, finished, pad_id, fwd, joinable,
                                     on_done=lambda: bar.update(world), prefix=prefix)
            for i, tokens in news.items():
                outputs[i] = cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stop)
    finally:
        bar.close()
        model.train(was_training)
    if world > 1:
        for part in dist.gather_objects([(i, outputs[i]) for stream in mine for i in stream]):
            for i, text in part:
                outputs[i] = text
    return outputs


def stream_size(batch_size: int) -> int:
    """Prompts per stream: a whole number of batches, never a function of the number of processes,
    so the streams and their outputs are the same in any world."""
    return batch_size * STREAM_BATCHES


def _generate_fallback(model, encoded, batch, max_new_tokens, pad_id, tokenizer) -> list[list[int]]:
    """``model.generate`` for architectures the hand-written loop does not cover (encoder-decoder)."""
    device = next(model.parameters()).device
    width = max(len(encoded[i]) for i in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for b, i in enumerate(batch):
        ids[b, width - len(encoded[i]):] = torch.tensor(encoded[i])
        mask[b, width - len(encoded[i]):] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                         do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
    return out.tolist()
