"""bf16 scoring of the old-knowledge suite: how far bf16 log-likelihoods are from float32, and whether
the re-ranking keeps float32's predictions — both precisions in the same run, on the same questions.

For each task: score every question in float32, and in ``precision="bf16"`` mode (bf16 autocast,
then float32 again for the questions ``cairn.eval.suites.near_tie`` flags). Prints the largest
bf16-vs-float32 error of a choice divided by the square root of its scored tokens (the quantity
``BF16_TOKEN_TOLERANCE`` must bound; the largest error per token is printed too), how many
questions bf16 alone would have predicted differently, how many the mode re-scored, how many of the
mode's predictions differ from float32 (must be 0), and the time ratio float32 / bf16-mode.
On a CPU without bf16 units (no AVX512-BF16/AMX) bf16 is emulated and the ratio is below 1; the
speed-up is for GPUs. The error figures hold for any device.

    python benchmarks/eval_precision.py --limit 200 --data-dir DATA
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--data-dir", type=Path, default=_default_data_dir())
    p.add_argument("--device", default=None)
    p.add_argument("--tolerance", type=float, default=None,
                   help="nats per sqrt(scored tokens) (default: the shipped one)")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    from cairn.eval import suites
    from cairn.eval.multiple_choice import continuation_token_counts, score_pairs
    from cairn.models import load_model, load_tokenizer

    if args.data_dir is None:
        print("no data: set CAIRN_DATA or pass --data-dir", file=sys.stderr)
        return 1
    tol = args.tolerance or suites.BF16_TOKEN_TOLERANCE
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(args.model, dtype="float32").to(device).eval()
    tokenizer = load_tokenizer(args.model)
    tasks = [t for t in suites.resolve_tasks(args.tasks) if suites.OLD_KNOWLEDGE_TASKS[t].kind != "generate"]
    rows, worst_tok, t32, t16 = [], 0.0, 0.0, 0.0
    for name in tasks:
        spec = suites.OLD_KNOWLEDGE_TASKS[name]
        _, _, docs = suites.load_task_docs(spec, args.data_dir, args.limit, args.seed)
        questions = [d.pairs for d in docs]
        start = time.perf_counter()
        exact = score_pairs(model, tokenizer, questions, batch_size=args.batch_size)
        s32 = time.perf_counter() - start
        start = time.perf_counter()  # the bf16 mode in its two steps, so its raw bf16 numbers can be inspected
        raw = score_pairs(model, tokenizer, questions, batch_size=args.batch_size, autocast=torch.bfloat16)
        final, flagged = suites.rescore_near_ties(model, tokenizer, docs, raw, tol, args.batch_size)
        s16 = time.perf_counter() - start
        counts = continuation_token_counts(tokenizer, questions)
        err = max(abs(a - b) / n ** 0.5 for r, e, c in zip(raw, exact, counts) for a, b, n in zip(r, e, c))
        per_token = max(abs(a - b) / n for r, e, c in zip(raw, exact, counts) for a, b, n in zip(r, e, c))
        pred = [suites.mc_predictions(ll, d.choices) for ll, d in zip(exact, docs)]
        raw_diff = sum(suites.mc_predictions(ll, d.choices) != p_ for ll, d, p_ in zip(raw, docs, pred))
        mode_diff = sum(suites.mc_predictions(ll, d.choices) != p_ for ll, d, p_ in zip(final, docs, pred))
        worst_tok, t32, t16 = max(worst_tok, err), t32 + s32, t16 + s16
        row = {"task": name, "n": len(docs), "max_error_per_sqrt_token": err, "max_error_per_token": per_token,
               "bf16_alone_differs": raw_diff, "rescored": len(flagged), "mode_differs": mode_diff,
               "float32_s": s32, "bf16_mode_s": s16,
               "ratio": s32 / s16}
        rows.append(row)
        print(f"{name:<15} n={len(docs):<4} max |bf16-fp32|/sqrt(tokens) {err:.4f} (tolerance {tol}; per token "
              f"{per_token:.4f})  bf16 alone "
              f"differs on {raw_diff}  re-scored {len(flagged)}  bf16 mode differs on {mode_diff}  "
              f"fp32 {s32:.1f}s bf16-mode {s16:.1f}s = {s32 / s16:.2f}x", flush=True)
    print(f"overall: largest error {worst_tok:.4f} nats/sqrt(token) vs tolerance {tol}; time float32/bf16-mode "
          f"{t32 / t16:.2f}x on {device.type}; predictions differing from float32: "
          f"{sum(r['mode_differs'] for r in rows)}")
    if args.output:
        from cairn import atomic

        atomic.write_json(args.output, {"model": args.model, "device": str(device), "tolerance": tol,
                                        "tasks": rows, "max_error_per_sqrt_token": worst_tok, "ratio": t32 / t16})
    return 0


if __name__ == "__main__":
    sys.exit(main())
