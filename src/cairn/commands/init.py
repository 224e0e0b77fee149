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
    p.add_argument("--policy", type=Path,
                   help="policy YAML: gate keys max_drop (points), action (reject|flag), confidence, bootstrap, seed, "
                        "old_knowledge {tasks, limit, data_dir, seed}; keep_data (true: store --data contributions' "
                        "training rows for replay); and method: a name (as --method) or a mapping in the experiment's "
                        "method form, e.g. {trainable: lora, olora: {lambda1: 0.5}, replay: 0.1, lora: {r: 16}}")
    p.add_argument("--max-drop", type=float, help="points a probe set may lose against the parent (default 5)")
    p.add_argument("--on-drop", choices=["reject", "flag"], help="what a significant drop does (default reject)")
    p.add_argument("--keep-data", action="store_true", default=None,
                   help="store the training rows of --data contributions in the artifact store (content-addressed) "
                        "so later contributions can replay them; adapters and models never store data")
    p.add_argument("--method", choices=["lora", "full", "olora", "nlora"], default=None,
                   help="how `cairn contribute --data` trains a round from the parent (default lora): sequential LoRA "
                        "merged into the weights (the seed paper), full fine-tuning, O-LoRA (LoRA orthogonal to the "
                        "lineage's earlier adapters) or N-LoRA (LoRA with an L1 penalty on its update); add replay "
                        "with --set replay=0.1 and --keep-data")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method setting, e.g. --set training.lr=2e-4 --set lora.r=16 --set seed=1 "
                        "--set olora.lambda1=0.5 --set nlora.lam=1e-4 --set replay=0.1")
    p.add_argument("--db", help="SQLAlchemy URL of the ledger (default: sqlite:///PROJECT/ledger.db)")
    p.add_argument("--store", help="artifact store URL or folder (default: PROJECT/store)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cairn.errors import CairnError
    from cairn.ledger.gate import load_policy, read_policy_file
    from cairn.ledger.method import build_method, method_spec, stored_spec
    from cairn.ledger.project import init_project

    data = read_policy_file(args.policy)
    given = data.pop("method", None)
    where = str(args.policy) if args.policy else "--method/--set"
    if given is not None and args.method is not None:
        raise CairnError(f"the method is given twice: `method:` in {args.policy} and --method {args.method}; keep one")
    policy = load_policy(args.policy, {"max_drop": args.max_drop, "action": args.on_drop, "keep_data": args.keep_data},
                         data)
    # checked in full now (names, sections, what a contribution supports), not at the first contribution
    method = build_method(method_spec(given if given is not None else args.method, args.overrides, where), where,
                          policy.keep_data)
    project = init_project(args.project, args.base, policy, stored_spec(method), args.db, args.store)
    parts = ", ".join(method.parts) or "plain"
    print(f"created project {project.path} (base {args.base}; ledger {project.db_url}; store {project.store_url}; "
          f"method {method.config.trainable} ({parts}){'; keeps --data rows' if policy.keep_data else ''})")
    print(f"next: cairn contribute {project.path} --name NAME --from base --adapter DIR --probe PROBE.jsonl "
          "--probe-metric exact_match")
    return 0
