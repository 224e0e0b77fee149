"""The old-knowledge suite: what a model knew before continual training, measured as lm-evaluation-harness does.

The seed paper (Lee & Wynter 2024, "Collaboratively adding new knowledge to an LLM", arXiv, Oct. 2024)
tracks forgetting with lm-evaluation-harness on MMLU, ARC-Challenge, CommonsenseQA, HellaSwag,
OpenBookQA, PIQA and WinoGrande, reporting acc_norm where the task defines it and acc otherwise.
This module re-implements those task definitions (lm-evaluation-harness 0.4.x, ``lm_eval/tasks/<task>``)
plus ARC-Easy and GSM8K, so the same model on the same questions gets the same accuracy, but scored
by the faster batched scorer in :mod:`cairn.eval.multiple_choice`.

Per task (prompt, continuations, gold; the target delimiter is " " everywhere):

=============  ============================================================  ================  =========
task           context                                                       continuations     primary
=============  ============================================================  ================  =========
mmlu           "The following are multiple choice questions (with answers)   " A" .. " D"      acc
               about {subject with _ as space}.\\n\\n{question.strip()}\\n
               A. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer:"
arc_easy,      "Question: {question}\\nAnswer:"                               " {choice text}"  acc_norm
arc_challenge
hellaswag      "{query}" (lm-eval's preprocess of activity_label: ctx_a       " {ending}"       acc_norm
               ctx_b.capitalize(); a pre-processed ``ctx`` column is used
               as it is)
piqa           "Question: {goal}\\nAnswer:"                                   " {sol1|sol2}"    acc_norm
openbookqa     "{question_stem}"                                             " {choice text}"  acc_norm
commonsense_qa "Question: {question.strip()}\\nA. ..\\nE. {c4}\\nAnswer:"      " A" .. " E"      acc
winogrande     "{sentence up to the blank}{option}" (one context per option)  " {rest}"         acc
gsm8k          "Question: {question}\\nAnswer:" (greedy generation)           --                exact_match
=============  ============================================================  ================  =========

acc picks the choice with the highest summed log-likelihood; acc_norm divides each by the number of
characters of the choice text (lm-eval's ``completion_len``, without the target delimiter).
WinoGrande is "partial scoring" (Trinh & Le 2018, arXiv:1806.02847): the options go into the
context and only the shared rest of the sentence is scored. For GSM8K see :mod:`cairn.eval.gsm8k`.

Deviations from lm-evaluation-harness, and why:

- **Few-shot**: zero-shot by default for every task (lm-eval's GSM8K default is 5-shot; pass
  ``num_fewshot=5`` for that). ``num_fewshot`` is supported where the examples can be drawn the
  same way: MMLU (the first n dev questions of the same subject, lm-eval's ``first_n`` sampler,
  exact) and GSM8K (the first n training questions; lm-eval samples them at random, so the
  few-shot GSM8K prompt differs). The other tasks draw few-shot examples at random from training
  splits that the local data pack does not hold, so they refuse ``num_fewshot > 0``.
- **MMLU as one task**: lm-eval runs 57 subject tasks and aggregates them weighted by size, which is
  the mean over all questions; here it is one task over the ``all`` config with the subject
  description filled in per question (the same text), so ``limit`` subsamples across subjects.
- **HellaSwag local data**: a JSONL with only ``ctx``/``endings``/``label`` (the shared data pack)
  is already pre-processed and is used as it is; lm-eval's ``preprocess`` is applied only to rows that
  carry ``ctx_a``/``ctx_b``/``activity_label`` (the Hugging Face dataset). Scores on the
  pre-processed file are close to, not identical with, lm-eval's on the raw data.
- **Subsampling**: ``limit`` draws a seeded random subset (kept in file order); lm-eval's ``--limit``
  takes the first N, which on sorted files (MMLU by subject) is a biased sample.
- **bf16** (``precision="bf16"``, not an lm-eval option): bf16 autocast changes a weak model's
  predictions on a few questions in a hundred (measured: 1-5 of 40 per task on SmolLM2-135M), so
  cairn re-scores near ties in float32 and the accuracies stay float32's (:func:`near_tie`).
- **Standard error**: the sample standard deviation over questions / sqrt(n), as lm-eval's
  ``mean_stderr``; lm-eval's MMLU group stderr pools subject variances instead.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from cairn.errors import CairnError


PRECISIONS = ("float32", "bf16")
# How far a bf16-autocast log-likelihood may be from float32's, in nats per square root of the number
# of scored tokens (``near_tie``). bf16 keeps 8 significant bits; over a continuation the per-token
# errors partly cancel, so the error of a sum grows like sqrt(tokens), not like tokens: on the built-in
# SmolLM2-135M over the data pack (benchmarks/eval_precision.py) the worst |error| / sqrt(tokens) seen
# was about 0.3, from one-token answers (MMLU's " A") down to 30-token HellaSwag endings alike. 0.5
# leaves a margin of about 1.7x. Too large a value only re-scores more questions in float32; too small
# a value would let a bf16 error flip a prediction, so measure before lowering it.
BF16_TOKEN_TOLERANCE = 0.5


def _torch():
    import torch

    return torch


@dataclass(frozen=True)
class MCDoc:
    """One multiple-choice question in lm-evaluation-harness's request form."""

    pairs: tuple[tuple[str, str], ...]  # (context, continuation) per choice, target delimiter included
    choices: tuple[str, ...]  # lm-eval's doc_to_choice texts; their character lengths normalise acc_norm
    gold: int


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    kind: str  # "multiple_choice" or "generate"
    local_path: str  # relative to the data directory (the data pack's layout)
    columns: tuple[str, ...]  # required columns of a row
    to_doc: Callable[[dict], MCDoc] | None  # multiple-choice tasks; raises _BadRow for a bad label
    primary: str
    metrics: tuple[str, ...]
    hf: tuple[str, str | None, str]  # (dataset path, config name, split) on the Hugging Face hub
    fewshot_local: str | None = None  # file of few-shot examples, when few-shot is supported
    fewshot_hf_split: str | None = None
    lm_eval_task: str = ""  # lm-evaluation-harness's task name
    alt_columns: tuple[tuple[str, ...], ...] = field(default_factory=tuple)  # other accepted schemas


