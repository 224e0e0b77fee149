"""Result tables shaped like the seed paper's (Lee & Wynter 2024, arXiv:2410.13699), in Markdown,
CSV, LaTeX and HTML.

- :func:`old_knowledge_table`: Tables 1/2, old-knowledge scores per round, with a gain-from-base
  row whose AVE cell is the *mean of the per-task gains* (as the paper computes it there).
- :func:`new_knowledge_table`: Tables 3/4, rows "base", "after <task>", ..., columns = tasks, with
  gain-from-base (AVE cell: *gain of the average*, as the paper computes it there), change in
  points (defined even when a base score is 0) and BWT rows.
- :func:`comparison_tables`: Tables 5/6, final scores per method on new and old knowledge, plus a
  one-line-per-method summary (gain from base, BWT, last-round average, old-knowledge gain).
- :func:`significance_table`: which differences between methods a paired bootstrap cannot tell apart.

One-round methods (every task trained from the base) are read as the seed paper reads them: a
task's final score is its own model's (the diagonal ``R[i+1][i]``), and old knowledge is the mean
over the one-round models (Fig. 2). Methods run with several seeds show ``mean ± sd`` (each figure
computed per seed, then averaged); single-seed comparison cells show a per-item bootstrap interval
``value [low, high]`` when the run saved its predictions (see :mod:`cairn.report.stats`).

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
from cairn.report.runs import Run, strategy_of, task_names
from cairn.report.stats import bootstrap_ci, mean_sd, paired_bootstrap

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


def fmt_sd(kind: str, sd: float | None) -> str:
    if sd is None:
        return ""
    return f" ± {100 * sd:.1f}" if kind == "score" else f" ± {sd:.{2 if kind == 'pct2' else 1}f}"


_FMT = {"score": fmt_score, "pct": fmt_pct, "pct2": lambda v: fmt_pct(v, 2), "points": fmt_points}


def fmt_cell(kind: str, values: list[float | None]) -> str:
    """One cell from the per-seed values: the value, or ``mean ± sd`` over seeds."""
    if len(values) == 1:
        return _FMT[kind](values[0])
    m, sd, n = mean_sd(values)
    return _FMT[kind](m) + (fmt_sd(kind, sd) if n > 1 else "")


def fmt_interval(kind: str, iv) -> str:
    """``value [low, high]`` of a bootstrap interval."""
    f = _FMT[kind]
    return f"{f(iv.estimate)} [{f(iv.low)}, {f(iv.high)}]"


def _row_labels(results: dict, curriculum: bool) -> list[str]:
    rows = list(results["rows"])
    return ["base"] + [f"after {r}" if curriculum else str(r) for r in rows[1:]]


# ------------------------------------------------------------------ one-round methods


def is_one_round(results: dict, spec: dict | None = None) -> bool:
    return strategy_of(results, spec) == "one-round"


def final_new(results: dict, spec: dict | None = None) -> list[float | None]:
    """Each task's final score: the last row, or for a one-round method each task's own model
    (``R[i+1][i]``, the diagonal), as the seed paper's one-round bars (Figs. 1 and 4)."""
    R = results["matrix"]
    if is_one_round(results, spec):
        return [R[i + 1][i] if i + 1 < len(R) else None for i in range(len(R[0]))]
    return list(R[-1])


def gain_matrix(results: dict, spec: dict | None = None) -> list[list[float | None]]:
    """``[base row, final row]``: what gain-from-base figures compare."""
    return [list(results["matrix"][0]), final_new(results, spec)]


def final_old(results: dict, spec: dict | None = None) -> tuple[list[str], list[float | None] | None, list[float | None]] | None:
    """(old tasks, base row or None, final row). A one-round method's final row is the mean over its
    one-round models (the seed paper's Fig. 2); otherwise the last evaluated round."""
    got = old_knowledge_matrix(results)
    if got is None:
        return None
    names, labels, M = got
    base = M[0] if labels[0] == "base" else None
    if is_one_round(results, spec):
        models = M[1:] if base is not None else M
        if not models:
            return names, base, [None] * len(names)
        return names, base, [_mean(col) for col in zip(*models)]
    return names, base, M[-1]


