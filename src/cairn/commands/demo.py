"""``cairn demo``: the built-in main job.

The built-in model (SmolLM2-135M-Instruct) learns three domains of invented facts in sequence, once
with LoRA and once with full fine-tuning, is evaluated on every domain (64 test questions each) after
every round and on a fixed subset of the old-knowledge suite before and after, and the tables are
printed with their intervals: both halves of the seed paper's LoRA-vs-FFT comparison (new knowledge
learned and kept; old knowledge kept) and the findings they support or not. The config is
``cairn/resources/demo.yaml`` (also shipped as ``configs/demo.yaml``).

The old-knowledge column needs the suite's data: ``--data-dir`` or ``$CAIRN_DATA`` (a folder laid out
like ``old_knowledge/<task>/...``). Without either the demo runs without it and says so; it never
downloads anything.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path


def demo_config_path() -> Path:
    return Path(str(resources.files("cairn.resources").joinpath("demo.yaml")))


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="built-in demo: the built-in model learns 3 fictional domains with LoRA and FFT",
        description="Run the built-in demo: SmolLM2-135M learns three domains of invented facts in sequence "
                    "with LoRA and with full fine-tuning, evaluated after every round on 64 questions per domain, "
                    "and on an old-knowledge subset (ARC-Easy, PIQA) before and after when a data pack is given; "
                    "prints the tables with 95% intervals and the findings. About 10 minutes on a 2-core CPU (estimated from each part's measured "
                    "CPU time: benchmarks/demo_budget.py).",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="experiment directory (default: runs/demo)")
    p.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                   help="data pack for the old-knowledge column (old_knowledge/<task>/...; default: $CAIRN_DATA)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a demo config value (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def old_knowledge_source(data_dir: Path | None) -> Path | None:
    """The data pack for the old-knowledge column: the flag, else $CAIRN_DATA, else none (the suite's own
    precedence, :func:`cairn.eval.suites.old_knowledge_dir`; the demo's tasks are built in, so no
    experiment data_dir takes part)."""
    from cairn.eval.suites import old_knowledge_dir

    return old_knowledge_dir(str(data_dir) if data_dir is not None else None, None)


def run(args: argparse.Namespace) -> int:
    import time

    from cairn.config import load_config
    from cairn.errors import CairnError
    from cairn.experiment import run_experiment

    cfg = load_config(demo_config_path(), args.overrides)
    ok = cfg.evaluation.old_knowledge
    if ok is not None and ok.data_dir is None:
        src = old_knowledge_source(args.data_dir)
        if src is None:
            print("note: no data pack (--data-dir or $CAIRN_DATA): the old-knowledge column is off.")
            cfg.evaluation.old_knowledge = None
        elif not src.is_dir():
            raise CairnError(f"--data-dir {src}: no such directory; give the folder that holds old_knowledge/")
        else:
            ok.data_dir = str(src)
    t0 = time.perf_counter()
    outcome = run_experiment(cfg, args.out, progress=not args.no_progress)
    elapsed = time.perf_counter() - t0
    print_summary(args.out, outcome["status"])
    print(f"\nexperiment directory: {args.out}  ({elapsed / 60:.1f} min)")
    return 0 if all(s == "ok" for s in outcome["status"].values()) else 1


def print_summary(out: Path, status: dict[str, str]) -> None:
    """Each method's round table, then the comparison with intervals, the significance marks and the findings."""
    from cairn.report import build_report
    from cairn.report.findings import findings_table
    from cairn.report.runs import load_runs
    from cairn.report.tables import comparison_tables, new_knowledge_table, significance_table, to_markdown

    for name, s in status.items():
        if s != "ok":
            print(f"\nmethod {name}: {s} (see {out / name / 'log.txt'})")
    if not any(s == "ok" for s in status.values()):
        return
    runs = load_runs([out]).runs
    for r in runs:
        print("\n" + to_markdown(new_knowledge_table(r.results, r.label, spec=r.spec)))
    for t in comparison_tables(runs, old_intervals=True):
        print("\n" + to_markdown(t))
    sig = significance_table(runs)
    if sig is not None:
        print("\n" + to_markdown(sig))
    if len(runs) > 1:
        print("\n" + to_markdown(findings_table(runs)))
    print(f"report: {build_report([out])}")
