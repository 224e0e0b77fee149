"""Contributions and releases: train or check an artifact, fold it into a release, gate it, record it.

Fully cooperative (``data``): cairn trains one round from the parent release with the project's
method (sequential LoRA or full fine-tuning, O-LoRA, N-LoRA, replay; :mod:`cairn.ledger.training`,
the seed paper's setting, Lee & Wynter 2024, arXiv 2410.13699); with the policy's ``keep_data`` the
training rows are stored content-addressed (their hash is the data fingerprint) for later replay.
Semi-cooperative (``adapter`` / ``model``): the artifact was trained elsewhere; it is checked against
the parent (:mod:`cairn.ledger.weights`) and only its hash, the probe set and, if given, a
fingerprint of the training data are recorded (never the data).

Folding is sequential (the adapter merged into the parent; a full model replaces it), a merge of
several contributions' adapters (:func:`cairn.combine.merge_lora.merge_adapters`), or a mix into a
routed LoRA-MoE (:mod:`cairn.ledger.mix`). Every new release
is scored on every earlier probe set and its own, compared with its parent by the gate
(:mod:`cairn.ledger.gate`), and written to the ledger in ONE transaction: a failure before the end
leaves the ledger as it was (artifacts already in the store are content-addressed and harmless).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from cairn.errors import CairnError
from cairn.ledger import db
from cairn.ledger.gate import decide
from cairn.ledger.probes import check_metric, fingerprint_rows, read_probe_rows, rows_bytes, score_items
from cairn.ledger.project import Project, now
from cairn.ledger.weights import MIX_KIND, RELEASE_FILE, build_release, check_adapter, check_model, \
    fingerprint_model, merge_adapter, release_stamp


def read_training_data(folder: Path) -> list[dict]:
    """``train.jsonl`` (or ``train.json``, TRACE layout) of {prompt, answer} rows from ``folder``, read and
    checked by the data layer (malformed lines, missing fields, empty answers and non-UTF-8 bytes are
    refused naming the file and line)."""
    from cairn.config import TaskConfig
    from cairn.data.sources import read_split, resolve

    if not folder.is_dir():
        raise CairnError(f"--data {folder} is not a folder; it must hold train.jsonl (or train.json) of "
                         "{prompt, answer} rows")
    if (folder / "train.jsonl").is_file():
        fmt = "jsonl"
    elif (folder / "train.json").is_file():
        fmt = "trace"
    else:
        raise CairnError(f"--data {folder} has no train.jsonl or train.json")
    cfg = TaskConfig(name=folder.name, format=fmt, path=str(folder), metric="exact_match")
    return read_split(cfg, resolve(cfg, "train", None), chat=False).examples


def data_fingerprint(folder: Path) -> dict:
    """Hash and counts of a training set (the data itself is never stored by this)."""
    return rows_fingerprint(read_training_data(folder))


def rows_fingerprint(rows: list[dict]) -> dict:
    """Hash and counts of training rows; the hash is that of :func:`rows_bytes`, the rows' store address."""
    return {"sha256": hashlib.sha256(rows_bytes(rows)).hexdigest(), "counts": {"train": len(rows)},
            "answer_chars": sum(len(r["answer"]) for r in rows)}


def _adapter_folder(root: Path) -> Path:
    found = sorted(p.parent for p in root.rglob("adapter_config.json"))
    if not found:
        raise RuntimeError(f"no adapter was saved under {root}")
    return found[0]


def _live_probes(project: Project) -> list:
    """Probe sets of knowledge the project keeps: contributions whose release was not rejected, and the
    experts of mixtures that were not rejected (a mixture may keep a rejected contribution's knowledge)."""
    releases = project.releases()
    rejected = {r.id for r in releases if r.status == "rejected"}
    kept = {n for r in releases if r.kind == "mix" and r.id not in rejected
            for e in (r.settings or {}).get("experts", []) for n in e["probes"]}
    by_id = {c.id: c for c in project.contributions()}
    return [p for p in project.probes() if by_id[p.contribution_id].release_id not in rejected or p.name in kept]


def _scores(project: Project, release_id: int | None, model, tokenizer, probes: list, rows_of: dict) -> dict:
    """{probe name: item scores}: stored evaluations of ``release_id`` where present, else scored now."""
    stored = {}
    if release_id is not None:
        stored = {e.probe_id: e.item_scores for e in project.evaluations() if e.release_id == release_id}
    out = {}
    for p in probes:
        if p.id in stored:
            out[p.name] = stored[p.id]
        else:
            out[p.name] = score_items(model, tokenizer, rows_of[p.name], p.metric)
    return out