# ------------------------------------------------------------------ per-run tables


def _new_rows(results: dict, spec: dict | None) -> tuple[list[tuple[str, str, list]], int, list[str]]:
    """Numeric body of the new-knowledge table: (label, kind, values incl. AVE), summary start, notes."""
    names = task_names(results)
    R = results["matrix"]
    K, _ = C.check_matrix(R)
    one_round = is_one_round(results, spec)
    seq = C.is_curriculum(names, results["rows"], K) and not one_round
    rows = [(lab, "score", list(row) + [_mean(row)]) for lab, row in zip(_row_labels(results, seq), R)]
    notes = []
    G = R
    if one_round:
        diag = final_new(results, spec)
        rows.append(("own model (diagonal)", "score", diag + [_mean(diag)]))
        G = gain_matrix(results, spec)
        notes.append("One-round method: each row is a model trained from the base on one task; its final "
                     "score on a task is that task's own model (the diagonal), which the gain rows use.")
    summary_from = len(rows)
    points = C.gain_from_base_points(G)
    rows.append(("gain from base (%)", "pct", C.gain_from_base(G) + [C.gain_of_average(G)]))
    rows.append(("change from base (points)", "points", points + [_mean(points)]))
    notes.insert(0,
        "Scores x100. Gain from base = 100 (last - base) / base per task; its AVE cell is the gain "
        "of the average score (as in the paper's Tables 3/4). " + DASH + " = undefined (base score 0) "
        "or not evaluated; the change in points is always defined."
    )
    if seq and K >= 2:
        rows.append(("BWT (%)", "pct", C.bwt_paper(R) + [C.bwt_paper_mean(R)]))
        notes.append(
            "BWT = 100 (final - right after learning) / right after learning, for tasks learned before "
            "the last round; AVE = their mean."
        )
    return rows, summary_from, notes


def _combine(per_replica: list[list[tuple[str, str, list]]]) -> list[list[str]]:
    """Format rows computed per seed: ``mean ± sd`` where there are several seeds."""
    body = []
    for j, (lab, kind, _) in enumerate(per_replica[0]):
        cols = len(per_replica[0][j][2])
        body.append([lab] + [fmt_cell(kind, [rep[j][2][c] for rep in per_replica]) for c in range(cols)])
    return body


def _seed_note(replicas: list[dict] | None) -> list[str]:
    if replicas and len(replicas) > 1:
        seeds = [r.get("seed") for r in replicas]
        return [f"Mean ± sample sd over {len(replicas)} seeds ({', '.join(str(s) for s in seeds)}); each figure is "
                "computed per seed, then averaged."]
    return []


def new_knowledge_table(results: dict, label: str | None = None, replicas: list[dict] | None = None,
                        spec: dict | None = None) -> Table:
    """Paper Tables 3/4 for one run: scores per round on the curriculum's tasks (mean ± sd over seeds
    when ``replicas`` holds several seeds' results)."""
    names = task_names(results)
    reps = replicas if replicas and len(replicas) > 1 else [results]
    computed = [_new_rows(r, spec) for r in reps]
    body = _combine([c[0] for c in computed])
    notes = computed[0][2] + _seed_note(replicas)
    title = "New knowledge: acquisition and retention" + (f" ({label})" if label else "")
    return Table("new_knowledge", title, ["", *names, "AVE"], body, computed[0][1], notes)


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


