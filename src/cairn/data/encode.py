"""Tokenisation with answer-only loss masks, and padding into batches.

A training example is ``prompt + answer + EOS``; only the answer and EOS tokens carry loss (prompt
tokens get label -100), as in TRACE and the seed paper's training code. Prompt and answer are
tokenised separately and concatenated, so the prompt's tokens are exactly those the model sees at
evaluation time (where the prompt alone is tokenised). Over-long examples lose prompt tokens from
the left first: the answer is what the round teaches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    is_world: bool = False


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def encode_example(tokenizer, example: dict, max_length: int) -> Encoded:
    prompt_ids = encode_prompt(tokenizer, example["prompt"])
    answer_ids = tokenizer(example["answer"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    answer_ids = answer_ids[:max_length]  # an answer longer than the budget keeps its start
    keep_prompt = max(0, max_length - len(answer_ids))
    prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt:] if keep_prompt else []
    return Encoded(
        input_ids=prompt_ids + answer_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + answer_ids,
        is_world=example.get("type") == "world",
    )


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into tensors (pads masked out of attention and loss)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "is_world_knowledge": torch.tensor([e.is_world for e in batch], dtype=torch.bool)}
