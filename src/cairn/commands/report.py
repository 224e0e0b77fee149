"""``cairn report``: tables, plots and one HTML page from saved results (no model needed)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="build tables, plots and an HTML page from saved results",
        description=(
            "Build the paper-style tables (Markdown, CSV, LaTeX), plots (PNG; with the training-loss curves "
            "from each round's train_log.jsonl) and one self-contained report.html from saved results only. Each RUN_DIR is a run directory (with results.json) "
            "or an experiment directory (with experiment.json and one run directory per method, or "
            "<method>/seed-<s>/ per seed); several are compared as methods. Seeds give mean ± sd; single "
            "seeds get per-item bootstrap intervals; with several methods the report adds a significance "
            "table and a findings section (the papers' claims: supports / contradicts / cannot tell)."
        ),
    )
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run or experiment directory")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="where to write the report (default: RUN_DIR/report of the first RUN_DIR)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cairn.report import build_report  # matplotlib is imported only when a report is built

    path = build_report(args.run_dirs, args.out)
    print(f"report written to {path}")
    print(f"tables and plots in {path.parent}")
    return 0