def parent_old_knowledge(project: Project, parent, parent_model, tokenizer) -> dict | None:
    """The parent's old-knowledge items (kept in its settings, else scored now), when the policy asks."""
    spec = project.policy.old_knowledge
    if not spec:
        return None
    kept = (parent.settings or {}).get("old_knowledge")
    if kept and kept.get("spec") == spec:
        return kept["tasks"]
    from cairn.ledger.old_knowledge import suite_items

    return suite_items(spec, parent_model, tokenizer)


def fold_and_gate(project: Project, parent, new_model, tokenizer, new_probes: list[tuple[str, str, list]],
                  parent_scores: dict, probes: list, rows_of: dict, parent_ok: dict | None = None,
                  settings: dict | None = None) -> tuple[dict, dict]:
    """Score ``new_model`` on every live probe (and the new ones: (name, metric, rows), shown but not
    gated) and run the gate against the parent.

    With an old-knowledge spec in the policy, the suite subset joins the gate and the release's items
    are written to ``settings["old_knowledge"]``.
    """
    old_rows = []
    if parent_ok is not None:
        from cairn.ledger.old_knowledge import gate_rows, suite_items

        mine = suite_items(project.policy.old_knowledge, new_model, tokenizer)
        old_rows = gate_rows(parent_ok, mine)
        if settings is not None:
            settings["old_knowledge"] = {"spec": project.policy.old_knowledge, "tasks": mine}
    names = [p.name for p in probes]
    metrics = {p.name: p.metric for p in probes}
    release_scores = {p.name: score_items(new_model, tokenizer, rows_of[p.name], p.metric) for p in probes}
    rows = [{"probe": n, "metric": metrics[n], "parent": parent_scores[n], "release": release_scores[n]} for n in names]
    for pname, metric, prow in new_probes:
        release_scores[pname] = score_items(new_model, tokenizer, prow, metric)
        rows.append({"probe": pname, "metric": metric, "parent": parent_scores[pname],
                     "release": release_scores[pname], "new": True})
    return decide(rows + old_rows, project.policy), release_scores


def record(project: Project, *, release: dict, contributions: list[dict], probe: dict | None,
           parent_scores: dict, release_scores: dict) -> int:
    """Write the release, its contribution(s), probe and evaluations in one transaction; returns the release id."""
    return record_many(project, [dict(release=release, contributions=contributions, probe=probe,
                                      parent_scores=parent_scores, release_scores=release_scores)])[0]


def record_many(project: Project, items: list[dict]) -> list[int]:
    """Record several releases in ONE transaction (an import): all of them or none.

    An item's release may name its parent with ``parent_name`` instead of ``parent_id`` (a release
    recorded earlier in the same call).
    """
    names = ", ".join(repr(i["release"]["name"]) for i in items)
    try:
        with project.engine.begin() as conn:
            return [_record_in(conn, **item) for item in items]
    except sa.exc.IntegrityError as exc:
        raise CairnError(f"a contribution or release named {names} is already in the ledger (recorded meanwhile "
                         f"by another contributor?); pick another --name. Nothing was recorded") from exc


def _record_in(conn, *, release: dict, contributions: list[dict], probe: dict | None, parent_scores: dict,
               release_scores: dict) -> int:
    release = dict(release)
    if "parent_name" in release:
        release["parent_id"] = conn.execute(sa.select(db.releases.c.id).where(
            db.releases.c.name == release.pop("parent_name"))).scalar_one()
    rid = conn.execute(sa.insert(db.releases).values(created_at=now(), **release)).inserted_primary_key[0]
    cids = []
    for c in contributions:
        c = dict(c, parent_id=release["parent_id"])
        cids.append(conn.execute(sa.insert(db.contributions).values(created_at=now(), release_id=rid, **c)
                                 ).inserted_primary_key[0])
    if probe is not None:
        conn.execute(sa.insert(db.probes).values(contribution_id=cids[0], **probe))
    probe_ids = {r.name: r.id for r in conn.execute(sa.select(db.probes.c.name, db.probes.c.id))}
    have = {(e.release_id, e.probe_id) for e in conn.execute(
        sa.select(db.evaluations.c.release_id, db.evaluations.c.probe_id))}
    rows = []
    for rel_id, scores in ((release["parent_id"], parent_scores), (rid, release_scores)):
        for name, items in scores.items():
            key = (rel_id, probe_ids[name])
            if key in have:
                continue
            have.add(key)
            rows.append({"release_id": rel_id, "probe_id": probe_ids[name], "item_scores": items,
                         "score": sum(items) / len(items), "created_at": now()})
    if rows:
        conn.execute(_insert_ignoring_duplicates(conn, db.evaluations), rows)
    return rid