class _BadRow(ValueError):
    """A row whose content (not its columns) is unusable; turned into a CairnError with file:line."""


def _choice_index(labels: Sequence[str], key: str, what: str) -> int:
    key = key.strip()  # lm-eval's openbookqa does answerKey.lstrip()
    if key not in labels:
        raise _BadRow(f"{what} {key!r} is not one of the choice labels {list(labels)}")
    return list(labels).index(key)


def _mc(context: str, choices: Sequence[str], gold: int, conts: Sequence[str] | None = None) -> MCDoc:
    if not 0 <= gold < len(choices):
        raise _BadRow(f"answer index {gold} is out of range for {len(choices)} choices")
    conts = choices if conts is None else conts
    return MCDoc(tuple((context, " " + c) for c in conts), tuple(choices), gold)


def _int_label(value: Any, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _BadRow(f"{what} {value!r} is not an integer") from None


def mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def mmlu_question(row: dict) -> str:
    c = row["choices"]
    if len(c) != 4:
        raise _BadRow(f"MMLU needs 4 choices, found {len(c)}")
    return f"{row['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def _mmlu(row: dict) -> MCDoc:
    return _mc(mmlu_description(row["subject"]) + mmlu_question(row), "ABCD", _int_label(row["answer"], "answer"))


def _arc(row: dict) -> MCDoc:
    ch = row["choices"]
    return _mc(f"Question: {row['question']}\nAnswer:", ch["text"], _choice_index(ch["label"], row["answerKey"], "answerKey"))


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag clean-up of WikiHow markup (applied to raw Hugging Face rows only)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict) -> MCDoc:
    if "ctx_a" in row:  # raw Hugging Face row: build and clean the query as lm-eval does
        query = hellaswag_preprocess(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
        endings = [hellaswag_preprocess(e) for e in row["endings"]]
    else:  # already pre-processed (the data pack): use as is
        query, endings = row["ctx"], list(row["endings"])
    return _mc(query, endings, _int_label(row["label"], "label"))


def _piqa(row: dict) -> MCDoc:
    return _mc(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], _int_label(row["label"], "label"))


def _openbookqa(row: dict) -> MCDoc:
    ch = row["choices"]
    return _mc(row["question_stem"], ch["text"], _choice_index(ch["label"], row["answerKey"], "answerKey"))


