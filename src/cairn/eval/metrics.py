"""Task metrics: score generated answers against references, the way TRACE scores its tasks.

TRACE (Wang et al. 2023, arXiv:2310.06762) scores each of its eight tasks with one metric; its
evaluation code (``evaluations/eval_<Task>.py`` and ``metrics.py`` of the TRACE repository) is the
reference for every choice below. Each metric is a pure function

    metric(predictions, references, prompts=None) -> float in [0, 1]

that returns the mean of a per-example score. ``prompts`` is only used by ``sari`` (the source
sentence). ``METRICS`` maps the short names used in configs and ``results.json`` to the functions.

Where we deviate from TRACE's code, and why:

- ``accuracy`` (C-STANCE, FOMC, ScienceQA): TRACE compares the *first character* of the generated
  text with the label (ScienceQA answers are ``"B\\n<explanation>"``, so TRACE takes the first
  character of both). We do the same after stripping leading whitespace from both sides, because
  tokenizers often emit a leading space after ``"Answer:"``; TRACE would score ``" B"`` wrong.
  (TRACE's FOMC script defines the first-character ``resolve`` but forgets to call it, comparing
  whole strings; we apply it as clearly intended.)
- ``numeric_accuracy`` (NumGLUE-cm/-ds): TRACE tests raw string equality. We strip whitespace and,
  when both sides parse as numbers, compare by value, so ``"6.0"`` matches ``"6"``; answers that are
  not numbers (NumGLUE-cm has ``"Friday"``) still need an exact (stripped) string match. This never
  marks wrong an answer TRACE counts right.
- ``rouge_l`` (MeetingBank): TRACE uses the ``rouge`` package; we use Google's ``rouge_score``
  (ROUGE-L F-measure, no stemming). Its default tokenizer drops every non-ASCII letter, so we pass
  a tokenizer that does the same thing Unicode-aware (lower-case, split on anything that is not a
  letter or digit); on ASCII text it yields exactly the default tokens.
- ``edit_similarity`` (Py150): TRACE's ``fuzzywuzzy`` ``fuzz.ratio`` / 100 after replacing the
  Py150 literal placeholders (``<NUM_LIT>`` -> ``0``, ``<STR_LIT>``/``<CHAR_LIT>`` -> empty,
  ``<STR_LIT:x>`` -> ``x``). We use ``rapidfuzz.fuzz.ratio`` (the same normalised Indel similarity
  as python-Levenshtein's ratio) without fuzzywuzzy's rounding to an integer.
- ``sari`` (20Minuten): TRACE calls the Hugging Face ``sari`` metric, i.e. the tensor2tensor
  variant of SARI (Xu et al. 2016, TACL 4) with EASSE normalisation; we re-implement exactly that
  variant (see :func:`sari_sentence`) and divide by 100.
- Empty predictions score 0 everywhere, as in TRACE (which skips them but divides by the total).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Callable

from cairn.errors import CairnError

Metric = Callable[..., float]


def _check(predictions: list[str], references: list[str], name: str) -> None:
    if len(predictions) != len(references):
        raise CairnError(
            f"metric {name!r}: got {len(predictions)} predictions but {len(references)} references; "
            "pass one prediction per reference, in the same order."
        )
    if not predictions:
        raise CairnError(f"metric {name!r}: no examples to score; the evaluation set is empty.")


def _mean(scores: list[float]) -> float:
    return sum(scores) / len(scores)


# ---------------------------------------------------------------- label / string matches


def _first_char(text: str) -> str:
    text = text.lstrip()
    return text[0] if text else ""


def accuracy(predictions: list[str], references: list[str], prompts: list[str] | None = None) -> float:
    """Label accuracy: the first non-space character of the prediction equals the reference's.

    This is how TRACE scores C-STANCE, FOMC and ScienceQA, whose labels are single letters
    (``A``/``B``/``C``...); case-sensitive like TRACE.
    """
    _check(predictions, references, "accuracy")
    scores = []
    for pred, ref in zip(predictions, references):
        p, r = _first_char(pred), _first_char(ref)
        scores.append(1.0 if p and p == r else 0.0)
    return _mean(scores)


def normalize_text(text: str) -> str:
    """Strip, collapse runs of whitespace to one space, and case-fold."""
    return " ".join(text.split()).casefold()


def exact_match(predictions: list[str], references: list[str], prompts: list[str] | None = None) -> float:
    """Exact match after :func:`normalize_text` on both sides (strip, collapse whitespace, casefold)."""
    _check(predictions, references, "exact_match")
    scores = []
    for pred, ref in zip(predictions, references):
        p = normalize_text(pred)
        scores.append(1.0 if p and p == normalize_text(ref) else 0.0)
    return _mean(scores)


# ---------------------------------------------------------------- numbers

# a leading minus counts only when it does not follow a digit or letter ("16-3" is 16 and 3)
_NUMBER_RE = re.compile(r"(?:(?<![\w.])-)?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def parse_number(text: str) -> float | None:
    """``text`` as a number if it is one (commas, a leading ``$`` and a trailing ``.`` allowed)."""
    t = text.strip().replace(",", "").replace("$", "").rstrip(".").strip()
    try:
        value = float(t)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _same_number(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def numeric_accuracy(predictions: list[str], references: list[str], prompts: list[str] | None = None) -> float:
    """NumGLUE scoring: the stripped prediction equals the reference, numerically when both are numbers."""
    _check(predictions, references, "numeric_accuracy")
    scores = []
    for pred, ref in zip(predictions, references):
        p, r = pred.strip(), ref.strip()
        pn, rn = parse_number(p), parse_number(r)
        if pn is not None and rn is not None:
            ok = _same_number(pn, rn)
        else:
            ok = bool(p) and p == r
        scores.append(1.0 if ok else 0.0)
    return _mean(scores)


def extract_final_number(text: str) -> float | None:
    """The final answer of a GSM8K-style solution.

    The first number after the last ``####`` if there is one (the GSM8K answer format), else the
    last number in the text. Commas, ``$`` and a trailing ``.`` are ignored.
    """
    if "####" in text:
        found = _NUMBER_RE.findall(text.rsplit("####", 1)[1].replace("$", ""))
        candidate = found[0] if found else None
    else:
        found = _NUMBER_RE.findall(text.replace("$", ""))
        candidate = found[-1] if found else None
    return None if candidate is None else parse_number(candidate)


def gsm8k(predictions: list[str], references: list[str], prompts: list[str] | None = None) -> float:
    """Fraction of predictions whose final number equals the reference's final number."""
    _check(predictions, references, "gsm8k")
    scores = []
    for pred, ref in zip(predictions, references):
        p, r = extract_final_number(pred), extract_final_number(ref)
        if r is None:
            raise CairnError(
                f"metric 'gsm8k': reference {ref[:80]!r} contains no number; GSM8K references end "
                "with '#### <number>'. Check that the task's answer field is the solution text."
            )
        scores.append(1.0 if p is not None and _same_number(p, r) else 0.0)
    return _mean(scores)


