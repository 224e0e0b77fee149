"""Old-knowledge suite throughput and agreement: cairn's scorer vs lm-evaluation-harness, same run.

Both evaluate the same model (the built-in smollm2-135m unless --model says otherwise; lm-eval gets it
as ``pretrained=<dir>`` through its Hugging Face backend), on the same questions (the seeded subsample
of the local data pack, handed to lm-eval through task YAMLs that include lm-eval's own task
definitions, see ``cairn.eval.lm_eval_backend``), with the same batch size and float32 weights,
one task after the other in the same process. Prints per task: both accuracies, their difference
in points, the questions that the two predicted differently, questions/s of each and the ratio;
then the overall ratio (total questions / total seconds). Two ratios: end to end (each side's wall
time for the task: cairn's data loading and scoring; lm-eval's task building, requests and metrics
— what a user waits for) and scoring only (cairn's scorer vs the time lm-eval spends inside its
model's request methods). Goal: >= 2x lm-eval's throughput with every accuracy within 0.1 point.

    pip install lm-eval            # optional benchmark dependency
    python benchmarks/eval.py --limit 200 --batch-size 16
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _default_data_dir() -> Path | None:
    if os.environ.get("CAIRN_DATA"):
        return Path(os.environ["CAIRN_DATA"])
    guess = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    return guess.resolve() if guess.is_dir() else None


def _disagreements(name: str, ours: dict, theirs: dict, metric: str) -> int | None:
    """Questions where the two backends' correctness differs on ``metric`` (from per-question details)."""
    a, b = ours.get("details"), theirs.get("details")
    if metric.startswith("exact_match") and b:  # lm-eval logs one sample per question and answer filter
        key = "strict" if metric.endswith("strict") else "flexible"
        filt = "strict-match" if key == "strict" else "flexible-extract"
        b = [y for y in b if y.get("filter", filt) == filt]
        if not a or len(a) != len(b):
            return None
        return sum(1 for x, y in zip(a, b) if x[key] != y["filtered_resps"][0])  # extracted answers differ
    if not a or not b or len(a) != len(b):
        return None
    pred = "pred_norm" if metric == "acc_norm" else "pred"
    return sum(1 for x, y in zip(a, b) if float(x[pred] == x["gold"]) != float(y[metric]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model spec (built-in name or folder)")
    p.add_argument("--tasks", nargs="+", default=None, help="tasks (default: the 8 multiple-choice tasks)")
    p.add_argument("--limit", type=int, default=200, help="questions per task (seeded subsample)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--data-dir", type=Path, default=_default_data_dir())
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--max-gen-toks", type=int, default=256)
    p.add_argument("--output", type=Path, default=None, help="write all numbers as JSON here")
    args = p.parse_args(argv)

    import torch

    from cairn.eval import lm_eval_backend, suites
    from cairn.models import load_model, load_tokenizer, resolve_model_path

    if not lm_eval_backend.available():
        print("lm-eval is not installed: pip install lm-eval", file=sys.stderr)
        return 1
    if args.data_dir is None:
        print("no data: set CAIRN_DATA or pass --data-dir (a folder laid out like the data pack)", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = suites.resolve_tasks(args.tasks)
    path = resolve_model_path(args.model)
    model, tokenizer = load_model(args.model, dtype="float32").eval(), load_tokenizer(args.model)

    rows, total = [], {"ours_q": 0, "ours_s": 0.0, "theirs_q": 0, "theirs_s": 0.0, "ours_score_s": 0.0,
                          "theirs_model_s": 0.0}
    for name in tasks:
        common = dict(data_dir=args.data_dir, limit=args.limit, seed=args.seed, batch_size=args.batch_size,
                      max_gen_toks=args.max_gen_toks)
        start = time.perf_counter()
        ours = suites.evaluate_suite(model, tokenizer, [name], progress=False, return_details=True, **common)[name]
        ours_s = time.perf_counter() - start
        start = time.perf_counter()
        theirs = lm_eval_backend.run_lm_eval(path, [name], log_samples=True, **common)[name]
        theirs_s = time.perf_counter() - start  # includes lm-eval's task building, as a user would pay it
        spec = suites.OLD_KNOWLEDGE_TASKS[name]
        row = {"task": name, "n": ours["n"], "ours_seconds": round(ours_s, 2), "lm_eval_seconds": round(theirs_s, 2),
               "ratio": round(theirs_s / ours_s, 3), "ours_scoring_seconds": ours["seconds"],
               "lm_eval_model_seconds": theirs["model_seconds"],
               "scoring_ratio": round(theirs["model_seconds"] / ours["seconds"], 3),
               "bracket_rows": theirs.get("bracket_rows", 0)}
        for m in spec.metrics:
            row[m] = {"ours": ours[m], "lm_eval": theirs[m], "diff_points": round(100 * (ours[m] - theirs[m]), 3),
                      "ours_stderr": ours[f"{m}_stderr"], "disagreements": _disagreements(name, ours, theirs, m)}
        rows.append(row)
        total["ours_q"] += ours["n"]
        total["ours_s"] += ours_s
        total["theirs_q"] += theirs["n"] or 0
        total["theirs_s"] += theirs_s
        total["ours_score_s"] += ours["seconds"]
        total["theirs_model_s"] += theirs["model_seconds"]
        print(f"{name:<15} n={ours['n']:<4} " + "  ".join(
            f"{m}: cairn {row[m]['ours']:.4f}±{row[m]['ours_stderr']:.4f} lm-eval {row[m]['lm_eval']:.4f} "
            f"(diff {row[m]['diff_points']:+.2f} pt, {row[m]['disagreements']} q differ)" for m in spec.metrics)
            + f"  | {ours['n'] / ours_s:.2f} vs {ours['n'] / theirs_s:.2f} q/s = {row['ratio']:.2f}x end to end, "
            f"{row['scoring_ratio']:.2f}x scoring only", flush=True)

    ratio = (total["ours_q"] / total["ours_s"]) / (total["theirs_q"] / total["theirs_s"])
    scoring_ratio = total["theirs_model_s"] / total["ours_score_s"]
    worst = max(abs(r[m]["diff_points"]) for r in rows for m in suites.OLD_KNOWLEDGE_TASKS[r["task"]].metrics)
    print(f"overall: cairn {total['ours_q'] / total['ours_s']:.3f} q/s, lm-eval {total['theirs_q'] / total['theirs_s']:.3f} "
          f"q/s, ratio {ratio:.2f}x end to end, {scoring_ratio:.2f}x scoring only (goal >= 2x); largest accuracy difference {worst:.2f} point (goal <= 0.1)")
    if args.output:
        from cairn import atomic

        atomic.write_json(args.output, {"model": args.model, "limit": args.limit, "seed": args.seed,
                                        "batch_size": args.batch_size, "threads": torch.get_num_threads(),
                                        "tasks": rows, "overall_ratio": ratio, "overall_scoring_ratio": scoring_ratio,
                                        "max_diff_points": worst})
    return 0


if __name__ == "__main__":
    sys.exit(main())
