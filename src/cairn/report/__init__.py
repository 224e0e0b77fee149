"""Build a report from saved results only (no model is loaded).

``build_report([run_or_experiment_dir, ...], out_dir)`` writes, under ``out_dir``:

- ``tables/<name>.{md,csv,tex}``: the paper-shaped tables (see :mod:`cairn.report.tables`), and
  ``tables.md`` with all of them;
- ``plots/*.png`` (see :mod:`cairn.report.plots`), with the training-loss curves read from each round's
  ``train_log.jsonl`` (see :mod:`cairn.report.curves`);
- ``report.html``: one self-contained page with every table, figure and each run's configuration;
- ``findings.md`` (several methods): the seed paper's checkable claims and whether this run
  supports, contradicts or cannot tell them (see :mod:`cairn.report.findings`).

Several directories (or an experiment directory with one sub-directory per method) are compared as
methods. The default ``out_dir`` is ``<first dir>/report``. Files are written one by one atomically,
so a crash never leaves a half-written file, and nothing else in ``out_dir`` is touched.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

from cairn.atomic import write_text
from cairn.report.html import Figure, Section, pretty_json, render_page
from cairn.report.runs import Loaded, Run, load_runs
from cairn.report.findings import findings_markdown, findings_section
from cairn.report.tables import (
    Table,
    comparison_tables,
    significance_table,
    diagnostics_table,
    new_knowledge_table,
    new_knowledge_table_markdown,
    old_knowledge_table,
    to_csv,
    to_latex,
    to_markdown,
)

__all__ = ["build_report", "new_knowledge_table_markdown"]


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "run"


def _write_table(t: Table, out: Path, stem: str) -> None:
    write_text(out / "tables" / f"{stem}.md", to_markdown(t))
    write_text(out / "tables" / f"{stem}.csv", to_csv(t))
    write_text(out / "tables" / f"{stem}.tex", to_latex(t))


def _run_meta(run: Run) -> list[tuple[str, str]]:
    res = run.results
    meta = [("directory", str(run.path))]
    for key in ("method", "model"):
        if res.get(key):
            meta.append((key, str(res[key])))
    tasks = [f"{t['name']} ({t['metric']})" if isinstance(t, dict) and t.get("metric") else
             (t["name"] if isinstance(t, dict) else str(t)) for t in res["tasks"]]
    meta.append(("tasks, in order", ", ".join(tasks)))
    timing = res.get("timing") or {}
    for key, value in timing.items():
        if isinstance(value, (int, float)):
            meta.append((key.replace("_", " "), f"{value:,.1f}"))
    return meta


def _figures_for(runs: list[Run], plot_dir: Path, stem: str) -> list[Figure]:
    """The cross-method figures (also drawn for a single run), skipping those without data."""
    from cairn.report import plots  # matplotlib loads only when figures are drawn

    # several methods: one average line per method; one method: a line per old task
    if len(runs) > 1:
        retention = (plots.old_average_plot, f"old_average{stem}.png",
                     "Average old-knowledge score after each round, per method.")
    else:
        retention = (plots.old_retention_plot, f"old_retention{stem}.png", "Old-knowledge scores after each evaluated round.")
    specs = [
        (plots.acquisition_plot, f"acquisition{stem}.png",
         "Score on each task right after its own round (acquisition; paper Fig. 5)."),
        (plots.bwt_plot, f"bwt{stem}.png", "Backward transfer per task after the last round (paper Fig. 6)."),
        (lambda rs, p: plots.gain_plot(rs, p, "new"), f"gain_new{stem}.png",
         "Final gain from base on new knowledge (paper Figs. 7/9)."),
        (lambda rs, p: plots.gain_plot(rs, p, "old"), f"gain_old{stem}.png",
         "Final gain from base on old knowledge (paper Figs. 7/10)."),
        (plots.one_round_old_plot, f"one_round_old{stem}.png",
         "Old knowledge averaged over each one-round method's models, per test, next to the base (paper Fig. 2)."),
        retention,
    ]
    from cairn.report.curves import loss_plot

    specs.append((loss_plot, f"loss{stem}.png",
                  "Training loss terms against the global step (each round's train_log.jsonl); one line per "
                  "method and seed" + (", dotted lines where a round begins." if len(runs) == 1 else ".")))
    figs = []
    for fn, name, caption in specs:
        path = fn(runs, plot_dir / name)
        if path is not None:
            figs.append(Figure(path, caption))
    return figs


def build_report(run_dirs: list[Path], out_dir: Path | None = None) -> Path:
    """Write tables, plots and ``report.html`` for the given run / experiment directories.

    Returns the path of ``report.html``. Raises :class:`cairn.errors.CairnError` when a directory
    holds no results.
    """
    from cairn.report import plots  # matplotlib loads only when a report is built

    run_dirs = [Path(d) for d in run_dirs]
    loaded: Loaded = load_runs(run_dirs)
    out = Path(out_dir) if out_dir is not None else run_dirs[0] / "report"
    out.mkdir(parents=True, exist_ok=True)
    plot_dir = out / "plots"
    runs = loaded.runs
    multi = len(runs) > 1
    markdown: list[str] = []
    sections: list[Section] = []

    comp = comparison_tables(runs, old_intervals=True)
    sig = significance_table(runs) if multi else None
    if sig is not None:
        comp = comp + [sig]
    if multi:
        fs = findings_section(runs)
        sections.append(fs)
        write_text(out / "findings.md", findings_markdown(fs))
        markdown.append(findings_markdown(fs))
        cs = Section("Method comparison", tables=comp)
        cs.warnings += [f"Method {m} is not shown: {status}." for m, status in loaded.skipped]
        cs.figures = _figures_for(runs, plot_dir, "")
        sections.append(cs)
        for t in comp:
            _write_table(t, out, t.name)
            markdown.append(to_markdown(t))

    for run in runs:
        stem = _slug(run.label)
        s = Section(run.label if multi else f"Run: {run.label}", meta=_run_meta(run))
        if not multi:
            s.warnings += [f"Method {m} is not shown: {status}." for m, status in loaded.skipped]
        reps = [x.results for x in run.replicas] if run.seeded else None
        tables = [new_knowledge_table(run.results, run.label, reps, run.spec)]
        old = old_knowledge_table(run.results, run.label, reps, run.spec)
        if old is not None:
            tables.append(old)
        diag = diagnostics_table(run.results, run.label)
        if diag is not None:
            tables.append(diag)
        if not multi:
            tables.append(next(t for t in comp if t.name == "comparison_summary"))  # the one-line summary
        for t in tables:
            _write_table(t, out, f"{t.name}_{stem}" if t.name != "comparison_summary" else "summary")
            markdown.append(to_markdown(t))
        s.tables = tables
        heat = plots.heatmap(run, plot_dir / f"heatmap_{stem}.png")
        s.figures = [Figure(heat, "Scores x100 on every task (columns) after every round (rows).")] if heat else []
        if multi:
            ret = plots.old_retention_plot([run], plot_dir / f"old_retention_{stem}.png")
            if ret:
                s.figures.append(Figure(ret, "Old-knowledge scores after each evaluated round."))
        else:
            s.figures += _figures_for([run], plot_dir, f"_{stem}")
        if run.config_text is not None:
            s.details.append(("config.yaml", run.config_text))
        for key in ("figures", "diagnostics"):
            if run.results.get(key):
                s.details.append((f"{key} (from results.json)", pretty_json(run.results[key])))
        sections.append(s)

    write_text(out / "tables.md", "\n".join(markdown))
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = f"{len(runs)} method{'s' if multi else ''}: {', '.join(r.label for r in runs)} · generated {when}"
    page = render_page("cairn report", subtitle, sections)
    write_text(out / "report.html", page)
    return out / "report.html"