def _commonsense_qa(row: dict) -> MCDoc:
    t = row["choices"]["text"]
    if len(t) != 5:
        raise _BadRow(f"CommonsenseQA needs 5 choices, found {len(t)}")
    context = (f"Question: {row['question'].strip()}\nA. {t[0]}\nB. {t[1]}\nC. {t[2]}\nD. {t[3]}\nE. {t[4]}\nAnswer:")
    return _mc(context, "ABCDE", _choice_index("ABCDE", row["answerKey"], "answerKey"))


def _winogrande(row: dict) -> MCDoc:
    sentence = row["sentence"]
    if "_" not in sentence:
        raise _BadRow("the sentence has no '_' blank")
    blank = sentence.index("_")
    answer = str(row["answer"]).strip()
    if answer not in ("1", "2"):
        raise _BadRow(f"answer {row['answer']!r} is out of range: must be '1' or '2'")
    contexts = [sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]]
    rest = " " + sentence[blank + 1:].strip()
    # lm-eval's acc_norm (not reported for WinoGrande) would normalise by the context lengths
    return MCDoc(tuple((c, rest) for c in contexts), tuple(contexts), int(answer) - 1)


_ACC = ("acc",)
_ACC_NORM = ("acc", "acc_norm")
_GSM = ("exact_match_strict", "exact_match_flexible")

OLD_KNOWLEDGE_TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("mmlu", "MMLU, 57 subjects (cais/mmlu 'all' test)", "multiple_choice", "old_knowledge/mmlu/test.jsonl",
                 ("question", "subject", "choices", "answer"), _mmlu, "acc", _ACC, ("cais/mmlu", "all", "test"),
                 fewshot_local="old_knowledge/mmlu/dev.jsonl", fewshot_hf_split="dev", lm_eval_task="mmlu"),
        TaskSpec("arc_challenge", "ARC-Challenge test", "multiple_choice", "old_knowledge/arc_challenge/test.jsonl",
                 ("question", "choices", "answerKey"), _arc, "acc_norm", _ACC_NORM,
                 ("allenai/ai2_arc", "ARC-Challenge", "test"), lm_eval_task="arc_challenge"),
        TaskSpec("arc_easy", "ARC-Easy test", "multiple_choice", "old_knowledge/arc_easy/test.jsonl",
                 ("question", "choices", "answerKey"), _arc, "acc_norm", _ACC_NORM,
                 ("allenai/ai2_arc", "ARC-Easy", "test"), lm_eval_task="arc_easy"),
        TaskSpec("hellaswag", "HellaSwag validation", "multiple_choice", "old_knowledge/hellaswag/validation.jsonl",
                 ("ctx", "endings", "label"), _hellaswag, "acc_norm", _ACC_NORM, ("Rowan/hellaswag", None, "validation"),
                 lm_eval_task="hellaswag", alt_columns=(("activity_label", "ctx_a", "ctx_b", "endings", "label"),)),
        TaskSpec("piqa", "PIQA validation", "multiple_choice", "old_knowledge/piqa/validation.jsonl",
                 ("goal", "sol1", "sol2", "label"), _piqa, "acc_norm", _ACC_NORM, ("baber/piqa", None, "validation"),
                 lm_eval_task="piqa"),
        TaskSpec("winogrande", "WinoGrande 1.1 dev (winogrande_xl validation)", "multiple_choice",
                 "old_knowledge/winogrande/validation.jsonl", ("sentence", "option1", "option2", "answer"), _winogrande,
                 "acc", _ACC, ("allenai/winogrande", "winogrande_xl", "validation"), lm_eval_task="winogrande"),
        TaskSpec("openbookqa", "OpenBookQA main test", "multiple_choice", "old_knowledge/openbookqa/test.jsonl",
                 ("question_stem", "choices", "answerKey"), _openbookqa, "acc_norm", _ACC_NORM,
                 ("allenai/openbookqa", "main", "test"), lm_eval_task="openbookqa"),
        TaskSpec("commonsense_qa", "CommonsenseQA validation", "multiple_choice",
                 "old_knowledge/commonsense_qa/validation.jsonl", ("question", "choices", "answerKey"), _commonsense_qa,
                 "acc", _ACC, ("tau/commonsense_qa", None, "validation"), lm_eval_task="commonsense_qa"),
        # GSM8K primary is the flexible extraction: a model trained on MetaMath-style answers
        # ("The answer is: 18") never writes GSM8K's "#### 18", so strict-match would score format.
        TaskSpec("gsm8k", "GSM8K test, greedy generation", "generate", "gsm8k/test.jsonl", ("question", "answer"), None,
                 "exact_match_flexible", _GSM, ("openai/gsm8k", "main", "test"), fewshot_local="gsm8k/train.jsonl",
                 fewshot_hf_split="train", lm_eval_task="gsm8k"),
    ]
}

