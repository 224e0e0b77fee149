"""``cairn ledger [ACTION] PROJECT ...``: look at a model project and act on its releases.

Actions: list (default), show RELEASE, tree, diff A B, report [--out FILE], export RELEASE --out DIR,
merge --name N --releases A B ..., mix --name N --releases A B ..., import RUN_DIR.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ACTIONS = ["list", "show", "tree", "diff", "report", "export", "merge", "mix", "import"]


def register(sub) -> None:
    p = sub.add_parser(
        "ledger",
        help="a project's releases: list, show, tree, diff, report, export, merge, mix, import",
        description="Look at a model project (see `cairn init`): `cairn ledger PROJECT` lists the releases; "
                    "`cairn ledger show PROJECT RELEASE`, `tree PROJECT`, `diff PROJECT A B` (which probe sets rose "
                    "or fell), `report PROJECT [--out FILE]` (one self-contained HTML page), `export PROJECT RELEASE "
                    "--out DIR` (the weights a contributor trains from), `merge PROJECT --name N --releases A B "
                    "[--method ties]` (fold sibling adapter releases by merging, then gate), `mix PROJECT --name N "
                    "--releases A B [--top-k K] [--router-steps 50] [--router-lr 5e-3]` (fold sibling LoRA adapter "
                    "releases into a routed LoRA-MoE whose routers train on their probe sets, each labelling its "
                    "expert; a mixture among --releases gets the others added as experts; then gate), `import "
                    "PROJECT RUN_DIR [--method M]` (each round of a finished `cairn run` becomes a contribution; "
                    "old knowledge is gated per question when the run saved old_knowledge_items.json, else flagged "
                    "as aggregate-only).",
    )
    p.add_argument("words", nargs=argparse.REMAINDER, metavar="[ACTION] PROJECT ...",
                   help=f"action ({', '.join(ACTIONS)}; default list), the project folder, then the action's arguments")
    p.set_defaults(func=run)


def _action_parser(action: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"cairn ledger {action}")
    p.add_argument("project", type=Path)
    if action == "show":
        p.add_argument("release")
    elif action == "diff":
        p.add_argument("a")
        p.add_argument("b")
    elif action == "report":
        p.add_argument("--out", type=Path, help="HTML file (default PROJECT/report.html)")
    elif action == "export":
        p.add_argument("release")
        p.add_argument("--out", type=Path, required=True, help="folder to write (must not exist)")
    elif action == "merge":
        p.add_argument("--name", required=True)
        p.add_argument("--releases", nargs="+", required=True, help="sibling adapter releases to merge")
        p.add_argument("--method", default="ties", help="linear, task_arithmetic, ties, dare, dare_ties")
        p.add_argument("--density", type=float, default=None)
    elif action == "mix":
        p.add_argument("--name", required=True)
        p.add_argument("--releases", nargs="+", required=True,
                       help="LoRA adapter releases on one release (and at most one mixture on it, to add them to)")
        p.add_argument("--top-k", type=int, default=None, help="experts per token (default: dense)")
        p.add_argument("--router-steps", type=int, default=50, help="router training steps on the probe sets")
        p.add_argument("--router-lr", type=float, default=5e-3, help="router learning rate")
    elif action == "import":
        p.add_argument("run_dir", type=Path)
        p.add_argument("--method", help="the run's method to import (needed when it has several)")
        p.add_argument("--from", dest="parent", default="base", help="release the first round builds on")
        p.add_argument("--prefix", help="name prefix of the imported releases (default EXP-METHOD)")
    return p


def run(args: argparse.Namespace) -> int:
    from cairn.errors import CairnError
    from cairn.ledger import views
    from cairn.ledger.gate import format_table
    from cairn.ledger.project import open_project

    words = list(args.words)
    action = words.pop(0) if words and words[0] in ACTIONS else "list"
    if not words:
        raise CairnError(f"cairn ledger {action}: give the project folder (cairn ledger {action} PROJECT)")
    try:
        a = _action_parser(action).parse_args(words)
    except SystemExit as exc:  # argparse already printed the usage line
        if exc.code:
            raise CairnError(f"bad arguments for `cairn ledger {action}` (see the usage above)") from None
        return 0
    project = open_project(a.project)
    if action == "list":
        print(views.list_text(project))
    elif action == "show":
        print(views.show_text(project, a.release))
    elif action == "tree":
        print(views.tree_text(project))
    elif action == "diff":
        print(views.diff_text(project, a.a, a.b))
    elif action == "report":
        from cairn.ledger.report import build_ledger_report

        print(f"wrote {build_ledger_report(project, a.out)}")
    elif action == "export":
        from cairn.ledger.weights import export_release

        out = export_release(project, project.release(a.release), a.out)
        print(f"exported release {a.release} to {out}; train an adapter from it and contribute it with "
              f"--from {a.release}")
    elif action == "merge":
        from cairn.ledger.contribute import merge_releases

        params = {"density": a.density} if a.density is not None else {}
        out = merge_releases(project, a.name, a.releases, a.method, **params)
        print(format_table(out["gate"]))
        return 1 if out["status"] == "rejected" else 0
    elif action == "mix":
        from cairn.ledger.mix import mix_releases

        out = mix_releases(project, a.name, a.releases, top_k=a.top_k, steps=a.router_steps, lr=a.router_lr)
        print(f"release {out['release']}: a LoRA mixture of {', '.join(out['experts'])}, artifact "
              f"{out['artifact_sha'][:12]}")
        print(format_table(out["gate"]))
        return 1 if out["status"] == "rejected" else 0
    elif action == "import":
        from cairn.ledger.importer import import_run

        for s in import_run(project, a.run_dir, a.method, a.parent, a.prefix):
            print(f"release {s['release']}: {s['status']}")
    return 0