def _old_body(results: dict, spec: dict | None):
    names, labels, M = old_knowledge_matrix(results)
    rows = [(lab, "score", list(row) + [_mean(row)]) for lab, row in zip(labels, M)]
    notes = []
    G = [M[0], M[-1]] if labels[0] == "base" and len(M) > 1 else None
    if is_one_round(results, spec) and len(M) > 1:
        _, base, avg = final_old(results, spec)
        rows.append(("mean over one-round models", "score", avg + [_mean(avg)]))
        G = [base, avg] if base is not None else None
        notes.append("One-round method: old knowledge averaged over its one-round models per test (the seed "
                     "paper's Fig. 2); the gain row compares that average with the base.")
    summary_from = len(rows)
    if G is not None:
        rows.append(("gain from base (%)", "pct2", C.gain_from_base(G) + [C.mean_gain_from_base(G)]))
        last = "the mean over one-round models" if is_one_round(results, spec) else f"'{labels[-1]}'"
        notes.append(
            f"Gain from base compares {last} with 'base'; its AVE cell is the mean of the per-task "
            "gains (as in the paper's Tables 1/2)."
        )
    return rows, summary_from, notes


def old_knowledge_table(results: dict, label: str | None = None, replicas: list[dict] | None = None,
                        spec: dict | None = None) -> Table | None:
    """Paper Tables 1/2 for one run: old-knowledge scores per evaluated round, with a gain row."""
    got = old_knowledge_matrix(results)
    if got is None:
        return None
    names = got[0]
    reps = replicas if replicas and len(replicas) > 1 else [results]
    reps = [r for r in reps if old_knowledge_matrix(r) is not None and old_knowledge_matrix(r)[0] == names]
    computed = [_old_body(r, spec) for r in reps]
    body = _combine([c[0] for c in computed])
    notes = ["Scores x100."]
    metrics = (results.get("old_knowledge") or {}).get("metric") or {}
    if metrics:
        notes.append("Metrics: " + ", ".join(f"{t}: {metrics[t]}" for t in names if t in metrics) + ".")
    notes += computed[0][2] + _seed_note(replicas)
    title = "Old knowledge: retention" + (f" ({label})" if label else "")
    return Table("old_knowledge", title, ["", *names, "AVE"], body, computed[0][1], notes)


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


def _replica_results(r: Run) -> list[dict]:
    return [x.results for x in r.replicas]


def _interval_cells(r: Run, cols: list[str]) -> list[str] | None:
    """Single-seed runs: per-task and AVE cells with a per-item bootstrap interval, when items exist."""
    if r.seeded:
        return None
    from cairn.report.items import final_items

    items = final_items(r)
    if items is None:
        return None
    cells = [fmt_interval("score", bootstrap_ci([items[c]])) if c in items else DASH for c in cols]
    cells.append(fmt_interval("score", bootstrap_ci([items[c] for c in cols if c in items])))
    return cells


