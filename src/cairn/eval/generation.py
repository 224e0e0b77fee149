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

Built on ``model.generate`` (rather than a hand-written decoding loop) so every architecture's own
cache and mask handling is used; a stopping criterion marks rows done one by one, so a finished row
stops early without stopping the batch.
"""

from __future__ import annotations

from typing import Sequence

import torch

from cairn import dist


class _StopOnStrings:
    """Per-row stopping criterion: done once the decoded new text contains a stop string.

    A row once done stays done (its later tokens are discarded by the cut), so only rows still
    running are decoded, and only their last few tokens: a stop string can only newly appear in
    text that ends with the newest token, and ``window`` tokens cover the longest stop string.
    """

    def __init__(self, tokenizer, stop: Sequence[str], prompt_len: int):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.prompt_len = prompt_len
        self.window = 2 * max((len(s) for s in self.stop), default=0) + 8  # tokens ≥ 1 char, + merges
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        if self.done is None or self.done.shape[0] != input_ids.shape[0]:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        if not self.stop:
            return self.done.to(input_ids.device)
        start = max(self.prompt_len, input_ids.shape[1] - self.window)
        for i in (~self.done).nonzero().flatten().tolist():
            text = self.tokenizer.decode(input_ids[i, start:].tolist(), skip_special_tokens=True)
            self.done[i] = any(s in text for s in self.stop)
        return self.done.to(input_ids.device)


def cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """Text before the first occurrence of any stop string (lm-eval's post-processing)."""
    for s in stop or []:
        if s:
            text = text.split(s)[0]
    return text


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
    from transformers import GenerationConfig, StoppingCriteriaList
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    device = next(model.parameters()).device
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id, temperature=None, top_p=None, top_k=None,
    )
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
            criteria = StoppingCriteriaList([_StopOnStrings(tokenizer, stop or [], width)])
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                                 stopping_criteria=criteria)
            for b, i in enumerate(batch):
                new = out[b, width:].tolist()
                outputs[i] = cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), stop)
            bar.update(len(batch) * world)
    finally:
        bar.close()
        model.train(was_training)
    if world > 1:
        for part in dist.gather_objects([(i, outputs[i]) for batch in mine for i in batch]):
            for i, text in part:
                outputs[i] = text
    return outputs
