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
- ``rouge_l`` (MeetingBank): Google's ``rouge_score`` (sentence-level ROUGE-L F-measure, no
  stemming). Its default tokenizer drops every non-ASCII letter, so we pass a tokenizer that does the
  same thing Unicode-aware (lower-case, split on anything that is not a letter or digit); on ASCII
  text it yields exactly the default tokens. Not TRACE's numbers: see ``rouge_l_trace``.
- ``rouge_l_trace`` (MeetingBank, as TRACE and the seed paper score it): the ``rouge`` package's
  ``Rouge().get_scores(hyps, refs, avg=True)["rouge-l"]["f"]``: *summary-level* ROUGE-L (Lin 2004,
  §3.2: texts split into sentences at ``.``, union LCS over sentences, recall/precision over the
  number of *distinct* whitespace tokens), case-sensitive, no tokenizer beyond whitespace. TRACE's
  ``metrics.caculate_rouge`` calls ``get_scores(target, prediction)`` per pair (reference as the
  package's hypothesis; the union LCS is not symmetric), skips empty pairs and divides by the total;
  we do the same, also scoring 0 where the package would raise (a side with no sentence).
- ``edit_similarity`` (Py150): TRACE's ``fuzzywuzzy`` ``fuzz.ratio`` / 100 after replacing the
  Py150 literal placeholders (``<NUM_LIT>`` -> ``0``, ``<STR_LIT>``/``<CHAR_LIT>`` -> empty,
  ``<STR_LIT:x>`` -> ``x``). We use ``rapidfuzz.fuzz.ratio`` (the same normalised Indel similarity
  as python-Levenshtein's ratio) without fuzzywuzzy's rounding to an integer.
- ``sari`` (20Minuten): TRACE calls the Hugging Face ``sari`` metric, i.e. the tensor2tensor
  variant of SARI (Xu et al. 2016, TACL 4) with EASSE normalisation; we re-implement exactly that
  variant (see :func:`sari_sentence`) and divide by 100.
- ``gsm8k_strict`` / ``gsm8k_flexible`` / ``gsm8k_cot_strict`` / ``gsm8k_cot_flexible``: exact match
  of lm-evaluation-harness's ``gsm8k`` / ``gsm8k_cot`` tasks (extraction regexes and normalisation in
  :mod:`cairn.eval.gsm8k`); ``gsm8k`` (final number, compared by value) stays for lenient scoring.
- Empty predictions score 0 everywhere, as in TRACE (which skips them but divides by the total).

A task may carry several metrics: :func:`score_all` scores them all; :func:`item_scores` gives the
per-example scores a bootstrap interval needs; :func:`validate_metric_for_answers` rejects a metric
that cannot score a task's references, and :func:`label_collisions` finds labels that TRACE's
first-character ``accuracy`` cannot tell apart.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Callable

from cairn.data.answers import NUMBER_RE, METRIC_NAMES, extract_final_number, parse_number  # noqa: F401
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

# number parsing lives in the data layer (its load-time checks need it too); re-exported here
_NUMBER_RE = NUMBER_RE


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


# ---------------------------------------------------------------- ROUGE-L as TRACE computes it

_TRACE_ROUGE = None


def rouge_l_trace_pair(prediction: str, reference: str) -> float:
    """Summary-level ROUGE-L F of one pair, exactly the ``rouge`` package TRACE calls (0 if a side is empty).

    The package splits each text at ``.`` into sentences (dropping empty pieces) and raises on a text
    with no sentence; TRACE would crash there, we score 0 like an empty prediction.
    """
    global _TRACE_ROUGE
    if _TRACE_ROUGE is None:
        from rouge import Rouge

        _TRACE_ROUGE = Rouge(metrics=["rouge-l"])
    # the package's own sentence split; a side without a non-blank sentence cannot be scored
    if not any(p.split() for p in prediction.split(".")) or not any(p.split() for p in reference.split(".")):
        return 0.0
    # TRACE's score_rouge(target, prediction) passes the reference as the package's *hypothesis*; the
    # summary-level union LCS is not symmetric across multi-sentence texts, so keep that order
    return float(_TRACE_ROUGE.get_scores(reference, prediction)[0]["rouge-l"]["f"])


def rouge_l_trace(predictions: list[str], references: list[str], prompts: list[str] | None = None) -> float:
    """Mean summary-level ROUGE-L F (the ``rouge`` package, TRACE's ``caculate_rouge``)."""
    _check(predictions, references, "rouge_l_trace")
    return _mean([rouge_l_trace_pair(p, r) for p, r in zip(predictions, references)])


# ---------------------------------------------------------------- GSM8K as lm-evaluation-harness scores it


def _lm_eval_gsm8k(name: str, extract_name: str) -> Metric:
    def metric(predictions: list[str], references: list[str], prompts: list[str] | None = None) -> float:
        from cairn.eval import gsm8k as G

        _check(predictions, references, name)
        extract = getattr(G, extract_name)
        return _mean([G.exact_match(extract(p), r) for p, r in zip(predictions, references)])

    metric.__name__ = name
    metric.__doc__ = f"lm-eval exact match after its {extract_name.replace('extract_', '')} filter ({name})."
    return metric


gsm8k_strict = _lm_eval_gsm8k("gsm8k_strict", "extract_strict")
gsm8k_flexible = _lm_eval_gsm8k("gsm8k_flexible", "extract_flexible")
gsm8k_cot_strict = _lm_eval_gsm8k("gsm8k_cot_strict", "extract_cot_strict")
gsm8k_cot_flexible = _lm_eval_gsm8k("gsm8k_cot_flexible", "extract_flexible")


# ---------------------------------------------------------------- registry

METRICS: dict[str, Metric] = {
    "accuracy": accuracy,
    "numeric_accuracy": numeric_accuracy,
    "exact_match": exact_match,
    "rouge_l": rouge_l,
    "rouge_l_trace": rouge_l_trace,
    "edit_similarity": edit_similarity,
    "sari": sari,
    "gsm8k": gsm8k,
    "gsm8k_strict": gsm8k_strict,
    "gsm8k_flexible": gsm8k_flexible,
    "gsm8k_cot_strict": gsm8k_cot_strict,
    "gsm8k_cot_flexible": gsm8k_cot_flexible,
}

# the data layer validates names against METRIC_NAMES without importing this module: keep them equal
assert set(METRICS) == set(METRIC_NAMES), "cairn.data.answers.METRIC_NAMES must list every registered metric"

# metrics whose references must hold a GSM8K final answer ("... #### N" or a bare number)
_GSM8K_METRICS = {"gsm8k", "gsm8k_strict", "gsm8k_flexible", "gsm8k_cot_strict", "gsm8k_cot_flexible"}
_GSM8K_REF_RE = re.compile(r"(?:####\s*|^\s*)\$?-?[0-9][0-9.,]*\s*$")


def get_metric(name: str) -> Metric:
    """The metric registered as ``name``; a :class:`CairnError` listing the known names otherwise."""
    try:
        return METRICS[name]
    except KeyError:
        raise CairnError(
            f"unknown metric {name!r}; available metrics: {', '.join(sorted(METRICS))}. "
            "Set the task's 'metric' to one of these."
        ) from None


def score_all(metric_names: list[str], predictions: list[str], references: list[str],
              prompts: list[str] | None = None) -> dict[str, float]:
    """``{name: score}`` for every metric of a task, in the given order (names checked first)."""
    if not metric_names:
        raise CairnError("score_all: no metric names given; a task needs at least one metric.")
    fns = {name: get_metric(name) for name in metric_names}
    return {name: float(fn(predictions, references, prompts)) for name, fn in fns.items()}


def item_scores(name: str, predictions: list[str], references: list[str],
                prompts: list[str] | None = None) -> list[float]:
    """Per-example scores of metric ``name`` (their mean is the metric), for bootstrap intervals.

    Every metric here is a mean of independent per-example scores, so scoring one example at a time
    gives exactly the terms of that mean.
    """
    fn = get_metric(name)
    _check(predictions, references, name)
    ps = prompts if prompts is not None else [None] * len(predictions)
    return [float(fn([p], [r], None if s is None else [s])) for p, r, s in zip(predictions, references, ps)]


def validate_metric_for_answers(name: str, answers: list[str], where: str = "task") -> None:
    """Raise :class:`CairnError` when metric ``name`` cannot score these reference answers.

    Checks: the metric exists; there are answers; no answer is empty (it would score 0 whatever the
    model says); GSM8K metrics need references ending in ``#### <number>`` or a bare number (MetaMath's
    ``The answer is: N`` must be mapped first); ``numeric_accuracy`` needs at least one numeric answer.
    """
    get_metric(name)
    if not answers:
        raise CairnError(f"{where}: metric {name!r} has no reference answers to score; the test split is empty.")
    for i, a in enumerate(answers):
        if not isinstance(a, str) or not a.strip():
            raise CairnError(
                f"{where}: answer #{i} is {a!r}; metric {name!r} cannot score an empty reference. "
                "Fix the data file or the task's answer_field.")
    if name in _GSM8K_METRICS:
        for i, a in enumerate(answers):
            if not _GSM8K_REF_RE.search(a):
                raise CairnError(
                    f"{where}: answer #{i} ({a[-60:]!r}) does not end with '#### <number>' or a bare number, so "
                    f"metric {name!r} cannot score it. Point answer_field at the GSM8K solution, or use a "
                    "metric such as 'exact_match'.")
    if name == "numeric_accuracy" and not any(parse_number(a) is not None for a in answers):
        raise CairnError(f"{where}: no answer is a number, so 'numeric_accuracy' only does string matching; "
                         "use 'exact_match' (or 'accuracy' for single-letter labels).")


def label_collisions(metric: str, labels: list[str]) -> dict[str, list[str]]:
    """Distinct labels that ``metric`` scores as the same answer: ``{key: [labels...]}``.

    Only first-character ``accuracy`` (TRACE's) can confuse labels: ``World / Sports / Business /
    Science or Technology`` gives ``{"S": ["Sports", "Science or Technology"]}``. Use ``exact_match``
    on such tasks instead.
    """
    if metric != "accuracy":
        return {}
    groups: dict[str, list[str]] = {}
    for lab in dict.fromkeys(l.strip() for l in labels if l.strip()):
        groups.setdefault(_first_char(lab), []).append(lab)
    return {k: v for k, v in groups.items() if len(v) > 1}


def collision_warning(metric: str, labels: list[str], where: str = "task") -> str | None:
    """A warning naming the colliding labels and the metric to use instead, or ``None``."""
    coll = label_collisions(metric, labels)
    if not coll:
        return None
    parts = "; ".join(f"{', '.join(map(repr, v))} all start with {k!r}" for k, v in coll.items())
    return (f"{where}: metric {metric!r} compares only the first character, so it cannot tell these labels "
            f"apart: {parts}. Use metric 'exact_match' (whole label) instead.")
