"""Result tables shaped like the seed paper's (Lee & Wynter 2024, arXiv:2410.13699), in Markdown,
CSV, LaTeX and HTML.

- :func:`old_knowledge_table`: Tables 1/2, old-knowledge scores per round, with a gain-from-base
  row whose AVE cell is the *mean of the per-task gains* (as the paper computes it there).
- :func:`new_knowledge_table`: Tables 3/4, rows "base", "after <task>", ..., columns = tasks, with
  gain-from-base (AVE cell: *gain of the average*, as the paper computes it there), change in
  points (defined even when a base score is 0) and BWT rows.
- :func:`comparison_tables`: Tables 5/6, final scores per method on new and old knowledge, plus a
  one-line-per-method summary (gain from base, BWT, last-round average, old-knowledge gain).

Scores are shown x100 with one decimal; "–" marks a value that is undefined (a 0 base score for a
relative gain, the last task for BWT) or was not evaluated. Cells are formatted once, as strings,
so the four renderings always agree.
"""

from __future__ import annotations

import csv
import html
import io
from dataclasses import dataclass, field

from cairn.eval import continual as C
from cairn.report.runs import Run, task_names

DASH = "–"


@dataclass
class Table:
    """A formatted table: header, body rows (first cell = row label), and rows after a rule."""

    name: str  # file stem
    title: str
    columns: list[str]
    rows: list[list[str]]
    summary_from: int | None = None  # index of the first summary row (gain, BWT), drawn after a rule
    notes: list[str] = field(default_factory=list)


def fmt_score(v: float | None) -> str:
    return DASH if v is None else f"{100 * v:.1f}"


def fmt_pct(v: float | None, digits: int = 1) -> str:
    return DASH if v is None else f"{v:+.{digits}f}%"


def fmt_points(v: float | None) -> str:
    return DASH if v is None else f"{v:+.1f}"


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _row_labels(results: dict, curriculum: bool) -> list[str]:
    rows = list(results["rows"])
    return ["base"] + [f"after {r}" if curriculum else str(r) for r in rows[1:]]


# ------------------------------------------------------------------ per-run tables


def new_knowledge_table(results: dict, label: str | None = None) -> Table:
    """Paper Tables 3/4 for one run: scores per round on the curriculum's tasks."""
    names = task_names(results)
    R = results["matrix"]
    K, _ = C.check_matrix(R)
    seq = C.is_curriculum(names, results["rows"], K)
    body = [[lab] + [fmt_score(v) for v in row] + [fmt_score(_mean(row))] for lab, row in zip(_row_labels(results, seq), R)]
    summary_from = len(body)
    points = C.gain_from_base_points(R)
    body.append(["gain from base (%)"] + [fmt_pct(g) for g in C.gain_from_base(R)] + [fmt_pct(C.gain_of_average(R))])
    body.append(["change from base (points)"] + [fmt_points(p) for p in points] + [fmt_points(_mean(points))])
    notes = [
        "Scores x100. Gain from base = 100 (last - base) / base per task; its AVE cell is the gain "
        "of the average score (as in the paper's Tables 3/4). " + DASH + " = undefined (base score 0) "
        "or not evaluated; the change in points is always defined."
    ]
    if seq and K >= 2:
        body.append(["BWT (%)"] + [fmt_pct(b) for b in C.bwt_paper(R)] + [fmt_pct(C.bwt_paper_mean(R))])
        notes.append(
            "BWT = 100 (final - right after learning) / right after learning, for tasks learned before "
            "the last round; AVE = their mean."
        )
    title = "New knowledge: acquisition and retention" + (f" ({label})" if label else "")
    return Table("new_knowledge", title, ["", *names, "AVE"], body, summary_from, notes)


def _old_rows(results: dict) -> list[int]:
    """Indices of rows where old knowledge was evaluated (a non-null score somewhere)."""
    old = results.get("old_knowledge") or {}
    return [k for k, row in enumerate(old.get("matrix") or []) if row and any(v is not None for v in row)]


def old_knowledge_matrix(results: dict) -> tuple[list[str], list[str], list[list[float | None]]] | None:
    """(old task names, row labels, evaluated rows) or ``None`` when the run has no old knowledge."""
    old = results.get("old_knowledge")
    ks = _old_rows(results)
    if not old or not ks:
        return None
    names = task_names(results)
    seq = C.is_curriculum(names, results["rows"], len(results["rows"]) - 1)
    labels = _row_labels(results, seq)
    return list(old["tasks"]), [labels[k] for k in ks], [list(old["matrix"][k]) for k in ks]


