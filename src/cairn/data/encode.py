"""Tokenisation with answer-only loss masks, and padding into batches.

A training example is ``prompt + answer + EOS``; only the answer and EOS tokens carry loss (prompt
tokens get label -100), as in TRACE and the seed paper's training code. Prompt and answer are
tokenised separately and concatenated, so the prompt's tokens are exactly those the model sees at
evaluation time (where the prompt alone is tokenised). Over-long examples lose prompt tokens from
the left first: the answer is what the round teaches.

Chat examples (``prompt_format: chat``, ``format: messages``; see :mod:`cairn.data.chat`) are the
same with the template's text: the prompt is the conversation with the generation prompt (the exact
string evaluation generates from), the answer is the assistant turn the template adds after it, up
to and including the EOS / end-of-turn token (EOS is appended only if the template has none).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cairn.data.chat import chat_parts, is_chat

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    is_world: bool = False


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt string, as generation encodes it (the tokenizer's default special tokens)."""
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def prompt_and_answer_ids(tokenizer, example: dict) -> tuple[list[int], list[int]]:
    """Untruncated (prompt ids, answer ids incl. EOS) of an example, plain or chat."""
    eos = tokenizer.eos_token_id
    if is_chat(example):
        prompt, answer = chat_parts(tokenizer, example)
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if eos is not None and eos in answer_ids:  # stop after the template's end of turn ("\n" after it is noise)
            answer_ids = answer_ids[:answer_ids.index(eos) + 1]
        elif eos is not None:
            answer_ids = answer_ids + [eos]
        return encode_prompt(tokenizer, prompt), answer_ids
    answer_ids = tokenizer(example["answer"], add_special_tokens=False)["input_ids"]
    if eos is not None:
        answer_ids = answer_ids + [eos]
    return encode_prompt(tokenizer, example["prompt"]), answer_ids


def encode_example(tokenizer, example: dict, max_length: int) -> Encoded:
    prompt_ids, answer_ids = prompt_and_answer_ids(tokenizer, example)
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
