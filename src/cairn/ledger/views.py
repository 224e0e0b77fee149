"""Text views of a ledger: release list, one release, lineage tree, diff of two releases."""

from __future__ import annotations

import numpy as np

from cairn.errors import CairnError
from cairn.ledger.gate import format_table, paired_bootstrap


def score_matrix(project) -> tuple[list, list, dict]:
    """(releases, probes, {(release_id, probe_id): evaluation})."""
    evals = {(e.release_id, e.probe_id): e for e in project.evaluations()}
    return project.releases(), project.probes(), evals


def list_text(project) -> str:
    releases, probes, evals = score_matrix(project)
    by_id = {r.id: r for r in releases}
    contrib = {c.release_id: c for c in project.contributions()}
    lines = [f"project {project.meta['name']} (base {project.base}); {len(releases)} releases, {len(probes)} probe sets",
             f"  {'release':<22} {'parent':<22} {'kind':<10} {'status':<9} {'contributor':<14} {'mode':<8} probes(mean)"]
    for r in releases:
        scored = [evals[(r.id, p.id)].score for p in probes if (r.id, p.id) in evals]
        mean = f"{100 * np.mean(scored):.1f} on {len(scored)}" if scored else "-"
        c = contrib.get(r.id)
        lines.append(f"  {r.name:<22} {by_id[r.parent_id].name if r.parent_id else '-':<22} {r.kind:<10} "
                     f"{r.status:<9} {c.contributor if c else '-':<14} {c.mode if c else '-':<8} {mean}")
    return "\n".join(lines)


def show_text(project, name: str) -> str:
    r = project.release(name)
    parent = project.release_by_id(r.parent_id).name if r.parent_id else "-"
    lines = [f"release {r.name}: {r.kind}, {r.status}, parent {parent}, created {r.created_at}",
             f"  lineage: {' -> '.join(x.name for x in project.lineage(r))}"]
    if r.artifact_sha:
        lines.append(f"  artifact: {r.artifact_kind} sha256 {r.artifact_sha}")
    for key, value in (r.settings or {}).items():
        lines.append(f"  {key}: {value}")
    for c in project.contributions():
        if c.release_id == r.id:
            lines += [f"  contribution {c.name} by {c.contributor} ({c.mode}), {c.wall_seconds or 0:.1f} s",
                      f"    method: {c.method}", f"    data fingerprint: {c.data_fingerprint or '-'}"]
    if r.gate:
        lines.append(format_table(r.gate))
    probes = {p.id: p for p in project.probes()}
    evals = [e for e in project.evaluations() if e.release_id == r.id]
    if evals:
        lines.append("  evaluations: " + ", ".join(f"{probes[e.probe_id].name}={100 * e.score:.1f}" for e in evals))
    return "\n".join(lines)


def tree_text(project) -> str:
    releases = project.releases()
    children: dict = {}
    for r in releases:
        children.setdefault(r.parent_id, []).append(r)
    lines: list[str] = []

    def walk(r, prefix: str, last: bool, root: bool):
        mark = "" if root else ("└── " if last else "├── ")
        lines.append(f"{prefix}{mark}{r.name} [{r.status}{', ' + r.kind if r.kind != 'sequential' else ''}]")
        kids = children.get(r.id, [])
        for i, k in enumerate(kids):
            walk(k, prefix + ("" if root else ("    " if last else "│   ")), i == len(kids) - 1, False)

    for root in children.get(None, []):
        walk(root, "", True, True)
    return "\n".join(lines)


def diff_rows(project, a: str, b: str) -> list[dict]:
    ra, rb = project.release(a), project.release(b)
    _, probes, evals = score_matrix(project)
    rows = []
    for p in probes:
        ea, eb = evals.get((ra.id, p.id)), evals.get((rb.id, p.id))
        if ea is None or eb is None:
            rows.append({"probe": p.name, "a": ea and 100 * ea.score, "b": eb and 100 * eb.score, "delta": None})
            continue
        delta, lo, hi = paired_bootstrap(ea.item_scores, eb.item_scores, project.policy)
        rows.append({"probe": p.name, "a": 100 * ea.score, "b": 100 * eb.score, "delta": delta, "lo": lo, "hi": hi})
    if not rows:
        raise CairnError(f"no probe sets recorded yet; nothing to compare between {a} and {b}")
    return rows


def diff_text(project, a: str, b: str) -> str:
    lines = [f"diff {a} -> {b} (points; paired bootstrap interval over items)",
             f"  {'probe':<24} {a[:9]:>9} {b[:9]:>9} {'delta':>7}  interval"]
    for r in diff_rows(project, a, b):
        fmt = lambda v: f"{v:9.1f}" if v is not None else f"{'-':>9}"  # noqa: E731
        if r["delta"] is None:
            lines.append(f"  {r['probe']:<24} {fmt(r['a'])} {fmt(r['b'])} {'-':>7}  not scored on both")
        else:
            sign = "rose" if r["lo"] > 0 else "fell" if r["hi"] < 0 else "same within noise"
            lines.append(f"  {r['probe']:<24} {fmt(r['a'])} {fmt(r['b'])} {r['delta']:+7.1f}  "
                         f"[{r['lo']:+.1f}, {r['hi']:+.1f}] {sign}")
    return "\n".join(lines)
