"""Estimate the wall time of ``cairn demo`` from its parts, measured in one short process.

The demo must fit about 10 minutes on a 2-core CPU. Timing the whole demo takes that long and is
meaningless on a shared, loaded machine, so this script measures each kind of work once, in CPU time
with one thread (CPU time barely moves when other processes compete for the cores), and multiplies by
how often the demo does it:

- a few optimizer steps of each method at the demo's settings (batch, max_length, LoRA rank), round 1;
- saving each method's round artifact (an adapter, or a full model for FFT);
- one evaluation on every domain's test questions (generation);
- one old-knowledge evaluation (ARC-Easy + PIQA subset) when a data pack is given;
- each method's end-of-run diagnostics (the rounds' weight updates), on round 1's artifact standing in
  for every round (same shapes, same work).

Then: steps per round from the demo's own plan and ``total_steps``; one base evaluation plus one per
round and method; old knowledge at the base and after each method's last round (``when: last``).
Two cores run matrix work about 1.6-1.9x faster than one (never 2x: generation at batch 64 on a
135M model is partly memory- and overhead-bound), so the 2-core wall time is printed for a speed-up
of 1.7, with the single-core figure as the upper bound.

Usage: python benchmarks/demo_budget.py [--data-dir PACK] [--steps 3] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

SPEEDUP_2_CORES = 1.7


def _cpu(fn):
    t0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - t0, time.perf_counter() - w0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=None, help="data pack for the old-knowledge part")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps measured per method")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from cairn.commands.demo import demo_config_path
    from cairn.config import load_config
    from cairn.experiment import Runner
    from cairn.rundir import RoundRecord
    from cairn.train.loop import total_steps, train

    cfg = load_config(demo_config_path(), args.overrides)
    if args.data_dir is None:
        cfg.evaluation.old_knowledge = None
    else:
        cfg.evaluation.old_knowledge.data_dir = str(args.data_dir)
    tmp = Path(tempfile.mkdtemp(prefix="demo-budget-"))
    runner = Runner(cfg, tmp, progress=False, echo=False)
    quiet = lambda line: None  # noqa: E731
    rows: list[tuple[str, float, int]] = []  # (part, cpu seconds each, times in the demo)

    base, load_s, _ = _cpu(runner.load_base)
    rows.append(("load the base model", load_s, 1 + len(cfg.methods)))
    n_questions = sum(len(t.test) for t in runner.tasks)
    _, eval_s, _ = _cpu(lambda: runner.evaluate(base))
    n_rounds = {m.name: len(runner.methods[m.name].plan(runner.tasks)) for m in cfg.methods}
    rows.append((f"evaluate {n_questions} test questions", eval_s, 1 + sum(n_rounds.values())))
    if cfg.evaluation.old_knowledge is not None:
        _, ok_s, _ = _cpu(lambda: runner.old_knowledge(base, last=True))
        rows.append(("old-knowledge subset", ok_s, 1 + len(cfg.methods)))

    for mcfg in cfg.methods:
        method = runner.methods[mcfg.name]
        tcfg = cfg.training_for(mcfg)
        steps_total = 0
        for k in range(1, n_rounds[mcfg.name] + 1):
            examples, _ = method.round_examples(runner.context(mcfg, k, quiet))
            steps_total += total_steps(len(examples), tcfg)
        ctx = runner.context(mcfg, 1, quiet)
        model = method.prepare(method.restore(ctx, 0), ctx)
        examples, _ = method.round_examples(ctx)
        probe = dataclasses.replace(tcfg, max_steps=args.steps)
        result, train_s, _ = _cpu(lambda: train(model, runner.tokenizer, examples, probe, seed=cfg.seed + 1,
                                                loss_parts=method.loss_parts(model, ctx), log=quiet, progress=False))
        rows.append((f"{mcfg.name}: optimizer step (batch {tcfg.batch_size})", train_s / result.steps, steps_total))
        _, save_s, _ = _cpu(lambda: method.finish_round(model, ctx))
        rows.append((f"{mcfg.name}: save a round's artifact", save_s, n_rounds[mcfg.name]))
        del model
        if mcfg.diagnostics and n_rounds[mcfg.name] > 1:
            plan = method.plan(runner.tasks)
            for k in range(2, len(plan) + 1):  # round 1's artifact stands in for the later rounds
                rdir = ctx.mdir.round(k, plan[k - 1][0])
                for item in ctx.rdir.iterdir():
                    named = item / "round1"  # a PEFT adapter saved under its round's name
                    target = rdir / item.name / f"round{k}" if named.is_dir() else rdir / item.name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink((named if named.is_dir() else item).resolve(), target)
            records = [RoundRecord(label, []) for label in ["base"] + [p[0] for p in plan]]
            _, diag_s, _ = _cpu(lambda: runner.diagnostics(method, mcfg, ctx.mdir, records))
            rows.append((f"{mcfg.name}: diagnostics after the last round", diag_s, 1))

    total = sum(each * n for _, each, n in rows)
    print(f"{'part':<44} {'CPU s each':>10} {'times':>6} {'CPU s':>8}")
    for part, each, n in rows:
        print(f"{part:<44} {each:>10.2f} {n:>6} {each * n:>8.0f}")
    print(f"total one-core CPU time: {total / 60:.1f} min; on 2 cores (x{SPEEDUP_2_CORES} speed-up): "
          f"{total / SPEEDUP_2_CORES / 60:.1f} min (one core: {total / 60:.1f} min)")


if __name__ == "__main__":
    main()