# ---------------------------------------------------------------- ROUGE-L

_NON_WORD_RE = re.compile(r"[\W_]+")


class _UnicodeTokenizer:
    """rouge_score's default tokenization (lower-case, alphanumeric runs) extended beyond ASCII."""

    def tokenize(self, text: str) -> list[str]:
        return [t for t in _NON_WORD_RE.split(text.lower()) if t]


_ROUGE_SCORER = None


def rouge_l(predictions: list[str], references: list[str], prompts: list[str] | None = None) -> float:
    """Mean ROUGE-L F-measure (``rouge_score``, no stemming) of each prediction against its reference."""
    global _ROUGE_SCORER
    _check(predictions, references, "rouge_l")
    if _ROUGE_SCORER is None:
        from rouge_score import rouge_scorer

        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_UnicodeTokenizer())
    scores = []
    for pred, ref in zip(predictions, references):
        if not pred.strip() or not ref.strip():
            scores.append(0.0)
            continue
        scores.append(_ROUGE_SCORER.score(ref, pred)["rougeL"].fmeasure)
    return _mean(scores)


# ---------------------------------------------------------------- edit similarity (Py150)

_LITERAL_RE = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def postprocess_code(code: str) -> str:
    """Undo Py150's literal placeholders the way TRACE does before comparing code."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    return _LITERAL_RE.sub(lambda m: m.group(2), code)


def edit_similarity(predictions: list[str], references: list[str], prompts: list[str] | None = None) -> float:
    """Mean ``rapidfuzz.fuzz.ratio / 100`` between post-processed prediction and reference code."""
    from rapidfuzz import fuzz

    _check(predictions, references, "edit_similarity")
    scores = []
    for pred, ref in zip(predictions, references):
        if pred == "" or ref == "":  # TRACE skips these but still divides by the total: score 0
            scores.append(0.0)
            continue
        scores.append(fuzz.ratio(postprocess_code(pred), postprocess_code(ref)) / 100.0)
    return _mean(scores)


# ---------------------------------------------------------------- SARI (20Minuten)

_13A_RULES = [
    # punctuation and symbols become separate tokens (mteval-v13a, as in sacrebleu's "13a")
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    # period and comma split off unless preceded by a digit
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    # ... or unless followed by a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    # a dash after a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]


def tokenize_13a(line: str) -> str:
    """sacrebleu's ``13a`` tokenizer (what EASSE / HF ``sari`` normalise with), as a plain function."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _13A_RULES:
        line = pattern.sub(repl, line)
    return " ".join(line.split())


