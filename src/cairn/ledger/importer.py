"""Import a finished ``cairn run`` into a project: each round of a method becomes a contribution.

A method directory (``runs/<exp>/<method>/`` or ``.../<method>/seed-<s>/``) holds ``results.json``
(tasks and metrics), ``rounds/NN-<task>/{round.json, predictions.json, adapter|model}`` and the
experiment's ``base/predictions.json``; a full-fine-tuning round stored as a delta is imported as the
full model it restores to. Round k is recorded as a release built on round k-1 (on the
chosen release for the first round, or for every round of a one-round method) with the round's
artifact; the task's test questions become its probe set, and every evaluation is re-scored item by
item from the stored predictions, so an import evaluates nothing and needs no GPU. The gate runs on
those scores exactly as for a contribution. All rounds are recorded in one transaction.

Old knowledge, when the policy names ``old_knowledge`` tasks, comes from the run's own evaluation
(``evaluation.old_knowledge``) of the round and of its parent row: per question from
``old_knowledge_items.json`` (written by the runner next to ``round.json``) with the paired bootstrap
as for a contribution; from ``round.json``'s aggregates only (older runs) as an ``aggregate`` row with
no interval; not at all (the run did not score that task on both rows) as an ``unscored`` row. The
last two flag the release (:func:`cairn.ledger.gate.decide`): never silently accepted.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml

from cairn.errors import CairnError
from cairn.ledger.contribute import record_many
from cairn.ledger.gate import decide
from cairn.ledger.probes import rows_bytes, score_predictions
from cairn.rundir import read_old_items, read_round


def old_knowledge_rows(tasks: list[str], parent_dir: Path, release_dir: Path) -> list[dict]:
    """Gate rows ``old:<task>`` for the policy's tasks from a run's saved old-knowledge results."""
    sides = []
    for d in (parent_dir, release_dir):
        rec = read_round(d)
        sides.append(((rec.old_knowledge if rec else None) or {}, read_old_items(d) or {}))
    (p_agg, p_items), (r_agg, r_items) = sides
    rows = []
    for task in tasks:
        probe = f"old:{task}"
        if task not in p_agg or task not in r_agg:
            where = " and ".join(w for w, agg in (("its parent row", p_agg), ("this round", r_agg)) if task not in agg)
            metric = (p_agg.get(task) or r_agg.get(task) or {}).get("primary_metric", "-")
            rows.append({"probe": probe, "metric": metric,
                         "unscored": f"the run did not score {task} on {where} (evaluation.old_knowledge)"})
        elif task in p_items and task in r_items and len(p_items[task]) == len(r_items[task]) > 0:
            rows.append({"probe": probe, "metric": r_agg[task]["primary_metric"], "parent": p_items[task],
                         "release": r_items[task]})
        else:
            rows.append({"probe": probe, "metric": r_agg[task]["primary_metric"],
                         "aggregate": {"parent": p_agg[task]["primary"], "release": r_agg[task]["primary"],
                                       "n": r_agg[task].get("n")}})
    return rows


def _method_dir(run_dir: Path, method: str | None) -> tuple[Path, Path]:
    """(method dir, experiment dir) from a run dir or a method dir."""
    if (run_dir / "results.json").is_file():
        exp = run_dir.parent
        if not (exp / "base").is_dir():
            exp = exp.parent  # seed-<s>/ layout
        return run_dir, exp
    if not run_dir.is_dir():
        raise CairnError(f"run directory {run_dir} does not exist")
    done = sorted(p.parent for p in run_dir.glob("*/results.json"))
    if method is not None:
        done = [d for d in done if d.name == method]
    if len(done) != 1:
        names = ", ".join(d.name for d in done) or "none finished"
        raise CairnError(f"{run_dir}: pick one finished method with --method (found: {names})")
    return done[0], run_dir


def _put_artifact(project, artifact: Path) -> str:
    """Store a round's artifact; a full-fine-tuning round kept as a delta (storage.fft_format: delta) is
    stored as the full model it stands for, restored through its parent chain (a release must load alone)."""
    from cairn.io.fft_round import is_delta, write_round_folder

    if not is_delta(artifact):
        return project.store.put_dir(artifact)
    with tempfile.TemporaryDirectory(prefix="cairn-import-") as tmp:
        return project.store.put_dir(write_round_folder(artifact, Path(tmp) / "model"))


def import_run(project, run_dir: Path, method: str | None = None, parent: str = "base", prefix: str | None = None,
               contributor: str = "cairn run") -> list[dict]:
    mdir, exp = _method_dir(Path(run_dir), method)
    results = json.loads((mdir / "results.json").read_text())
    if results.get("model") != project.base:
        raise CairnError(f"{mdir} was run on model {results.get('model')!r}, but project {project.path} is built on "
                         f"{project.base!r}; import runs of the project's base only")
    base_preds_file = exp / "base" / "predictions.json"
    if not base_preds_file.is_file():
        raise CairnError(f"{base_preds_file} is missing; the run's base evaluation is needed for the gate")
    start = project.release(parent)
    strategy = "sequential"
    if (mdir / "config.yaml").is_file():
        mcfg = yaml.safe_load((mdir / "config.yaml").read_text()) or {}
        m = (mcfg.get("methods") or [{}])[0]
        strategy = m.get("strategy", "sequential")
        if m.get("trainable", "lora") == "lora" and (m.get("lora") or {}).get("sequential", "merge") != "merge":
            raise CairnError(f"{mdir}: LoRA 'stack' rounds are not foldable one by one; import 'merge' runs")
        if m.get("trainable") == "loramoe":
            raise CairnError(f"{mdir}: LoRAMoE rounds are not importable yet (they are not PEFT adapters)")
    metrics = {t["name"]: t["metric"] for t in results["tasks"]}
    prefix = prefix or f"{exp.name}-{mdir.name}"
    previous = {"name": start.name, "preds": json.loads(base_preds_file.read_text()), "dir": exp / "base"}
    base_preds = previous["preds"]
    ok_tasks = (project.policy.old_knowledge or {}).get("tasks") or []
    items, summaries, probe_names, known = [], [], [], {r.name for r in project.releases()}
    known |= {c.name for c in project.contributions()}
    rounds = sorted(p for p in (mdir / "rounds").iterdir() if (p / "round.json").is_file())
    if not rounds:
        raise CairnError(f"{mdir}/rounds holds no finished round")
    for rdir in rounds:
        label = rdir.name.split("-", 1)[1]
        name = f"{prefix}-{label}"
        if name in known:
            raise CairnError(f"a contribution or release named {name!r} already exists; import with another --prefix")
        preds = json.loads((rdir / "predictions.json").read_text())
        rinfo = json.loads((rdir / "round.json").read_text())
        if (rdir / "adapter").is_dir():
            from cairn.ledger.contribute import _adapter_folder

            kind, artifact = "adapter", _adapter_folder(rdir / "adapter")
        elif (rdir / "model").is_dir():
            kind, artifact = "model", rdir / "model"
        else:
            raise CairnError(f"{rdir} has no adapter/ or model/ artifact to import")
        parent_rec = {"name": start.name, "preds": base_preds, "dir": exp / "base"} if strategy == "one-round" \
            else previous
        if label not in metrics:
            raise CairnError(f"{rdir}: round task {label!r} is not a task of {mdir / 'results.json'}")
        probe_rows = [{"prompt": r["prompt"], "answer": r["reference"]} for r in base_preds[label]]
        gated = probe_names if strategy != "one-round" else []
        rows, parent_scores, release_scores = [], {}, {}
        for pname, task in gated + [(name, label)]:
            parent_scores[pname] = score_predictions(parent_rec["preds"][task], metrics[task])
            release_scores[pname] = score_predictions(preds[task], metrics[task])
            rows.append({"probe": pname, "metric": metrics[task], "parent": parent_scores[pname],
                         "release": release_scores[pname], "new": pname == name})
        gate = decide(rows + old_knowledge_rows(ok_tasks, parent_rec["dir"], rdir), project.policy)
        sha = _put_artifact(project, artifact)
        items.append(dict(
            release={"name": name, "parent_name": parent_rec["name"], "kind": "import", "artifact_sha": sha,
                     "artifact_kind": kind, "status": gate["status"], "gate": gate,
                     "settings": {"fold": "sequential", "run": str(mdir), "strategy": strategy}},
            contributions=[{"name": name, "contributor": contributor, "mode": "import",
                            "method": {"run_method": results.get("method"), "strategy": strategy,
                                       "train": rinfo.get("train")},
                            "data_fingerprint": None, "artifact_sha": sha, "artifact_kind": kind,
                            "wall_seconds": (rinfo.get("train") or {}).get("seconds")}],
            probe={"name": name, "metric": metrics[label], "sha": project.store.put_bytes(rows_bytes(probe_rows)),
                   "n_items": len(probe_rows)},
            parent_scores=parent_scores, release_scores=release_scores))
        summaries.append({"release": name, "status": gate["status"], "gate": gate})
        probe_names.append((name, label))
        previous = {"name": name, "preds": preds, "dir": rdir}
    record_many(project, items)
    return summaries
