"""``cairn contribute PROJECT --name N --from RELEASE (--data|--adapter|--model) --probe P``: add knowledge."""

from __future__ import annotations

import argparse
import getpass
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "contribute",
        help="add a contribution to a project: train (--data) or check (--adapter/--model), gate, record",
        description="Add one contribution as a new release built from --from. With --data cairn trains a round "
                    "from that release with the project's method (fully cooperative; set at `cairn init`: sequential "
                    "LoRA or full fine-tuning, O-LoRA against the lineage's earlier adapters, N-LoRA, replay of "
                    "earlier contributions' stored data when the project keeps data); with --adapter or --model "
                    "the artifact was trained elsewhere from `cairn ledger export PROJECT RELEASE` and cairn checks "
                    "it is built on that release (semi-cooperative; the data never leaves the contributor). The "
                    "new release is scored on every earlier probe set and the gate accepts, flags or rejects it. "
                    "Exit status: 0 accepted or flagged, 1 rejected by the gate (recorded), 2 bad input (nothing "
                    "recorded). A mixture (`cairn ledger mix`) is not built on: contribute from its host release and add "
                    "the new adapter to the mixture.",
    )
    p.add_argument("project", type=Path, help="project folder (see `cairn init`)")
    p.add_argument("--name", required=True, help="name of the contribution and of the release it makes")
    p.add_argument("--from", dest="parent", required=True, help="the release it is built on (e.g. base)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="folder with train.jsonl of {prompt, answer}: cairn trains the round "
                     "with the project's method (rows stored for replay only if the project keeps data)")
    src.add_argument("--adapter", type=Path, help="PEFT LoRA adapter trained from the release")
    src.add_argument("--model", type=Path, help="full model fine-tuned from the release")
    p.add_argument("--probe", type=Path, required=True, help="JSONL of held-out {prompt, answer} that later releases must keep")
    p.add_argument("--probe-metric", help="metric of the probe set (exact_match, accuracy, rouge_l, ...)")
    p.add_argument("--contributor", default=None, help="who contributes (default: the user name)")
    p.add_argument("--fingerprint-data", type=Path,
                   help="semi-cooperative: a folder with train.jsonl to hash and count locally (never stored)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cairn.ledger.contribute import contribute
    from cairn.ledger.gate import format_table
    from cairn.ledger.project import open_project

    project = open_project(args.project)
    out = contribute(project, args.name, args.parent, args.contributor or getpass.getuser(), data=args.data,
                     adapter=args.adapter, model=args.model, probe=args.probe, probe_metric=args.probe_metric,
                     fingerprint_data=args.fingerprint_data, progress=not args.no_progress)
    print(f"release {out['release']} from {args.parent}: artifact {out['artifact_sha'][:12]}, "
          f"{out['wall_seconds']:.1f} s")
    print(format_table(out["gate"]))
    return 1 if out["status"] == "rejected" else 0