def _insert_ignoring_duplicates(conn, table):
    """INSERT that skips rows already there: two contributors racing from one parent may both score the
    parent on the same probe set; the scores are the same (greedy decoding), so the second is dropped."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        return sa.insert(table)
    return insert(table).on_conflict_do_nothing()


def contribute(project: Project, name: str, parent_name: str, contributor: str, *, data: Path | None = None,
               adapter: Path | None = None, model: Path | None = None, probe: Path | None = None,
               probe_metric: str | None = None, fingerprint_data: Path | None = None,
               progress: bool = False, log=print) -> dict:
    """Add one contribution as a new release (sequential fold) and gate it; see the module docstring."""
    from cairn.models import load_tokenizer

    t0 = time.perf_counter()
    given = [k for k, v in (("--data", data), ("--adapter", adapter), ("--model", model)) if v is not None]
    if len(given) != 1:
        raise CairnError(f"give exactly one of --data, --adapter, --model (got {', '.join(given) or 'none'})")
    if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise CairnError(f"--name {name!r} must be letters, digits, '-', '_' or '.'")
    if project.contribution_exists(name) or name in {r.name for r in project.releases()}:
        raise CairnError(f"a contribution or release named {name!r} already exists in {project.path}; pick another --name")
    parent = project.release(parent_name)
    if parent.status == "rejected":
        raise CairnError(f"release {parent_name!r} was rejected by the gate; contribute from an accepted release")
    if parent.artifact_kind == MIX_KIND:
        host = (parent.settings or {}).get("host")
        raise CairnError(f"release {parent_name!r} is a LoRA mixture (a mix fold); contributions build on plain "
                         f"releases: contribute from its host --from {host} and add the adapter to the mixture with "
                         f"`cairn ledger mix {project.path} --name NEW --releases {parent_name} YOUR_RELEASE`")
    if probe is None:
        raise CairnError("--probe FILE.jsonl is required: the held-out questions that later releases must keep")
    probe_rows = read_probe_rows(probe)
    metric = check_metric(probe_metric, str(probe))
    if data is not None:
        from cairn.ledger.method import project_method

        project_method(project)  # a method the ledger cannot train fails here, before any model loads
        training_rows = read_training_data(Path(data))
    fp = data_fingerprint(Path(fingerprint_data)) if fingerprint_data is not None else None

    tokenizer = load_tokenizer(project.base)
    parent_model = build_release(project, parent)
    probes = _live_probes(project)
    rows_of = {p.name: json_rows(project.store.get_bytes(p.sha)) for p in probes}
    rows_of[name] = probe_rows
    with tempfile.TemporaryDirectory(prefix="cairn-contribution-") as tmp:
        tmp = Path(tmp)
        settings = {"fold": "sequential"}
        if adapter is not None:
            settings["check"] = check_adapter(Path(adapter), project, parent, parent_model)
        if model is not None:
            from cairn.io.fft_round import is_delta, write_round_folder

            if Path(model).is_dir() and is_delta(Path(model)):  # a delta-stored FFT round: stored as its full model
                model = write_round_folder(Path(model), tmp / "model-full")
            new_model, settings["check"] = check_model(Path(model), project, parent, parent_model)
        # The parent is scored before any adapter is merged into it (merging changes weights in place).
        parent_scores = _scores(project, parent.id, parent_model, tokenizer, probes, rows_of)
        parent_scores[name] = score_items(parent_model, tokenizer, probe_rows, metric)
        parent_ok = parent_old_knowledge(project, parent, parent_model, tokenizer)
        if data is not None:
            from cairn.ledger.training import train_contribution

            trained = train_contribution(project, parent, parent_model, tokenizer, name, training_rows, tmp, log,
                                         progress)
            new_model, kind, artifact, method, mode = trained.model, trained.kind, trained.artifact, trained.method, "data"
            fp = rows_fingerprint(training_rows)
            if project.policy.keep_data:  # for later replay; its store address is the fingerprint's sha256
                project.store.put_bytes(rows_bytes(training_rows))
                fp["stored"] = True
        elif adapter is not None:
            kind, artifact = "adapter", Path(adapter)
            cfg = json.loads((artifact / "adapter_config.json").read_text())
            method = {"trained_by": "contributor", "peft_type": cfg.get("peft_type"), "r": cfg.get("r"),
                      "lora_alpha": cfg.get("lora_alpha"), "target_modules": cfg.get("target_modules")}
            new_model = merge_adapter(parent_model, artifact)
            mode = "adapter"
        else:
            kind, artifact, mode = "model", Path(model), "model"
            method = {"trained_by": "contributor", "kind": "full model"}
        artifact_sha = project.store.put_dir(artifact)
        settings["weights_sha256"] = fingerprint_model(new_model)
        gate, release_scores = fold_and_gate(project, parent, new_model, tokenizer, [(name, metric, probe_rows)],
                                             parent_scores, probes, rows_of, parent_ok, settings)
    probe_sha = project.store.put_bytes(rows_bytes(probe_rows))
    wall = time.perf_counter() - t0
    contribution = {"name": name, "contributor": contributor, "parent_id": parent.id, "mode": mode, "method": method,
                    "data_fingerprint": fp, "artifact_sha": artifact_sha, "artifact_kind": kind, "wall_seconds": wall}
    release = {"name": name, "parent_id": parent.id, "kind": "sequential", "artifact_sha": artifact_sha,
               "artifact_kind": kind, "status": gate["status"], "gate": gate, "settings": settings}
    rid = record(project, release=release, contributions=[contribution],
                 probe={"name": name, "metric": metric, "sha": probe_sha, "n_items": len(probe_rows)},
                 parent_scores=parent_scores, release_scores=release_scores)
    return {"release": name, "release_id": rid, "status": gate["status"], "gate": gate, "artifact_sha": artifact_sha,
            "wall_seconds": wall, "probe_fingerprint": fingerprint_rows(probe_rows)}


def json_rows(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def merge_releases(project: Project, name: str, sources: list[str], method: str = "ties", progress: bool = False,
                   **params) -> dict:
    """A release merging the adapters of sibling releases (same parent) with a cairn merge method."""
    from cairn.combine.merge_lora import merge_adapters
    from cairn.models import load_tokenizer

    t0 = time.perf_counter()
    if project.contribution_exists(name) or name in {r.name for r in project.releases()}:
        raise CairnError(f"a contribution or release named {name!r} already exists in {project.path}; pick another --name")
    if len(sources) < 2:
        raise CairnError(f"merging needs at least two releases, got {len(sources)}")
    rels = [project.release(s) for s in sources]
    parents = {r.parent_id for r in rels}
    if len(parents) != 1:
        raise CairnError(f"releases {', '.join(sources)} do not share one parent; merge siblings (contributions "
                         "made from the same release)")
    bad = [r.name for r in rels if r.artifact_kind != "adapter"]
    if bad:
        raise CairnError(f"release(s) {', '.join(bad)} are not adapters; only adapter contributions can be merged here")
    parent = project.release_by_id(parents.pop())
    tokenizer = load_tokenizer(project.base)
    parent_model = build_release(project, parent)
    probes = _live_probes(project)
    rows_of = {p.name: json_rows(project.store.get_bytes(p.sha)) for p in probes}
    with tempfile.TemporaryDirectory(prefix="cairn-merge-") as tmp:
        tmp = Path(tmp)
        folders = [project.store.get_dir(r.artifact_sha, tmp / f"in-{i}") for i, r in enumerate(rels)]
        stats = merge_adapters(folders, tmp / "merged", method, mode="per_factor", progress=progress, **params)
        (tmp / "merged" / "cairn_merge.json").unlink(missing_ok=True)  # statistics go to the ledger instead
        parent_scores = _scores(project, parent.id, parent_model, tokenizer, probes, rows_of)
        parent_ok = parent_old_knowledge(project, parent, parent_model, tokenizer)
        artifact_sha = project.store.put_dir(tmp / "merged")
        new_model = merge_adapter(parent_model, tmp / "merged")
        settings = {"fold": "merge", "method": method, "params": params, "sources": sources,
                    "weights_sha256": fingerprint_model(new_model),
                    "merge_stats": {k: v for k, v in stats.items() if isinstance(v, (int, float, str))}}
        gate, release_scores = fold_and_gate(project, parent, new_model, tokenizer, [], parent_scores, probes, rows_of,
                                             parent_ok, settings)
    release = {"name": name, "parent_id": parent.id, "kind": "merge", "artifact_sha": artifact_sha,
               "artifact_kind": "adapter", "status": gate["status"], "gate": gate, "settings": settings}
    record(project, release=release, contributions=[], probe=None, parent_scores=parent_scores,
           release_scores=release_scores)
    return {"release": name, "status": gate["status"], "gate": gate, "wall_seconds": time.perf_counter() - t0}


__all__ = ["contribute", "merge_releases", "data_fingerprint", "RELEASE_FILE", "release_stamp"]