def old_knowledge_table(results: dict, label: str | None = None) -> Table | None:
    """Paper Tables 1/2 for one run: old-knowledge scores per evaluated round, with a gain row."""
    got = old_knowledge_matrix(results)
    if got is None:
        return None
    names, labels, M = got
    body = [[lab] + [fmt_score(v) for v in row] + [fmt_score(_mean(row))] for lab, row in zip(labels, M)]
    summary_from = len(body)
    notes = ["Scores x100."]
    metrics = (results.get("old_knowledge") or {}).get("metric") or {}
    if metrics:
        notes.append("Metrics: " + ", ".join(f"{t}: {metrics[t]}" for t in names if t in metrics) + ".")
    if labels[0] == "base" and len(M) > 1:
        G = [M[0], M[-1]]
        body.append(["gain from base (%)"] + [fmt_pct(g, 2) for g in C.gain_from_base(G)] + [fmt_pct(C.mean_gain_from_base(G), 2)])
        notes.append(
            f"Gain from base compares '{labels[-1]}' with 'base'; its AVE cell is the mean of the per-task "
            "gains (as in the paper's Tables 1/2)."
        )
    title = "Old knowledge: retention" + (f" ({label})" if label else "")
    return Table("old_knowledge", title, ["", *names, "AVE"], body, summary_from, notes)


def new_knowledge_table_markdown(results: dict) -> str:
    """The new-knowledge table (paper Tables 3/4) of one ``results.json`` dict, as Markdown."""
    return to_markdown(new_knowledge_table(results, results.get("name")))


# ------------------------------------------------------------------ comparison across methods


def _union(lists: list[list[str]]) -> list[str]:
    out: list[str] = []
    for names in lists:
        out += [n for n in names if n not in out]
    return out


def _final_by_name(names: list[str], row: list[float | None], columns: list[str]) -> list[float | None]:
    by = dict(zip(names, row))
    return [by.get(c) for c in columns]


def comparison_tables(runs: list[Run]) -> list[Table]:
    """Tables 5/6 (final scores per method) and a summary line per method."""
    tables: list[Table] = []
    new_cols = _union([r.task_names for r in runs])
    base_run = runs[0]
    base_row = _final_by_name(base_run.task_names, base_run.results["matrix"][0], new_cols)
    body = [["base"] + [fmt_score(v) for v in base_row] + [fmt_score(_mean(base_row))]]
    for r in runs:
        final = _final_by_name(r.task_names, r.results["matrix"][-1], new_cols)
        body.append([r.label] + [fmt_score(v) for v in final] + [fmt_score(_mean(final))])
    notes = ["Scores x100 of each method's final model (its last row); base from " + f"'{base_run.label}'."]
    if any(_final_by_name(r.task_names, r.results["matrix"][0], new_cols) != base_row for r in runs[1:]):
        notes.append("Note: the methods' base rows differ (different evaluation sets or models).")
    tables.append(Table("comparison_new", "New knowledge: final scores per method", ["", *new_cols, "AVE"], body, None, notes))

    olds = [(r, old_knowledge_matrix(r.results)) for r in runs]
    olds = [(r, o) for r, o in olds if o is not None]
    if olds:
        old_cols = _union([o[0] for _, o in olds])
        r0, (n0, labs0, M0) = olds[0]
        body = []
        if labs0[0] == "base":
            b = _final_by_name(n0, M0[0], old_cols)
            body.append(["base"] + [fmt_score(v) for v in b] + [fmt_score(_mean(b))])
        for r, (names, _, M) in olds:
            final = _final_by_name(names, M[-1], old_cols)
            body.append([r.label] + [fmt_score(v) for v in final] + [fmt_score(_mean(final))])
        tables.append(
            Table("comparison_old", "Old knowledge: final scores per method", ["", *old_cols, "AVE"], body, None,
                  ["Scores x100 of each method's last evaluated round; base from " + f"'{r0.label}'."])
        )

    cols = ["method", "new: base avg", "new: last avg", "new: gain of avg (%)", "new: mean gain (%)",
            "BWT mean (%)", "BWT (points)", "FWT (points)", "old: last avg", "old: mean gain (%)"]
    body = []
    for r in runs:
        R = r.results["matrix"]
        s = C.summarize(R, r.task_names, r.results["rows"])
        o = old_knowledge_matrix(r.results)
        old_last = _mean(o[2][-1]) if o else None
        old_gain = C.mean_gain_from_base([o[2][0], o[2][-1]]) if o and o[1][0] == "base" and len(o[2]) > 1 else None
        body.append([
            r.label, fmt_score(s["base_average"]), fmt_score(s["last_average"]), fmt_pct(s["gain_of_average"]),
            fmt_pct(s["mean_gain_from_base"]), fmt_pct(s["bwt_paper_mean"]),
            fmt_points(None if s["bwt"] is None else 100 * s["bwt"]),
            fmt_points(None if s["fwt"] is None else 100 * s["fwt"]),
            fmt_score(old_last), fmt_pct(old_gain, 2),
        ])
    tables.append(Table(
        "comparison_summary", "Method comparison", cols, body, None,
        ["avg = mean score x100 over tasks; gain of avg = relative change of the average (paper Tables 3/4); "
         "mean gain = mean of per-task relative gains (undefined tasks skipped; paper Tables 1/2); "
         "BWT mean = mean of the paper's per-task BWT; BWT/FWT (points) = Lopez-Paz & Ranzato's absolute "
         "figures x100; " + DASH + " = not applicable (e.g. BWT of a non-sequential method)."],
    ))
    return tables


