"""``cairn demo``: the built-in main job.

The built-in model (SmolLM2-135M-Instruct) learns three domains of invented facts in sequence, once
with LoRA and once with full fine-tuning, is evaluated on every domain after every round, and the
two results tables (paper Tables 3/4 shape) are printed. The config is
``cairn/resources/demo.yaml`` (also shipped as ``configs/demo.yaml``).
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
                    "with LoRA and with full fine-tuning, evaluated after every round; prints both tables. "
                    "About 10 minutes on a 2-core CPU.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="experiment directory (default: runs/demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a demo config value (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cairn.config import load_config
    from cairn.experiment import execute

    cfg = load_config(demo_config_path(), args.overrides)
    return execute(cfg, args.out, progress=not args.no_progress)
