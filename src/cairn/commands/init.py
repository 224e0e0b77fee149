"""``cairn init PROJECT --base MODEL``: create a model project (ledger database + artifact store)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "init",
        help="create a model project that many contributors add knowledge to (ledger + artifact store)",
        description="Create a model project: a ledger database (SQLite in PROJECT by default, or --db URL, e.g. "
                    "PostgreSQL), a content-addressed artifact store (PROJECT/store, or --store URL: any fsspec "
                    "URL) and the first release, 'base'. The gate policy decides when a new release forgets "
                    "too much of what earlier contributions added.",
    )
    p.add_argument("project", type=Path, help="project folder (created)")
    p.add_argument("--base", required=True, help="base model: a built-in name, a local Hugging Face folder or a hub id")
    p.add_argument("--policy", type=Path, help="gate policy YAML: max_drop (points), action (reject|flag), "
                                               "confidence, bootstrap, seed")
    p.add_argument("--max-drop", type=float, help="points a probe set may lose against the parent (default 5)")
    p.add_argument("--on-drop", choices=["reject", "flag"], help="what a significant drop does (default reject)")
    p.add_argument("--method", choices=["lora", "full"], default="lora",
                   help="how `cairn contribute --data` trains a round from the parent: sequential LoRA merged "
                        "into the weights (the seed paper) or full fine-tuning")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method setting, e.g. --set training.lr=2e-4 --set lora.r=16 --set seed=1")
    p.add_argument("--db", help="SQLAlchemy URL of the ledger (default: sqlite:///PROJECT/ledger.db)")
    p.add_argument("--store", help="artifact store URL or folder (default: PROJECT/store)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cairn.config import TrainingConfig, _build, apply_overrides
    from cairn.methods.lora import LoraConfig
    from cairn.ledger.gate import load_policy
    from cairn.ledger.project import default_method, init_project

    policy = load_policy(args.policy, {"max_drop": args.max_drop, "action": args.on_drop})
    method = apply_overrides(default_method(args.method), args.overrides)
    _build(TrainingConfig, method["training"], "method.training", "--set")  # reject bad keys now, not at training
    _build(LoraConfig, method["lora"], "method.lora", "--set")
    project = init_project(args.project, args.base, policy, method, args.db, args.store)
    print(f"created project {project.path} (base {args.base}; ledger {project.db_url}; store {project.store_url})")
    print(f"next: cairn contribute {project.path} --name NAME --from base --adapter DIR --probe PROBE.jsonl "
          "--probe-metric exact_match")
    return 0