# ------------------------------------------------------------------ renderers


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|")


def to_markdown(t: Table) -> str:
    lines = [f"**{t.title}**", "", "| " + " | ".join(_md_cell(c) for c in t.columns) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(t.columns) - 1)) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    for n in t.notes:  # one paragraph per note
        lines += ["", f"_{n}_"]
    return "\n".join(lines).rstrip() + "\n"


def to_csv(t: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(t.columns)
    w.writerows([["" if c == DASH else c for c in row] for row in t.rows])
    return buf.getvalue()


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", DASH: "--"}


def _tex(s: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in s)


def to_latex(t: Table) -> str:
    """A ``table`` environment using booktabs rules (``\\usepackage{booktabs}``)."""
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{l" + "r" * (len(t.columns) - 1) + "}", r"\toprule",
             " & ".join(_tex(c) for c in t.columns) + r" \\", r"\midrule"]
    for i, row in enumerate(t.rows):
        if t.summary_from is not None and i == t.summary_from:
            lines.append(r"\midrule")
        lines.append(" & ".join(_tex(c) for c in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\caption{" + _tex(t.title) + "}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_html(t: Table) -> str:
    out = [f'<table class="results"><caption>{html.escape(t.title)}</caption><thead><tr>']
    out += [f"<th>{html.escape(c)}</th>" for c in t.columns]
    out.append("</tr></thead><tbody>")
    for i, row in enumerate(t.rows):
        cls = ' class="summary"' if t.summary_from is not None and i >= t.summary_from else ""
        cells = [f"<th>{html.escape(row[0])}</th>"]
        for c in row[1:]:
            kind = ""
            if c[:1] in "+-" and c.strip("+-0.%"):  # signed and not zero: colour by sign
                kind = " neg" if c.startswith("-") else " pos"
            cells.append(f'<td class="num{kind}">{html.escape(c)}</td>')
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    out += [f'<p class="note">{html.escape(n)}</p>' for n in t.notes]
    return "\n".join(out)


# ------------------------------------------------------------------ weight-update diagnostics


def _num(v, digits: int = 3) -> str:
    return DASH if v is None else f"{v:.{digits}f}"


def diagnostics_table(results: dict, label: str | None = None) -> Table | None:
    """Pairwise collision / orthogonality of the rounds' updates, then each update's sparsity and norms.

    Definitions are those of :mod:`cairn.eval.diagnostics` (N-LoRA's analyses, arXiv 2410.10179).
    """
    diag = results.get("diagnostics")
    if not diag or not diag.get("pairs"):
        return None
    has_a = any(p.get("a_overlap") is not None for p in diag["pairs"])
    columns = ["rounds", "collision rate", "cosine", "input overlap", "output overlap"] + (
        ["A overlap", "A overlap L1 (O-LoRA)"] if has_a else [])
    rows = []
    for p in diag["pairs"]:
        row = [f"{p['i']} × {p['j']}", _num(p.get("collision_rate")), _num(p.get("cosine")),
               _num(p.get("input_overlap")), _num(p.get("output_overlap"))]
        if has_a:
            row += [_num(p.get("a_overlap")), _num(p.get("a_overlap_l1"), 1)]
        rows.append(row)
    summary_from = len(rows)
    for u in diag.get("updates", []):
        row = [f"{u['round']}: sparsity {_num(u.get('sparsity'))}", f"‖ΔW‖_F {_num(u.get('frobenius_norm'), 2)}",
               f"‖ΔW‖_* {_num(u.get('nuclear_norm'), 1)}", f"‖ΔW‖_1 {_num(u.get('l1'), 0)}", ""]
        rows.append(row + ([""] * 2 if has_a else []))
    thr = diag.get("threshold", {})
    notes = [f"An entry is significant when |x| > {thr.get('value')} ({thr.get('mode')} to the module's max |ΔW|); "
             "collision rate = |S_i ∩ S_j| / |S_i ∪ S_j|; cosine = |⟨ΔW_i, ΔW_j⟩| / (‖ΔW_i‖‖ΔW_j‖); input/output "
             "overlap = normalised ‖ΔW_i ΔW_jᵀ‖ on the input/output side; sparsity = share of insignificant entries. "
             "Pooled or averaged over modules (see cairn.eval.diagnostics)."]
    title = "Weight-update diagnostics" + (f" ({label})" if label else "")
    return Table("diagnostics", title, columns, rows, summary_from, notes)