DEFAULT_TASKS = ["mmlu", "arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande", "openbookqa", "commonsense_qa"]
"""The multiple-choice tasks (the seed paper's list plus ARC-Easy); GSM8K is opt-in: generation is slow."""


def resolve_tasks(names: Sequence[str] | None) -> list[str]:
    """Validate task names (``None`` or ``["all"]`` gives the defaults / every task)."""
    if not names:
        return list(DEFAULT_TASKS)
    if list(names) == ["all"]:
        return list(OLD_KNOWLEDGE_TASKS)
    unknown = [n for n in names if n not in OLD_KNOWLEDGE_TASKS]
    if unknown:
        raise CairnError(f"unknown old-knowledge task(s) {', '.join(map(repr, unknown))}; available: "
                         f"{', '.join(OLD_KNOWLEDGE_TASKS)} (or 'all')")
    return list(dict.fromkeys(names))


def default_data_dir() -> Path | None:
    """``$CAIRN_DATA`` when set, else ``None`` (load from the Hugging Face hub)."""
    env = os.environ.get("CAIRN_DATA")
    return Path(env).expanduser() if env else None


def old_knowledge_dir(configured: str | None, experiment_data_dir: str | None) -> Path | None:
    """Where an experiment's old-knowledge suite reads its data: ``evaluation.old_knowledge.data_dir``
    when set, else ``$CAIRN_DATA``, else the experiment's own ``data_dir`` when it is laid out like the
    data pack (holds ``old_knowledge/``), else ``None`` (the Hugging Face hub). The last rule is why
    ``--set data_dir=PACK`` alone runs a paper config offline: one pack serves tasks and suite."""
    if configured:
        return Path(configured).expanduser()
    env = default_data_dir()
    if env is not None:
        return env
    if experiment_data_dir and (Path(experiment_data_dir).expanduser() / "old_knowledge").is_dir():
        return Path(experiment_data_dir).expanduser()
    return None


def _find_local(data_dir: Path, rel: str) -> Path:
    """``data_dir/rel``; also accepts ``data_dir`` pointing inside the pack (``old_knowledge/`` itself)."""
    candidates = [data_dir / rel, data_dir / Path(*Path(rel).parts[1:])] if len(Path(rel).parts) > 1 else [data_dir / rel]
    for c in candidates:
        if c.is_file():
            return c
    raise CairnError(f"data file {rel} not found under {data_dir} (looked for {', '.join(map(str, candidates))}); "
                     "point --data-dir at a folder laid out like the data pack, or pass a file for this task")


def read_jsonl(path: Path, spec: TaskSpec) -> list[tuple[int, dict]]:
    """Rows of a JSONL file as ``(line number, row)``, checking the task's required columns."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CairnError(f"cannot read {path}: {exc}") from None
    schemas = (spec.columns,) + spec.alt_columns
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CairnError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise CairnError(f"{path}:{lineno}: expected a JSON object, found {type(row).__name__}")
        if not any(all(c in row for c in cols) for cols in schemas):
            missing = [c for c in spec.columns if c not in row]
            raise CairnError(f"{path}:{lineno}: missing column {', '.join(map(repr, missing))} for task {spec.name} "
                             f"(a row needs {', '.join(spec.columns)})")
        rows.append((lineno, row))
    if not rows:
        raise CairnError(f"{path} holds no rows for task {spec.name}")
    return rows


def _load_hf(spec: TaskSpec, split: str | None = None) -> list[tuple[int, dict]]:
    try:
        import datasets
    except ImportError:
        raise CairnError(f"task {spec.name}: no local data given and the `datasets` package is not installed; "
                         "pass --data-dir (or set CAIRN_DATA) to a local copy, or `pip install datasets`") from None
    path, name, default_split = spec.hf
    try:
        ds = datasets.load_dataset(path, name, split=split or default_split)
    except Exception as exc:  # offline, gated, renamed: all user-fixable
        raise CairnError(f"task {spec.name}: cannot load {path} ({name}) from the Hugging Face hub ({exc}); "
                         "pass --data-dir (or set CAIRN_DATA) to a local copy") from None
    return [(i + 1, dict(r)) for i, r in enumerate(ds)]


def load_rows(spec: TaskSpec, data_dir: Path | None, data_file: Path | None = None) -> tuple[str, list[tuple[int, dict]]]:
    """(source name, rows) of a task from an explicit file, the data directory, or the hub."""
    if data_file is not None:
        return str(data_file), read_jsonl(Path(data_file), spec)
    if data_dir is not None:
        path = _find_local(Path(data_dir), spec.local_path)
        return str(path), read_jsonl(path, spec)
    return f"hf:{spec.hf[0]}", _load_hf(spec)


def subsample(n: int, limit: int | None, seed: int) -> list[int]:
    """Indices of a seeded random subset of size ``limit`` (all when ``limit`` is None), in file order."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


