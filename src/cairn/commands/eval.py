"""``cairn eval``: score a model, a PEFT adapter or a run's artifact on the old-knowledge suite.

The suite (MMLU, ARC, HellaSwag, PIQA, WinoGrande, OpenBookQA, CommonsenseQA, optionally GSM8K)
follows lm-evaluation-harness's task definitions (Gao et al., Zenodo 10256836), as used by the seed
paper (Lee & Wynter 2024) to measure old-knowledge retention; see :mod:`cairn.eval.suites`.
``--backend lm-eval`` runs lm-evaluation-harness itself on the same questions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cairn.errors import CairnError

SUITES = ["old-knowledge"]


def register(subparsers) -> None:
    from cairn.eval.suites import OLD_KNOWLEDGE_TASKS

    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on the old-knowledge suite (MMLU, ARC, HellaSwag, ...)",
        description="Evaluate MODEL (a built-in name, a Hugging Face model folder or hub id, a PEFT adapter folder, "
        "a run's round folder (a full-fine-tuning round stored as a delta is restored through its earlier "
        "rounds), or a run directory: its last round's artifact) on the old-knowledge suite, with "
        "lm-evaluation-harness's prompts and metrics. Tasks: " + ", ".join(OLD_KNOWLEDGE_TASKS) + ".",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL",
                   help="model spec, PEFT adapter folder, round folder (rounds/NN-<task>/), or run directory")
    p.add_argument("--suite", default="old-knowledge", choices=SUITES, help="which suite to run")
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                   help="tasks to run (default: the 8 multiple-choice tasks; 'all' adds gsm8k)")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate a seeded random subset of N questions per task (default: all)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the --limit subsample")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder laid out like the data pack (old_knowledge/<task>/..., gsm8k/test.jsonl); "
                   "default: $CAIRN_DATA, else the Hugging Face hub")
    p.add_argument("--data-file", action="append", default=[], metavar="TASK=FILE",
                   help="use FILE (JSONL, the Hugging Face column schema) for TASK; repeatable")
    p.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples (mmlu and gsm8k only)")
    p.add_argument("--batch-size", type=int, default=16, help="questions (packed rows) per forward pass")
    p.add_argument("--max-gen-toks", type=int, default=256, help="generation budget per GSM8K question")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (bfloat16 pays off on GPUs; on CPUs without bf16 units it is slower)")
    p.add_argument("--precision", default="float32", choices=["float32", "bf16"],
                   help="bf16: score under bf16 autocast and re-score in float32 every question bf16 could "
                   "flip (same predictions as float32; faster on GPUs with bf16 units; needs --dtype float32)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--backend", default="cairn", choices=["cairn", "lm-eval"],
                   help="cairn's batched scorer, or lm-evaluation-harness itself (pip install lm-eval)")
    p.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def _parse_data_files(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        task, sep, file = item.partition("=")
        if not sep or not task or not file:
            raise CairnError(f"--data-file expects TASK=FILE, got {item!r}")
        if not Path(file).is_file():
            raise CairnError(f"--data-file {item}: {file} does not exist")
        out[task] = Path(file)
    return out


def resolve_artifact(spec: str) -> tuple[str, str | None]:
    """(base model spec, adapter folder or None) for a model spec, adapter folder or run directory."""
    from cairn.rundir import MethodDir, round_artifact

    path = Path(spec).expanduser()
    own = round_artifact(path) if path.is_dir() and path.parent.name == "rounds" else None
    if own is not None:  # a round folder, rounds/NN-<task>/: its model or adapter
        path = own
    if path.is_dir() and not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        artifacts = [a for a in (round_artifact(r) for r in MethodDir(path).rounds()) if a is not None]
        if not artifacts:
            raise CairnError(f"{path} is not a model folder (no config.json), not a PEFT adapter (no "
                             "adapter_config.json), and not a run directory with rounds/NN-<task>/{model,adapter} "
                             "artifacts")
        path = artifacts[-1]
        print(f"[cairn] evaluating the last round's artifact: {path}")
    if (path / "adapter_config.json").is_file():
        from cairn.rundir import require_standalone  # [wire] an adapter trained on merged rounds: refuse

        require_standalone(path, "`cairn eval` of the adapter alone")
        try:
            config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CairnError(f"{path / 'adapter_config.json'} is not valid JSON ({exc})") from None
        base = config.get("base_model_name_or_path")
        if not base:
            raise CairnError(f"{path / 'adapter_config.json'} has no base_model_name_or_path; cannot tell which "
                             "base model the adapter belongs to")
        return base, str(path)
    return spec if not path.is_dir() else str(path), None


def delta_round(path: str) -> bool:
    """Whether ``path`` is a full-fine-tuning round's ``model/`` stored as a delta (storage.fft_format: delta)."""
    from cairn.io.fft_round import is_delta

    return Path(path).is_dir() and is_delta(Path(path))