def comparison_tables(runs: list[Run], old_intervals: bool = False) -> list[Table]:
    """Tables 5/6 (final scores per method) and a summary line per method.

    New-knowledge cells of single-seed runs carry a per-item bootstrap interval when predictions were
    saved; ``old_intervals`` adds a normal interval from the suite's standard errors to single-seed
    old-knowledge cells (the report and the demo ask for it)."""
    tables: list[Table] = []
    new_cols = _union([r.task_names for r in runs])
    base_run = runs[0]
    base_row = _final_by_name(base_run.task_names, base_run.results["matrix"][0], new_cols)
    body = [["base"] + [fmt_score(v) for v in base_row] + [fmt_score(_mean(base_row))]]
    any_ci = any_sd = any_one_round = False
    for r in runs:
        cells = _interval_cells(r, new_cols)
        if cells is not None:
            any_ci = True
            body.append([r.label] + cells)
            continue
        finals = [_final_by_name(r.task_names, final_new(x, r.spec), new_cols) for x in _replica_results(r)]
        any_sd |= r.seeded
        any_one_round |= r.one_round
        body.append([r.label] + [fmt_cell("score", [f[c] for f in finals]) for c in range(len(new_cols))]
                    + [fmt_cell("score", [_mean(f) for f in finals])])
    notes = ["Scores x100 of each method's final model (its last row; for a one-round method each task's own "
             "model, the diagonal); base from " + f"'{base_run.label}'."]
    if any_sd:
        notes.append("a ± b = mean ± sample sd over seeds.")
    if any_ci:
        notes.append("a [lo, hi] = single seed with a 95% per-item bootstrap interval (items resampled per task; "
                     "AVE resamples every task).")
    if any(_final_by_name(r.task_names, r.results["matrix"][0], new_cols) != base_row for r in runs[1:]):
        notes.append("Note: the methods' base rows differ (different evaluation sets or models).")
    tables.append(Table("comparison_new", "New knowledge: final scores per method", ["", *new_cols, "AVE"], body, None, notes))

    olds = [(r, final_old(r.results, r.spec)) for r in runs]
    olds = [(r, o) for r, o in olds if o is not None]
    if olds:
        old_cols = _union([o[0] for _, o in olds])
        r0, (n0, base0, _) = olds[0]
        body = []
        if base0 is not None:
            b = _final_by_name(n0, base0, old_cols)
            body.append(["base"] + [fmt_score(v) for v in b] + [fmt_score(_mean(b))])
        any_se = False
        for r, (names, _, _) in olds:
            se_cells = None if r.seeded or not old_intervals else _old_se_cells(r, old_cols)
            if se_cells is not None:
                any_se = True
                body.append([r.label] + se_cells)
                continue
            finals = []
            for x in _replica_results(r):
                fo = final_old(x, r.spec)
                if fo is not None:
                    finals.append(_final_by_name(fo[0], fo[2], old_cols))
            body.append([r.label] + [fmt_cell("score", [f[c] for f in finals]) for c in range(len(old_cols))]
                        + [fmt_cell("score", [_mean(f) for f in finals])])
        tables.append(
            Table("comparison_old", "Old knowledge: final scores per method", ["", *old_cols, "AVE"], body, None,
                  ["Scores x100 of each method's last evaluated round (for a one-round method the mean over its "
                   "one-round models, the seed paper's Fig. 2); base from " + f"'{r0.label}'."]
                  + (["a ± b = mean ± sample sd over seeds."] if any(r.seeded for r, _ in olds) else [])
                  + (["a [lo, hi] = single seed, 95% normal interval from the suite's standard errors "
                      "(AVE: sqrt(Σ se²) / tasks)."] if any_se else []))
        )

    cols = ["method", "new: base avg", "new: last avg", "new: gain of avg (%)", "new: mean gain (%)",
            "BWT mean (%)", "BWT (points)", "FWT (points)", "old: last avg", "old: mean gain (%)"]
    body = []
    for r in runs:
        per = [summary_values(x, r.spec) for x in _replica_results(r)]
        kinds = ["score", "score", "pct", "pct", "pct", "points", "points", "score", "pct2"]
        body.append([r.label] + [fmt_cell(k, [p[j] for p in per]) for j, k in enumerate(kinds)])
    tables.append(Table(
        "comparison_summary", "Method comparison", cols, body, None,
        ["avg = mean score x100 over tasks; gain of avg = relative change of the average (paper Tables 3/4); "
         "mean gain = mean of per-task relative gains (undefined tasks skipped; paper Tables 1/2); "
         "BWT mean = mean of the paper's per-task BWT; BWT/FWT (points) = Lopez-Paz & Ranzato's absolute "
         "figures x100; " + DASH + " = not applicable (e.g. BWT of a non-sequential method). One-round methods "
         "use each task's own model (new) and the mean over their models (old)."]
        + (["a ± b = mean ± sample sd over seeds."] if any(r.seeded for r in runs) else []),
    ))
    return tables