def to_docs(spec: TaskSpec, source: str, rows: list[tuple[int, dict]]) -> list[MCDoc]:
    docs = []
    for lineno, row in rows:
        try:
            docs.append(spec.to_doc(row))
        except _BadRow as exc:
            raise CairnError(f"{source}:{lineno}: {exc} (task {spec.name})") from None
        except (KeyError, TypeError, AttributeError) as exc:
            raise CairnError(f"{source}:{lineno}: malformed row for task {spec.name} ({type(exc).__name__}: {exc})") from None
    return docs


def mmlu_fewshot_prefix(dev_rows: list[dict], subject: str, k: int) -> str:
    """lm-eval's MMLU few-shot block: the first ``k`` dev questions of the subject, each answered."""
    shots = [r for r in dev_rows if r["subject"] == subject][:k]
    if len(shots) < k:
        raise CairnError(f"MMLU subject {subject!r} has {len(shots)} dev questions, fewer than num_fewshot={k}")
    return "".join(mmlu_question(r) + " " + "ABCD"[int(r["answer"])] + "\n\n" for r in shots)


def _with_mmlu_fewshot(docs: list[MCDoc], rows: list[dict], dev_rows: list[dict], k: int) -> list[MCDoc]:
    out = []
    for doc, row in zip(docs, rows):
        desc = mmlu_description(row["subject"])
        context = desc + mmlu_fewshot_prefix(dev_rows, row["subject"], k) + doc.pairs[0][0][len(desc):]
        out.append(MCDoc(tuple((context, c) for _, c in doc.pairs), doc.choices, doc.gold))
    return out


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of a mean: sample standard deviation / sqrt(n) (lm-eval's ``mean_stderr``)."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return (sum((v - mu) ** 2 for v in values) / (n - 1) / n) ** 0.5


def mc_predictions(loglikelihoods: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(argmax of log-likelihood, argmax of log-likelihood / character length), first index on ties."""
    acc = max(range(len(loglikelihoods)), key=lambda i: (loglikelihoods[i], -i))
    normed = [ll / float(len(c)) for ll, c in zip(loglikelihoods, choices)]
    norm = max(range(len(normed)), key=lambda i: (normed[i], -i))
    return acc, norm


def _summary(spec: TaskSpec, per_metric: dict[str, list[float]], seconds: float, source: str) -> dict:
    result: dict[str, Any] = {}
    n = 0
    for m in spec.metrics:
        vals = per_metric[m]
        n = len(vals)
        result[m] = sum(vals) / n
        result[f"{m}_stderr"] = mean_stderr(vals)
    result.update(n=n, primary_metric=spec.primary, primary=result[spec.primary],
                  primary_stderr=result[f"{spec.primary}_stderr"], seconds=round(seconds, 3),
                  questions_per_second=round(n / seconds, 3) if seconds > 0 else None, source=source)
    return result


def load_task_docs(spec: TaskSpec, data_dir: Path | None, limit: int | None, seed: int, num_fewshot: int = 0,
                   data_file: Path | None = None) -> tuple[str, list[dict], list[Any]]:
    """(source, selected rows, docs) of a task; docs are MCDocs, or prompts + references for GSM8K."""
    source, rows = load_rows(spec, data_dir, data_file)
    picked = [rows[i] for i in subsample(len(rows), limit, seed)]
    if num_fewshot and spec.fewshot_local is None:
        raise CairnError(f"task {spec.name} is zero-shot only here: lm-evaluation-harness draws its few-shot examples "
                         "at random from a training split the data pack does not hold; use num_fewshot=0")
    if spec.kind == "generate":
        from cairn.eval import gsm8k

        shots = []
        if num_fewshot:
            _, fs = _fewshot_rows(spec, data_dir)
            shots = fs[:num_fewshot]
        return source, [r for _, r in picked], [gsm8k.build_prompt(r, shots) for _, r in picked]
    docs = to_docs(spec, source, picked)
    if num_fewshot:
        _, dev = _fewshot_rows(spec, data_dir)
        docs = _with_mmlu_fewshot(docs, [r for _, r in picked], dev, num_fewshot)
    return source, [r for _, r in picked], docs


def _fewshot_rows(spec: TaskSpec, data_dir: Path | None) -> tuple[str, list[dict]]:
    if data_dir is not None:
        path = _find_local(Path(data_dir), spec.fewshot_local)
        return str(path), [r for _, r in read_jsonl(path, spec)]
    return f"hf:{spec.hf[0]}", [r for _, r in _load_hf(spec, spec.fewshot_hf_split)]


def evaluate_suite(
    model,
    tokenizer,
    tasks: Sequence[str] | None = None,
    data_dir: Path | None = None,
    limit: int | None = None,
    seed: int = 1234,
    batch_size: int = 16,
    num_fewshot: int = 0,
    progress: bool = True,
    max_gen_toks: int = 256,
    data_files: dict[str, Path] | None = None,
    share_prefix: bool = True,
    return_details: bool = False,
    return_items: bool = False,
    precision: str = "float32",
    bf16_tolerance: float = BF16_TOKEN_TOLERANCE,
) -> dict[str, dict]:
    """Score ``model`` on the old-knowledge tasks; one result dict per task.

    Each result holds every metric of the task with ``<metric>_stderr``, ``n``, ``primary_metric``
    (acc_norm for ARC, HellaSwag, PIQA, OpenBookQA; acc for MMLU, WinoGrande, CommonsenseQA;
    exact_match_flexible for GSM8K), ``primary``/``primary_stderr``, timing and the data source.
    ``limit`` evaluates a seeded random subset of that many questions per task; ``data_dir`` is a
    folder laid out like the data pack (``old_knowledge/<task>/...``, ``gsm8k/test.jsonl``), or
    ``None`` for ``$CAIRN_DATA`` and then the Hugging Face hub; ``data_files`` overrides the file
    of single tasks. ``return_items`` adds ``items``: each question's score on the primary metric (in
    subset order), what paired comparisons of two models on the same questions need.

    ``precision="bf16"`` scores the multiple-choice tasks under bf16 autocast and re-scores in
    float32 every question where bf16 could have changed the prediction (:func:`near_tie` with
    ``bf16_tolerance`` nats per square root of the scored tokens), so acc and acc_norm are float32's; each result then
    reports ``rescored`` (how many questions needed float32). It needs float32 weights.
    """
    if precision not in PRECISIONS:
        raise CairnError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" and next(model.parameters()).dtype != _torch().float32:
        raise CairnError("precision 'bf16' re-scores near ties in float32, so it needs the model loaded in float32 "
                         f"(it is {next(model.parameters()).dtype}); load float32 weights or use precision 'float32'")
    if bf16_tolerance <= 0:
        raise CairnError(f"bf16_tolerance must be > 0, got {bf16_tolerance}")
    if limit is not None and limit < 1:
        raise CairnError(f"limit must be a positive number of questions per task, got {limit}")
    if num_fewshot < 0:
        raise CairnError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if batch_size < 1:
        raise CairnError(f"batch_size must be >= 1, got {batch_size}")
    names = resolve_tasks(tasks)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    data_files = {k: Path(v) for k, v in (data_files or {}).items()}
    for k in data_files:
        resolve_tasks([k])
    was_training = model.training
    model.eval()
    results: dict[str, dict] = {}
    try:
        for name in names:
            spec = OLD_KNOWLEDGE_TASKS[name]
            source, rows, docs = load_task_docs(spec, data_dir, limit, seed, num_fewshot, data_files.get(name))
            start = time.perf_counter()
            if spec.kind == "generate":
                from cairn.eval import gsm8k

                per_metric, details = gsm8k.score(model, tokenizer, docs, rows, batch_size, max_gen_toks, progress)
            else:
                per_metric, details = _score_mc(model, tokenizer, docs, batch_size, share_prefix, progress, name,
                                                precision, bf16_tolerance)
            results[name] = _summary(spec, per_metric, time.perf_counter() - start, source)
            if spec.kind != "generate":
                results[name]["precision"] = precision
                if precision == "bf16":
                    results[name]["rescored"] = sum(1 for d in details if d.get("rescored"))
            if return_details:
                results[name]["details"] = details
            if return_items:
                results[name]["items"] = [float(v) for v in per_metric[spec.primary]]
    finally:
        model.train(was_training)
    return results


def near_tie(loglikelihoods: Sequence[float], token_counts: Sequence[int], choices: Sequence[str],
             tolerance: float) -> bool:
    """Could log-likelihood errors of ``tolerance * sqrt(tokens)`` change the acc or acc_norm prediction?

    Choice ``i``'s summed log-likelihood is trusted to within ``e_i = tolerance * sqrt(token_counts[i])``.
    The acc prediction ``b`` is safe when ``ll_b - ll_j > e_b + e_j`` for every other ``j``; acc_norm's
    the same on ``ll / len(choice)`` with ``e / len(choice)``. Exactly tied scores are near ties too.
    """
    acc, norm = mc_predictions(loglikelihoods, choices)
    err = [tolerance * n ** 0.5 for n in token_counts]
    chars = [float(len(c)) for c in choices]
    for j in range(len(choices)):
        if j != acc and loglikelihoods[acc] - loglikelihoods[j] <= err[acc] + err[j]:
            return True
        if j != norm and (loglikelihoods[norm] / chars[norm] - loglikelihoods[j] / chars[j]
                          <= err[norm] / chars[norm] + err[j] / chars[j]):
            return True
    return False


def rescore_near_ties(model, tokenizer, docs: list[MCDoc], approx: list[list[float]], tolerance: float,
                      batch_size: int = 16, share_prefix: bool = True, progress: bool = False,
                      desc: str = "float32 near ties") -> tuple[list[list[float]], list[int]]:
    """``approx`` (bf16 log-likelihoods) with every :func:`near_tie` question re-scored at the model's own
    precision; returns the merged log-likelihoods and the indices of the re-scored questions."""
    from cairn.eval.multiple_choice import continuation_token_counts, score_pairs

    counts = continuation_token_counts(tokenizer, [d.pairs for d in docs])
    flagged = [q for q, d in enumerate(docs) if near_tie(approx[q], counts[q], d.choices, tolerance)]
    lls = list(approx)
    if flagged:
        exact = score_pairs(model, tokenizer, [docs[q].pairs for q in flagged], batch_size=batch_size,
                            share_prefix=share_prefix, progress=progress, desc=desc)
        for q, ll in zip(flagged, exact):
            lls[q] = ll
    return lls, flagged


def _score_mc(model, tokenizer, docs: list[MCDoc], batch_size: int, share_prefix: bool, progress: bool,
              name: str, precision: str = "float32",
              bf16_tolerance: float = BF16_TOKEN_TOLERANCE) -> tuple[dict[str, list[float]], list[dict]]:
    from cairn.eval.multiple_choice import score_pairs

    autocast = _torch().bfloat16 if precision == "bf16" else None
    lls = score_pairs(model, tokenizer, [d.pairs for d in docs], batch_size=batch_size, share_prefix=share_prefix,
                      progress=progress, desc=name, autocast=autocast)
    rescored: set[int] = set()
    if autocast is not None:
        lls, flagged = rescore_near_ties(model, tokenizer, docs, lls, bf16_tolerance, batch_size, share_prefix,
                                         progress, f"{name} (float32 near ties)")
        rescored = set(flagged)
    acc, acc_norm, details = [], [], []
    for q, (doc, ll) in enumerate(zip(docs, lls)):
        pred, pred_norm = mc_predictions(ll, doc.choices)
        acc.append(float(pred == doc.gold))
        acc_norm.append(float(pred_norm == doc.gold))
        detail = {"loglikelihoods": ll, "gold": doc.gold, "pred": pred, "pred_norm": pred_norm}
        if autocast is not None:
            detail["rescored"] = q in rescored
        details.append(detail)
    return {"acc": acc, "acc_norm": acc_norm}, details


def primary_scores(results: dict[str, dict]) -> dict[str, float]:
    """``{task: primary value}`` of an :func:`evaluate_suite` result."""
    return {k: v["primary"] for k, v in results.items()}