def load_for_eval(spec: str, dtype: str = "float32", device: str | None = None):
    """(model, tokenizer, base path, adapter) for a model spec / adapter / run dir, ready for scoring."""
    import torch

    from cairn import models

    from cairn.rundir import MethodDir

    path = Path(spec).expanduser()
    if MethodDir(path).is_method_dir():  # a method's run directory: rebuilt as a resumed run would
        from cairn.experiment import load_method_model

        model, tokenizer = load_method_model(path)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return model.to(device).eval(), tokenizer, str(path), None
    base, adapter = resolve_artifact(spec)
    tokenizer = models.load_tokenizer(adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else base)
    if adapter is None and delta_round(base):  # a full-fine-tuning round stored as a delta: its chain restored
        from cairn.io.fft_round import load_round

        model = load_round(Path(base)).to(getattr(torch, dtype))
    else:
        model = models.load_model(base, dtype=dtype)
    if adapter:
        from peft import PeftModel
        from safetensors import SafetensorError

        from cairn.errors import load_safetensors

        if (Path(adapter) / "adapter_model.safetensors").is_file():  # a truncated file is named, not traced
            load_safetensors(Path(adapter) / "adapter_model.safetensors")
        try:
            model = PeftModel.from_pretrained(model, adapter)
        except (RuntimeError, ValueError, KeyError, SafetensorError) as exc:  # robust guard: wrong base, bad file
            raise CairnError(f"adapter {adapter} does not fit the base model {base} or is corrupt: "
                             f"{str(exc).splitlines()[0]}") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer, base, adapter


def _print_table(results: dict[str, dict]) -> None:
    print(f"{'task':<16}{'n':>6}  {'metric':<22}{'value':>8}  {'stderr':>7}  {'q/s':>7}")
    for name, r in results.items():
        metrics = [k for k in r if k.endswith("_stderr") and k != "primary_stderr"]
        for i, key in enumerate(metrics):
            m = key[: -len("_stderr")]
            mark = " *" if m == r["primary_metric"] else ""
            qps = r.get("questions_per_second") if i == 0 else None
            print(f"{name if i == 0 else '':<16}{r['n'] if i == 0 else '':>6}  {m + mark:<22}{r[m]:>8.4f}  "
                  f"{r[key]:>7.4f}  {qps if qps is not None else '':>7}")
    print("* primary metric (acc_norm where the task defines it, else acc; gsm8k: flexible-extract)")


def run(args) -> int:
    from cairn import atomic
    from cairn.eval import suites

    if args.limit is not None and args.limit < 1:
        raise CairnError(f"--limit must be a positive number of questions per task, got {args.limit}")
    # robust guards: checked before any model loads or any question is scored
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--num-fewshot", args.num_fewshot, 0),
                             ("--max-gen-toks", args.max_gen_toks, 1)):
        if value < low:
            raise CairnError(f"{flag} must be >= {low}, got {value}")
    if args.output is not None and args.output.is_dir():
        raise CairnError(f"--output {args.output} is a directory; give a file path for the results JSON")
    tasks = suites.resolve_tasks(args.tasks)
    data_files = _parse_data_files(args.data_file)
    if data_files:
        suites.resolve_tasks(list(data_files))  # an unknown task name in --data-file is an error too
    if args.backend == "lm-eval":
        from cairn.eval import lm_eval_backend

        # ux (issue 15): run directories accepted, device picked (cuda when available), --dtype honoured
        lm_model, lm_tokenizer, model_args = lm_eval_backend.resolve_model(args.model, args.dtype, args.device)
        base = lm_model if isinstance(lm_model, str) else args.model
        adapter = model_args.partition("peft=")[2] or None
        results = lm_eval_backend.run_lm_eval(
            lm_model, tasks, data_dir=args.data_dir, limit=args.limit, seed=args.seed, tokenizer=lm_tokenizer,
            batch_size=args.batch_size, num_fewshot=args.num_fewshot, model_args=model_args,
            device=args.device, dtype=args.dtype, max_gen_toks=args.max_gen_toks, data_files=data_files)
        # end ux
    else:
        model, tokenizer, base, adapter = load_for_eval(args.model, args.dtype, args.device)
        results = suites.evaluate_suite(
            model, tokenizer, tasks, data_dir=args.data_dir, limit=args.limit, seed=args.seed,
            batch_size=args.batch_size, num_fewshot=args.num_fewshot, progress=not args.no_progress,
            max_gen_toks=args.max_gen_toks, data_files=data_files, precision=args.precision)
    _print_table(results)
    if args.output:
        atomic.write_json(args.output, {
            "model": args.model, "base_model": base, "adapter": adapter, "suite": args.suite, "backend": args.backend,
            "limit": args.limit, "seed": args.seed, "num_fewshot": args.num_fewshot, "precision": args.precision,
            "results": results})
        print(f"[cairn] wrote {args.output}")
    return 0
