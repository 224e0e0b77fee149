"""GSM8K by greedy generation, scored as lm-evaluation-harness's ``gsm8k`` task (v3) scores it.

GSM8K: Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems", arXiv:2110.14168.
lm-evaluation-harness (``lm_eval/tasks/gsm8k/gsm8k.yaml``): the prompt is
``"Question: {question}\\nAnswer:"`` (few-shot examples are ``"Question: ..\\nAnswer: {answer}\\n\\n"``),
generation is greedy until ``"Question:"``, ``"</s>"``, ``"<|im_end|>"`` or EOS (at most 256 new
tokens), and the answer is extracted two ways:

- **strict-match**: the first match of ``#### (\\-?[0-9\\.\\,]+)`` (the GSM8K answer format);
- **flexible-extract**: the last match of ``(-?[$0-9.,]{2,})|(-?[0-9]+)`` (any number).

The chain-of-thought variant (``gsm8k-cot.yaml``, Wei et al. 2022) prompts ``"Q: {question}\\nA:"``
after 8 fixed worked exemplars (:data:`COT_EXEMPLARS`, lm-eval's ``first_n`` sampler), stops at
``"Q:"``, and its strict filter is ``The answer is (\\-?[0-9\\.\\,]+).``; flexible is the same.

A missing match gives ``"[invalid]"``. Prediction and reference (the full answer text) are then
compared by exact match after deleting ``,``, ``$``, everything up to ``"#### "`` and one trailing
``.``, ignoring case (lm-eval's ``exact_match`` with ``regexes_to_ignore`` / ``ignore_case`` /
``ignore_punctuation: false``; see :func:`normalize`). The patterns are copied from lm-eval's
``gsm8k.yaml`` / ``gsm8k-cot.yaml`` (version 3.0); a test checks them against an installed lm-eval.
Deviation: plain few-shot examples are the first ``n`` training questions, where lm-eval samples
them at random (zero-shot, the default here, is identical).
"""

from __future__ import annotations

import re
import string
from typing import Sequence

STOP = ["Question:", "</s>", "<|im_end|>"]
COT_STOP = ["Q:", "</s>", "<|im_end|>"]
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
COT_STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+).")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]
IGNORE_CASE = True
IGNORE_PUNCTUATION = False
INVALID = "[invalid]"

# lm-eval gsm8k-cot.yaml's fewshot_config.samples (Wei et al. 2022, "Chain-of-Thought Prompting")
COT_EXEMPLARS: list[tuple[str, str]] = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
     "were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he "
     "had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
]


def build_prompt(row: dict, shots: Sequence[dict] = ()) -> str:
    """The lm-eval prompt for one question, after ``shots`` answered examples."""
    fewshot = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    return f"{fewshot}Question: {row['question']}\nAnswer:"


def build_cot_prompt(row: dict, shots: int = 8) -> str:
    """lm-eval's ``gsm8k_cot`` prompt: ``shots`` of the 8 fixed exemplars, then ``Q: ..\\nA:``."""
    fewshot = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in COT_EXEMPLARS[:shots])
    return f"{fewshot}Q: {row['question']}\nA:"


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


def extract_cot_strict(text: str) -> str:
    return _extract(COT_STRICT, text, 0)


def extract_flexible(text: str) -> str:
    return _extract(FLEXIBLE, text, -1)


def normalize(text: str, regexes_to_ignore: Sequence[str] = IGNORE, ignore_case: bool = IGNORE_CASE,
              ignore_punctuation: bool = IGNORE_PUNCTUATION) -> str:
    """One side of lm-eval's ``exact_match`` (``exact_match_hf_evaluate``): delete each regex in order,
    then lower-case, then (if asked) delete ``string.punctuation``; gsm8k's settings are the defaults."""
    for pattern in regexes_to_ignore:
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    return text


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
