"""Run lm-evaluation-harness itself on the old-knowledge suite (optional backend; ``pip install lm-eval``).

lm-evaluation-harness (Gao et al., Zenodo 10256836) is the reference the suite in
:mod:`cairn.eval.suites` re-implements; this backend runs it on the very same questions so results can
be checked against it, or used instead of cairn's scorer when a user prefers the reference.

Local data is fed to lm-eval without touching its prompt definitions: for each task a small YAML
is written that ``include``s lm-eval's own task YAML (by absolute path, so its ``!function`` hooks
resolve) and overrides only where the documents come from (``dataset_path: json`` with
``data_files`` = the selected questions, written as JSONL in the same column schema) and the split
names. Two tasks need more than a data swap:

- **mmlu**: lm-eval has 57 subject tasks whose only difference is the description; here one task
  includes its ``_default_template_yaml`` and templates the description from the ``subject``
  column (the same text: "The following are multiple choice questions (with answers) about
  {subject with _ as space}.\\n\\n"), so one file of mixed subjects is evaluated.
- **hellaswag**, when the data is the pre-processed pack (``ctx`` only): rows are given to lm-eval as
  ``activity_label`` / ``ctx_a`` (``ctx`` split at its first ": ") with an empty ``ctx_b``, so
  lm-eval's ``preprocess`` rebuilds the same query. It would still delete a bracketed span such
  as "[www.example.org]" that the pre-processed text kept (13 of 10042 rows); such rows are
  counted in the result (``bracket_rows``) because on them the two backends see different text.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any, Sequence

from cairn.errors import CairnError
from cairn.eval import suites

_METRIC_KEYS = {
    "acc": "acc,none",
    "acc_norm": "acc_norm,none",
    "exact_match_strict": "exact_match,strict-match",
    "exact_match_flexible": "exact_match,flexible-extract",
}
_MMLU_DESCRIPTION = "The following are multiple choice questions (with answers) about {{subject.replace('_', ' ')}}.\n\n"


def available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def _require() -> Path:
    if not available():
        raise CairnError("the lm-eval backend needs lm-evaluation-harness: `pip install lm-eval` (0.4.x)")
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def _source_yaml(tasks_dir: Path, name: str) -> Path:
    rel = {
        "mmlu": "mmlu/default/_default_template_yaml",
        "arc_easy": "arc/arc_easy.yaml",
        "arc_challenge": "arc/arc_challenge.yaml",
        "hellaswag": "hellaswag/hellaswag.yaml",
        "piqa": "piqa/piqa.yaml",
        "winogrande": "winogrande/default.yaml",
        "openbookqa": "openbookqa/openbookqa.yaml",
        "commonsense_qa": "commonsense_qa/default.yaml",
        "gsm8k": "gsm8k/gsm8k.yaml",
    }[name]
    path = tasks_dir / rel
    if not path.is_file():
        raise CairnError(f"this lm-eval install has no {rel}; the backend was written against lm-eval 0.4.x")
    return path


def _lm_eval_row(name: str, row: dict) -> tuple[dict, bool]:
    """A row in the schema lm-eval's task expects (and whether it has a bracketed span, for HellaSwag)."""
    if name == "hellaswag" and "ctx_a" not in row:
        label, _, rest = row["ctx"].partition(": ")
        if not rest:  # no activity label: keep the whole text in ctx_a (lm-eval would prefix ": ")
            label, rest = "", row["ctx"]
        text = row["ctx"] + " ".join(row["endings"])
        return ({"activity_label": label, "ctx_a": rest, "ctx_b": "", "endings": row["endings"],
                 "label": str(row["label"])}, "[" in text and "]" in text)
    return row, False