def _ngrams(tokens: list[str], n: int) -> list[str]:
    return [" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p > 0 or r > 0 else 0.0


def _sari_ngram(s: list[str], c: list[str], refs: list[list[str]]) -> tuple[float, float, float]:
    """(keep F1, deletion precision, addition F1) for one n-gram order; 0/0 counts as 1."""
    numref = len(refs)
    r_count = Counter(g for ref in refs for g in ref)
    # source and candidate counts are replicated once per reference, so that an n-gram kept by
    # only some references is rewarded fractionally
    s_rep = Counter({g: k * numref for g, k in Counter(s).items()})
    c_rep = Counter({g: k * numref for g, k in Counter(c).items()})

    keep = s_rep & c_rep
    keep_good = keep & r_count
    keep_all = s_rep & r_count
    keep_p = sum(keep_good[g] / keep[g] for g in keep_good) / len(keep) if keep else 1.0
    # tensor2tensor's fix of the original keep recall (cocoxu/simplification issue 6)
    keep_r = sum(keep_good.values()) / sum(keep_all.values()) if keep_all else 1.0

    delete = s_rep - c_rep
    delete_good = delete - r_count
    del_p = sum(delete_good[g] / delete[g] for g in delete_good) / len(delete) if delete else 1.0

    add = set(c) - set(s)
    add_good = add & set(r_count)
    add_all = set(r_count) - set(s)
    add_p = len(add_good) / len(add) if add else 1.0
    add_r = len(add_good) / len(add_all) if add_all else 1.0
    return _f1(keep_p, keep_r), del_p, _f1(add_p, add_r)


def sari_sentence(source: str, prediction: str, references: list[str]) -> float:
    """SARI of one sentence in [0, 1]: the variant TRACE uses (HF ``sari`` / tensor2tensor).

    Xu et al. 2016 (TACL 4, "Optimizing Statistical Machine Translation for Text Simplification"):
    SARI = (F1_keep + P_del + F1_add) / 3, each averaged over n-gram orders 1..4. Variant details,
    all as in the Hugging Face metric TRACE calls: texts are lower-cased and ``13a``-tokenised
    (EASSE normalisation); an empty ratio 0/0 counts as 1 (so n-gram orders longer than a short
    sentence score 1); keep recall is the tensor2tensor fix (good kept count / reference-supported
    source count); deletion uses precision only.
    """
    s_tok = tokenize_13a(source.lower()).split(" ")
    c_tok = tokenize_13a(prediction.lower()).split(" ")
    r_toks = [tokenize_13a(r.lower()).split(" ") for r in references]
    keep = dele = add = 0.0
    for n in (1, 2, 3, 4):
        k, d, a = _sari_ngram(_ngrams(s_tok, n), _ngrams(c_tok, n), [_ngrams(r, n) for r in r_toks])
        keep, dele, add = keep + k, dele + d, add + a
    return (keep / 4 + dele / 4 + add / 4) / 3


def sari(predictions: list[str], references: list[str], prompts: list[str] | None = None) -> float:
    """Mean sentence SARI; ``prompts`` are the source sentences (required)."""
    _check(predictions, references, "sari")
    if prompts is None or len(prompts) != len(predictions):
        got = "none" if prompts is None else str(len(prompts))
        raise CairnError(
            f"metric 'sari' needs the source text of every example as prompts (got {got} for "
            f"{len(predictions)} predictions); pass prompts=[...] in the same order."
        )
    return _mean([sari_sentence(s, p, [r]) for s, p, r in zip(prompts, predictions, references)])


# ---------------------------------------------------------------- registry

METRICS: dict[str, Metric] = {
    "accuracy": accuracy,
    "numeric_accuracy": numeric_accuracy,
    "exact_match": exact_match,
    "rouge_l": rouge_l,
    "edit_similarity": edit_similarity,
    "sari": sari,
    "gsm8k": gsm8k,
}


def get_metric(name: str) -> Metric:
    """The metric registered as ``name``; a :class:`CairnError` listing the known names otherwise."""
    try:
        return METRICS[name]
    except KeyError:
        raise CairnError(
            f"unknown metric {name!r}; available metrics: {', '.join(sorted(METRICS))}. "
            "Set the task's 'metric' to one of these."
        ) from None
