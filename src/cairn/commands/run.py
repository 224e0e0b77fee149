"""``cairn run CONFIG.yaml [--set key=value ...]``: run an experiment config end to end."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "run",
        help="run an experiment config (curriculum x methods), resumable",
        description="Run every method of an experiment config on its curriculum: train each round, evaluate "
                    "every task after every round, and write results, tables and a report. Rerun the same "
                    "command to resume an interrupted run.",
    )
    p.add_argument("config", type=Path, help="experiment YAML (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set training.lr=1e-4 --set data_dir=/data/trace "
                        "--set methods.0.lora.r=16 (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="experiment directory (default: OUTPUT_DIR/NAME)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cairn.config import load_config
    from cairn.experiment import execute

    cfg = load_config(args.config, args.overrides)
    return execute(cfg, args.out, progress=not args.no_progress)
