"""GSM8K by greedy generation, scored as lm-evaluation-harness's ``gsm8k`` task (v3) scores it.

GSM8K: Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems", arXiv:2110.14168.
lm-evaluation-harness (``lm_eval/tasks/gsm8k/gsm8k.yaml``): the prompt is
``"Question: {question}\\nAnswer:"`` (few-shot examples are ``"Question: ..\\nAnswer: {answer}\\n\\n"``),
generation is greedy until ``"Question:"``, ``"</s>"``, ``"<|im_end|>"`` or EOS (at most 256 new
tokens), and the answer is extracted two ways:

- **strict-match**: the first match of ``#### (\\-?[0-9\\.\\,]+)`` (the GSM8K answer format);
- **flexible-extract**: the last match of ``(-?[$0-9.,]{2,})|(-?[0-9]+)`` (any number).

A missing match gives ``"[invalid]"``. Prediction and reference (the full answer text) are then
compared by exact match after deleting ``,``, ``$``, everything up to ``"#### "`` and one trailing
``.``, ignoring case. Deviation: few-shot examples are the first ``n`` training questions, where
lm-eval samples them at random (zero-shot, the default here, is identical).
"""

from __future__ import annotations

import re
from typing import Sequence

STOP = ["Question:", "</s>", "<|im_end|>"]
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]
INVALID = "[invalid]"


def build_prompt(row: dict, shots: Sequence[dict] = ()) -> str:
    """The lm-eval prompt for one question, after ``shots`` answered examples."""
    fewshot = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    return f"{fewshot}Question: {row['question']}\nAnswer:"


def _extract(pattern: re.Pattern, text: str, group_select: int) -> str:
    """lm-eval's ``RegexFilter``: pick one match; for alternations, its first non-empty group."""
    found = pattern.findall(text)
    if not found:
        return INVALID
    match = found[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), INVALID)
    return match.strip()


def extract_strict(text: str) -> str:
    return _extract(STRICT, text, 0)


def extract_flexible(text: str) -> str:
    return _extract(FLEXIBLE, text, -1)


def normalize(text: str) -> str:
    """Both sides of lm-eval's gsm8k exact match: ignore regexes applied in order, then lower case."""
    for pattern in IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def score(model, tokenizer, prompts: list[str], rows: list[dict], batch_size: int, max_gen_toks: int = 256,
          progress: bool = False) -> tuple[dict[str, list[float]], list[dict]]:
    """Generate for every prompt and score; returns per-question metric values and details."""
    from cairn.eval.generation import generate

    eos = tokenizer.decode([tokenizer.eos_token_id]) if tokenizer.eos_token_id is not None else ""
    stop = STOP + ([eos] if eos and eos not in STOP else [])
    outputs = generate(model, tokenizer, prompts, max_new_tokens=max_gen_toks, batch_size=batch_size, stop=stop,
                       progress=progress, desc="gsm8k")
    strict, flexible, details = [], [], []
    for out, row in zip(outputs, rows):
        s, f = extract_strict(out), extract_flexible(out)
        strict.append(exact_match(s, row["answer"]))
        flexible.append(exact_match(f, row["answer"]))
        details.append({"output": out, "strict": s, "flexible": f})
    return {"exact_match_strict": strict, "exact_match_flexible": flexible}, details
