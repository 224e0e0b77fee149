"""``cairn ledger report``: one self-contained HTML page of a project.

The page holds the lineage graph (inline SVG: one node per release, coloured by the gate's
decision, edges from parent to child), the probe matrix over releases (the seed paper's results
matrix, rows = releases, columns = contributions' probe sets) and every gate decision with its
table. No scripts, no external files: it opens from disk or an e-mail attachment.
"""

from __future__ import annotations

import html
from pathlib import Path

from cairn import atomic
from cairn.ledger.gate import interval_text
from cairn.ledger.views import score_matrix

COLOURS = {"accepted": "#2e7d32", "flagged": "#f9a825", "rejected": "#c62828"}


def lineage_svg(releases) -> str:
    """Releases laid out by depth (x) and order of creation within the tree (y)."""
    depth, children, ypos = {}, {}, {}
    for r in releases:
        depth[r.id] = 0 if r.parent_id is None else depth[r.parent_id] + 1
        children.setdefault(r.parent_id, []).append(r)
    row = 0

    def place(r):
        nonlocal row
        ypos[r.id] = row
        kids = children.get(r.id, [])
        if not kids:
            row += 1
        for k in kids:
            place(k)

    for root in children.get(None, []):
        place(root)
    dx, dy, w, h = 190, 56, 150, 34
    width = dx * (max(depth.values()) + 1) + 40
    height = dy * max(row, 1) + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="lineage of releases">']
    by_id = {r.id: r for r in releases}
    for r in releases:
        if r.parent_id is not None:
            x1, y1 = 20 + dx * depth[r.parent_id] + w, 20 + dy * ypos[r.parent_id] + h / 2
            x2, y2 = 20 + dx * depth[r.id], 20 + dy * ypos[r.id] + h / 2
            dash = ' stroke-dasharray="5,4"' if r.status == "rejected" else ""
            parts.append(f'<path d="M{x1},{y1} C{x1 + 20},{y1} {x2 - 20},{y2} {x2},{y2}" fill="none" '
                         f'stroke="#555" stroke-width="2"{dash}/>')
    for r in releases:
        x, y = 20 + dx * depth[r.id], 20 + dy * ypos[r.id]
        colour = COLOURS.get(r.status, "#777")
        label = html.escape(r.name if len(r.name) <= 18 else r.name[:17] + "…")
        parts.append(f'<g><title>{html.escape(r.name)}: {r.status} ({r.kind})'
                     f'{" from " + html.escape(by_id[r.parent_id].name) if r.parent_id else ""}</title>'
                     f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="7" fill="{colour}" fill-opacity="0.18" '
                     f'stroke="{colour}" stroke-width="2"/>'
                     f'<text x="{x + w / 2}" y="{y + h / 2 + 5}" text-anchor="middle" font-size="13" '
                     f'font-family="sans-serif">{label}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def _cell(value: float | None, parent: float | None) -> str:
    if value is None:
        return '<td class="na">–</td>'
    style = ""
    if parent is not None and abs(value - parent) >= 0.5:
        style = ' class="up"' if value > parent else ' class="down"'
    return f"<td{style}>{value:.1f}</td>"


def build_ledger_report(project, out: Path | None = None) -> Path:
    releases, probes, evals = score_matrix(project)
    out = Path(out) if out is not None else project.path / "report.html"
    by_id = {r.id: r for r in releases}
    contribs = {c.release_id: c for c in project.contributions()}
    head = "".join(f"<th>{html.escape(p.name)}<br><small>{html.escape(p.metric)}, n={p.n_items}</small></th>" for p in probes)
    rows = []
    for r in releases:
        cells = []
        for p in probes:
            e = evals.get((r.id, p.id))
            pe = evals.get((r.parent_id, p.id)) if r.parent_id else None
            cells.append(_cell(100 * e.score if e else None, 100 * pe.score if pe else None))
        c = contribs.get(r.id)
        who = html.escape(c.contributor) if c else "–"
        rows.append(f'<tr><th>{html.escape(r.name)}</th><td><span class="st {r.status}">{r.status}</span></td>'
                    f"<td>{who}</td>{''.join(cells)}</tr>")
    gates = []
    for r in releases:
        if not r.gate:
            continue
        g = r.gate
        num = lambda v, fmt: format(v, fmt) if v is not None else "–"  # noqa: E731 - unscored rows have none
        trs = "".join(
            f"<tr><td>{html.escape(t['probe'])}</td><td>{t['n']}</td><td>{num(t['parent'], '.1f')}</td>"
            f"<td>{num(t['release'], '.1f')}</td><td>{num(t['delta'], '+.1f')}</td>"
            f"<td>{html.escape(interval_text(t))}</td>"
            f"<td class=\"v-{t['verdict']}\">{t['verdict']}"
            f"{'<br><small>' + html.escape(t['note']) + '</small>' if t.get('note') else ''}</td></tr>"
            for t in g["table"])
        parent = by_id[r.parent_id].name if r.parent_id else "-"
        gates.append(f'<h3>{html.escape(r.name)} <span class="st {r.status}">{r.status}</span> '
                     f'<small>vs parent {html.escape(parent)}; max drop {g["policy"]["max_drop"]:g} points, '
                     f'{100 * g["policy"]["confidence"]:g}% interval</small></h3>'
                     "<table><tr><th>probe</th><th>n</th><th>parent</th><th>release</th><th>Δ</th>"
                     f"<th>interval</th><th>verdict</th></tr>{trs}</table>")
    contrib_rows = "".join(
        f"<tr><td>{html.escape(c.name)}</td><td>{html.escape(c.contributor)}</td><td>{c.mode}</td>"
        f"<td>{html.escape(by_id[c.parent_id].name)}</td><td><code>{(c.artifact_sha or '')[:12]}</code></td>"
        f"<td>{html.escape(str((c.data_fingerprint or {}).get('counts', '–')))}</td>"
        f"<td>{(c.wall_seconds or 0):.1f}</td></tr>" for c in project.contributions())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>cairn ledger: {html.escape(project.meta['name'])}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f3f3f3; }}
td.up {{ background: #e3f2e5; }} td.down {{ background: #fbe3e3; }} td.na {{ color: #999; }}
.st {{ padding: 1px 6px; border-radius: 4px; color: white; font-size: 0.85em; }}
.accepted {{ background: #2e7d32; }} .flagged {{ background: #f9a825; }} .rejected {{ background: #c62828; }}
.v-fail {{ color: #c62828; font-weight: bold; }} .v-noisy, .v-aggregate, .v-unscored {{ color: #b8860b; }}
</style></head><body>
<h1>cairn ledger: {html.escape(project.meta['name'])}</h1>
<p>Base model <code>{html.escape(project.base)}</code>; {len(releases)} releases, {len(probes)} probe sets.
Gate policy: a probe set may lose at most {project.policy.max_drop:g} points against the parent
(significant at {100 * project.policy.confidence:g}%, paired bootstrap over items), else {project.policy.action}.</p>
<h2>Lineage</h2>
{lineage_svg(releases)}
<h2>Probe matrix (points; green/red: up/down against the parent)</h2>
<table><tr><th>release</th><th>status</th><th>contributor</th>{head}</tr>{''.join(rows)}</table>
<h2>Contributions</h2>
<table><tr><th>name</th><th>contributor</th><th>mode</th><th>from</th><th>artifact</th><th>data</th><th>seconds</th></tr>
{contrib_rows}</table>
<h2>Gate decisions</h2>
{''.join(gates) or '<p>none yet</p>'}
</body></html>
"""
    atomic.write_text(out, page)
    return out