def _old_se_cells(r: Run, cols: list[str]) -> list[str] | None:
    """Single-seed old-knowledge cells with a normal 95% interval from the saved standard errors."""
    from cairn.report.stats import Interval

    res = r.results
    old = res.get("old_knowledge") or {}
    stderr, fo = old.get("stderr"), final_old(res, r.spec)
    if not stderr or fo is None:
        return None
    names = fo[0]
    ks = [k for k, row in enumerate(old["matrix"]) if row and any(v is not None for v in row)]
    ks = [k for k in ks if k > 0] if r.one_round else ks[-1:]
    if not ks or any(k >= len(stderr) or not stderr[k] or any(v is None for v in stderr[k]) for k in ks):
        return None
    # a one-round mean over models keeps the items' noise: the mean of the models' se (conservative)
    se = [sum(stderr[k][i] for k in ks) / len(ks) for i in range(len(names))]
    by_v, by_se = dict(zip(names, fo[2])), dict(zip(names, se))
    z = 1.959963984540054
    cells = []
    for c in cols:
        v, e = by_v.get(c), by_se.get(c)
        cells.append(DASH if v is None else fmt_interval("score", Interval(v, v - z * e, v + z * e)))
    vals = [by_v[c] for c in cols if by_v.get(c) is not None]
    if not vals:
        return cells + [DASH]
    ave = sum(vals) / len(vals)
    e = (sum(by_se[c] ** 2 for c in cols if by_v.get(c) is not None) ** 0.5) / len(vals)
    return cells + [fmt_interval("score", Interval(ave, ave - z * e, ave + z * e))]


def summary_values(results: dict, spec: dict | None = None) -> list[float | None]:
    """The summary line's numbers for one results dict (one seed)."""
    one_round = is_one_round(results, spec)
    R = gain_matrix(results, spec) if one_round else results["matrix"]
    rows = ["base", "own model"] if one_round else results["rows"]
    s = C.summarize(R, task_names(results), rows)
    fo = final_old(results, spec)
    old_last = _mean(fo[2]) if fo else None
    old_gain = C.mean_gain_from_base([fo[1], fo[2]]) if fo and fo[1] is not None and (
        one_round or len(old_knowledge_matrix(results)[2]) > 1) else None
    return [s["base_average"], s["last_average"], s["gain_of_average"], s["mean_gain_from_base"],
            s["bwt_paper_mean"], None if s["bwt"] is None else 100 * s["bwt"],
            None if s["fwt"] is None else 100 * s["fwt"], old_last, old_gain]


def significance_table(runs: list[Run]) -> Table | None:
    """Pairwise differences of the final new-knowledge average, with which ones are not significant.

    Test: paired bootstrap over test items (stratified by task; items' scores averaged over seeds),
    95% percentile interval of the difference; "n.s." when it contains 0. Needs each run's saved
    predictions; pairs without them are left out.
    """
    from cairn.report.items import final_items

    have = []
    for r in runs:
        items = final_items(r)
        if items is not None:
            have.append((r, items))
    rows = []
    for a in range(len(have)):
        for b in range(a + 1, len(have)):
            (ra, ia), (rb, ib) = have[a], have[b]
            common = [t for t in ia if t in ib and len(ia[t]) == len(ib[t])]
            if not common:
                continue
            iv = paired_bootstrap([ia[t] for t in common], [ib[t] for t in common])
            rows.append([f"{ra.label} − {rb.label}", fmt_interval("points", _pts(iv)),
                         "yes" if iv.excludes_zero() else "n.s."])
    if not rows:
        return None
    return Table("comparison_significance", "New knowledge: pairwise differences of the final average",
                 ["pair", "difference (points) [95% interval]", "significant"], rows, None,
                 ["Paired bootstrap over test items (2000 resamples, items resampled within each task, the same "
                  "resample for both methods; with several seeds each item's score is first averaged over seeds). "
                  "n.s. = the 95% interval contains 0: this run cannot tell the two methods apart."])


def _pts(iv):
    from cairn.report.stats import Interval

    return Interval(100 * iv.estimate, 100 * iv.low, 100 * iv.high)


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