def write_local_tasks(out_dir: Path, tasks: Sequence[str], data_dir: Path | None, limit: int | None, seed: int,
                      num_fewshot: int = 0, data_files: dict[str, Path] | None = None) -> dict[str, dict]:
    """Write JSONL + YAML for lm-eval into ``out_dir``; returns ``{task: {"lm_eval_task", "bracket_rows"}}``.

    The questions are exactly those :func:`cairn.eval.suites.evaluate_suite` selects for the same
    ``data_dir``, ``limit`` and ``seed``.
    """
    import yaml

    tasks_dir = _require()
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {}
    for name in suites.resolve_tasks(tasks):
        spec = suites.OLD_KNOWLEDGE_TASKS[name]
        source, rows, _ = suites.load_task_docs(spec, data_dir, limit, seed, num_fewshot,
                                                (data_files or {}).get(name))
        converted = [_lm_eval_row(name, r) for r in rows]
        test_file = out_dir / f"{name}.test.jsonl"
        test_file.write_text("".join(json.dumps(r) + "\n" for r, _ in converted), encoding="utf-8")
        files = {"test": str(test_file)}
        cfg: dict[str, Any] = {
            "include": str(_source_yaml(tasks_dir, name)),
            "task": f"cairn_{name}",
            "dataset_path": "json",
            "dataset_name": None,
            "test_split": "test",
            "validation_split": None,
            "training_split": None,
            "num_fewshot": num_fewshot,
            "tag": [],  # do not re-register lm-eval's groups (ai2_arc, ...) under our copies
        }
        if spec.fewshot_local and num_fewshot:
            fs_source, fs_rows = suites._fewshot_rows(spec, data_dir)
            fs_file = out_dir / f"{name}.fewshot.jsonl"
            fs_file.write_text("".join(json.dumps(r) + "\n" for r in fs_rows), encoding="utf-8")
            files["fewshot"] = str(fs_file)
            cfg["fewshot_split"] = "fewshot"
        else:
            cfg["fewshot_split"] = None
        cfg["dataset_kwargs"] = {"data_files": files}
        if name == "mmlu":
            cfg["description"] = _MMLU_DESCRIPTION
        (out_dir / f"cairn_{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        info[name] = {"lm_eval_task": f"cairn_{name}", "bracket_rows": sum(b for _, b in converted), "source": source}
    return info


def _time_requests(lm) -> list[float]:
    """Wrap ``lm``'s request methods so the time spent in them (the model's work, without lm-eval's task
    building and metric computation) accumulates in the returned one-element list."""
    import time

    spent = [0.0]
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        method = getattr(lm, name)

        def timed(*args, _method=method, **kwargs):
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        setattr(lm, name, timed)
    return spent


def resolve_model(spec: str, dtype: str = "float32", device: str | None = None) -> tuple[Any, Any, str]:
    """(model for :func:`run_lm_eval`, tokenizer or None, model_args) for a ``cairn eval`` MODEL spec.

    A method's run directory (``config.yaml`` + ``rounds/``) is rebuilt exactly as ``cairn eval``
    rebuilds it (the last finished round, earlier LoRA rounds merged in order) and handed to lm-eval
    loaded; a PEFT adapter folder becomes ``pretrained=<its base>,peft=<folder>``; anything else is a
    model folder, built-in name or hub id.
    """
    from cairn.commands.eval import delta_round, load_for_eval, resolve_artifact
    from cairn.models import resolve_model_path

    path = Path(spec).expanduser()
    if (path / "config.yaml").is_file() and (path / "rounds").is_dir():
        model, tokenizer, _, _ = load_for_eval(spec, dtype, device or default_device())
        return model, tokenizer, ""
    base, adapter = resolve_artifact(spec)
    if adapter is None and delta_round(base):  # a delta-stored full-fine-tuning round: restored, handed over loaded
        model, tokenizer, _, _ = load_for_eval(base, dtype, device or default_device())
        return model, tokenizer, ""
    return resolve_model_path(base), None, f"peft={adapter}" if adapter else ""


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_lm_eval(
    model: Any,
    tasks: Sequence[str] | None = None,
    data_dir: Path | None = None,
    limit: int | None = None,
    seed: int = 1234,
    batch_size: int = 16,
    num_fewshot: int = 0,
    tokenizer: Any = None,
    model_args: str = "",
    device: str | None = None,
    dtype: str = "float32",
    max_gen_toks: int = 256,
    log_samples: bool = False,
    data_files: dict[str, Path] | None = None,
) -> dict[str, dict]:
    """Evaluate with lm-evaluation-harness's ``hf`` backend; results in :func:`evaluate_suite`'s format.

    ``model`` is a path/hub id (passed as ``pretrained=``, plus ``model_args`` such as
    ``peft=ADAPTER_DIR``) or a loaded transformers model (then give ``tokenizer``). Data comes from
    ``data_dir`` (or ``$CAIRN_DATA``) through :func:`write_local_tasks`; without local data lm-eval
    loads its own Hugging Face datasets, and ``limit`` then takes lm-eval's first N. Each result's
    ``seconds`` is the task's wall time in lm-eval, ``model_seconds`` the part spent answering requests.
    ``device`` defaults to cuda when available; ``dtype`` is the weights' dtype of a model given by path.
    A ``cairn eval`` MODEL spec (run directory, adapter folder) is turned into these by :func:`resolve_model`.
    """
    _require()
    import time

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if limit is not None and limit < 1:
        raise CairnError(f"limit must be a positive number of questions per task, got {limit}")
    names = suites.resolve_tasks(tasks)
    data_dir = Path(data_dir) if data_dir is not None else suites.default_data_dir()
    device = device or default_device()
    if isinstance(model, (str, Path)):
        args = f"pretrained={model},dtype={dtype}" + (f",{model_args}" if model_args else "")
        lm = HFLM(**dict(kv.split("=", 1) for kv in args.split(",")), batch_size=batch_size, device=device)
    else:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    model_seconds = _time_requests(lm)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cairn-lm-eval-") as tmp:
        if data_dir is not None or data_files:
            info = write_local_tasks(Path(tmp), names, data_dir, limit, seed, num_fewshot, data_files)
            manager = TaskManager(include_path=tmp)
            run_limit = None  # the files already hold exactly the selected questions
        else:
            info = {n: {"lm_eval_task": suites.OLD_KNOWLEDGE_TASKS[n].lm_eval_task, "bracket_rows": 0,
                        "source": "hf (lm-eval)"} for n in names}
            manager, run_limit = TaskManager(), limit
        for name in names:  # one task per call, so each gets its own wall-clock time
            spec = suites.OLD_KNOWLEDGE_TASKS[name]
            task = info[name]["lm_eval_task"]
            start, model_seconds[0] = time.perf_counter(), 0.0
            out = lm_eval.simple_evaluate(model=lm, tasks=[task], num_fewshot=num_fewshot, limit=run_limit,
                                          task_manager=manager, log_samples=log_samples, random_seed=seed,
                                          gen_kwargs={"max_gen_toks": max_gen_toks} if spec.kind == "generate" else None,
                                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                          )
            seconds = time.perf_counter() - start
            res = out["results"][task]
            entry: dict[str, Any] = {}
            n = int(out.get("n-samples", {}).get(task, {}).get("effective", 0)) or None
            for m in spec.metrics:
                entry[m] = float(res[_METRIC_KEYS[m]])
                stderr = res.get(_METRIC_KEYS[m].replace(",", "_stderr,", 1))
                entry[f"{m}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else float("nan")
            entry.update(n=n, primary_metric=spec.primary, primary=entry[spec.primary],
                         primary_stderr=entry[f"{spec.primary}_stderr"], seconds=round(seconds, 3),
                         model_seconds=round(model_seconds[0], 3),
                         questions_per_second=round(n / seconds, 3) if n and seconds > 0 else None,
                         source=info[name]["source"], backend="lm-eval", bracket_rows=info[name]["bracket_rows"])
            if log_samples:
                entry["details"] = sorted(out["samples"][task], key=lambda s: s["doc_id"])
            results[name] = entry
    return results
