"""``cairn run CONFIG.yaml [--set key=value ...] [--dry-run] [--overwrite]``: run an experiment config.

``--dry-run`` prints the resolved config and, per method, each round's training examples and optimizer
steps, and what a rerun into an existing directory would do (resume, or refuse because the settings
changed), without loading model weights (only the tokenizer and the tasks' data are read).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cairn.errors import CairnError


def register(sub) -> None:
    p = sub.add_parser(
        "run",
        help="run an experiment config (curriculum x methods), resumable",
        description="Run every method of an experiment config on its curriculum: train each round, evaluate "
                    "every task after every round, and write results, tables and a report. Rerun the same "
                    "command to resume an interrupted run; a rerun whose settings differ from the finished "
                    "rounds' refuses (naming the keys) unless --overwrite.",
    )
    p.add_argument("config", type=Path, help="experiment YAML (see configs/; keys: `cairn config schema`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set training.lr=1e-4 --set data_dir=/data/trace "
                        "--set methods.0.lora.r=16 (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="experiment directory (default: OUTPUT_DIR/NAME)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, each method's rounds, examples and steps; train nothing")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="run every method and combine step with seeds 0..N-1, into <method>/seed-<s>/ "
                        "(same as --set seeds=[0,...,N-1])")
    p.add_argument("--overwrite", action="store_true",
                   help="start again every method whose stored settings differ from this config's")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--ledger", type=Path, default=None, metavar="PROJECT",
                   help="after the run, record each sequential method's rounds as contributions of this model "
                        "project (`cairn init`), gated like `cairn ledger import`")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cairn.config import load_config

    overrides = list(args.overrides)
    if args.seeds is not None:
        if args.seeds < 1:
            raise CairnError(f"--seeds {args.seeds}: give the number of seeds to run, at least 1")
        overrides.append(f"seeds=[{', '.join(map(str, range(args.seeds)))}]")
    cfg = load_config(args.config, overrides)
    out = args.out if args.out else Path(cfg.output_dir) / cfg.name
    if args.dry_run:
        print(dry_run(cfg, out))
        return 0
    from cairn import verbosity
    from cairn.experiment import execute

    project = None
    if args.ledger is not None:  # opened first: a wrong project path fails before any training
        from cairn.ledger.project import open_project

        project = open_project(args.ledger)
    code = execute(cfg, out, progress=not args.no_progress, overwrite=args.overwrite,
                   echo=verbosity.echo_enabled())
    if project is not None and code == 0:
        record_in_ledger(project, cfg, out)
    return code


def record_in_ledger(project, cfg, out: Path) -> None:
    """Each sequential method's rounds (each seed's) become a chain of contributions from the base."""
    from cairn.ledger.importer import import_run
    from cairn.rundir import RunDir

    for method in cfg.methods:
        if method.strategy != "sequential":
            continue
        for mdir in RunDir(out).method_dirs(method.name):
            seed = f"-{mdir.path.name}" if mdir.path.name.startswith("seed-") else ""
            rows = import_run(project, mdir.path, prefix=f"{cfg.name}-{method.name}{seed}")
            for row in rows:
                print(f"ledger {project.path}: release {row['release']} {row['status']}")


def dry_run(cfg, out: Path) -> str:
    """The plan of ``cfg`` run into ``out`` as text: config, rounds, examples, steps, resume state.

    Built on ``Runner.plan`` / ``Runner.round_examples`` and the loop's ``total_steps``; no weights load.
    """
    import json

    from cairn.config import to_yaml
    from cairn.experiment import Runner
    from cairn.fingerprint import FILE_NAME, describe, diff, method_fingerprint
    from cairn.train.loop import total_steps

    runner = Runner(cfg, out, progress=False, echo=False)
    lines = ["# resolved config", to_yaml(cfg).rstrip(), "", f"# plan (experiment directory: {out})"]
    if cfg.tracking.report_to:
        lines.append(f"tracking: {', '.join(cfg.tracking.report_to)} -> {cfg.tracking.log_dir or out / 'tracking'} "
                     "(one run per method)")
    seeds = list(cfg.seeds or []) or [None]
    if cfg.seeds:
        lines.append(f"seeds: {', '.join(map(str, cfg.seeds))} (each method and combine step once per seed, "
                     f"into <method>/seed-<s>/; base/ shared)")
    for method, seed in ((m, s) for m in cfg.methods for s in seeds):
        runner.seed = seed
        tcfg = cfg.training_for(method)
        mdir = runner.method_dir(method.name).path
        lines.append(f"\n{method.name}{'' if seed is None else f' (seed {seed})'}: {method.strategy} {method.trainable}"
                     + (f" (lora r={method.lora.r}, {method.lora.sequential})" if method.trainable == "lora" else "")
                     + f", lr={tcfg.lr:g}, batch {tcfg.batch_size}x{tcfg.grad_accum}"
                     + (f", max_steps={tcfg.max_steps}" if tcfg.max_steps else f", epochs={tcfg.epochs:g}"))
        stored = mdir / FILE_NAME
        if stored.is_file():
            changes = diff(json.loads(stored.read_text(encoding="utf-8")),
                           json.loads(json.dumps(method_fingerprint(cfg, method, seed), default=str)))
            lines.append(f"  existing run: {'settings unchanged, resumes' if not changes else 'settings differ (' + describe(changes) + '): refuses without --overwrite'}")
        total_steps_all = 0
        composed = runner.methods[method.name]  # report2: the method seam (arch) replaced Runner.plan/round_examples
        for k, (label, task_ids) in enumerate(composed.plan(runner.tasks), start=1):
            examples, record = composed.round_examples(runner.context(method, k, lambda line: None))
            steps = total_steps(len(examples), tcfg)
            total_steps_all += steps
            done = (mdir / "rounds" / f"{k:02d}-{label}" / "round.json").is_file()
            extra = " (with replay)" if record.get("replay") else " (joint)" if record.get("joint") else ""
            lines.append(f"  round {k}: {label:<24} {len(examples):>6} examples{extra:<14} {steps:>6} steps"
                         + ("  [done]" if done else ""))
        lines.append(f"  total: {total_steps_all} optimizer steps on one process (N processes: about N times fewer)")
    for comb in cfg.combine:
        lines.append(f"\n{comb.name}: {comb.kind} ({comb.method if comb.kind == 'merge' else 'moe'}) of "
                     f"{comb.source}'s one-round artifacts"
                     + (", routers trained" if comb.router_training is not None else ""))
    return "\n".join(lines)
