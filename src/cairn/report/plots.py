"""Report figures as PNG files, drawn with matplotlib's object API (no pyplot state, Agg canvas).

Figures follow the seed paper (Lee & Wynter 2024, arXiv:2410.13699): per-task acquisition right
after each task's own round (Fig. 5), per-task BWT at the end (Fig. 6), final gain from base per
method on new and old knowledge (Figs. 7-10), plus a round x task heatmap and old-knowledge
retention per round, and Fig. 2 (old knowledge averaged over each one-round method's models).
One-round methods enter the acquisition and gain figures with each task's own model (the
diagonal); methods run with several seeds are drawn at their mean with ± sd error bars. Every
function returns the PNG path, or ``None`` when its data is absent (e.g. no old-knowledge scores,
or only non-sequential methods for BWT) so the report skips it.
"""

from __future__ import annotations

import glob
import math
import os
from pathlib import Path

from matplotlib.figure import Figure

from cairn.eval import continual as C
from cairn.report.runs import Run
from cairn.report.stats import mean_sd
from cairn.report.tables import final_new, final_old, gain_matrix, old_knowledge_matrix

DPI = 110


def _nan(v: float | None) -> float:
    return math.nan if v is None else float(v)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    for stale in path.parent.glob(f".tmp-{glob.escape(path.name)}-*"):  # robust: left by a killed writer
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")  # robust: a kill never leaves a truncated PNG
    fig.savefig(tmp, dpi=DPI, format=path.suffix.lstrip(".") or "png")
    os.replace(tmp, path)
    return path


def _grouped_bars(groups: list[str], series: dict[str, list[float | None]], ylabel: str, title: str,
                  path: Path, percent_axis: bool = False,
                  errors: dict[str, list[float | None]] | None = None) -> Path | None:
    """Bars per group (task), one colour per series (method); ``None`` if every value is missing."""
    if not series or all(v is None for vals in series.values() for v in vals):
        return None
    n = len(series)
    width = 0.8 / n
    fig = Figure(figsize=(max(6.0, 0.9 * len(groups) * max(1, n) ** 0.5 + 2), 4.2))
    ax = fig.add_subplot()
    label_bars = n * len(groups) <= 40  # value labels only while they stay legible
    for j, (name, vals) in enumerate(series.items()):
        xs = [g + (j - (n - 1) / 2) * width for g in range(len(groups))]
        err = (errors or {}).get(name)
        yerr = [0.0 if e is None else e for e in err] if err and any(e is not None for e in err) else None
        bars = ax.bar(xs, [_nan(v) for v in vals], width=width, label=name, yerr=yerr, capsize=2 if yerr else 0)
        if label_bars:  # also makes a zero-height bar visible as "0"
            ax.bar_label(bars, labels=["" if v is None else f"{v:.0f}" for v in vals], fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), groups, rotation=30 if len(groups) > 5 else 0, ha="right" if len(groups) > 5 else "center")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.margins(y=0.12)  # headroom for the value labels, also when every bar is negative
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if percent_axis:
        ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0f}%")
    ax.grid(axis="y", alpha=0.3)
    if n > 1:
        ax.legend(fontsize=8, ncols=min(n, 4))
    return _save(fig, path)


def heatmap(run: Run, path: Path) -> Path | None:
    """Scores x100, rows = base and each round, columns = tasks."""
    R = run.results["matrix"]
    if not R:
        return None
    names = run.task_names
    rows = ["base"] + [str(r) for r in run.results["rows"][1:]]
    data = [[_nan(v) * 100 for v in row] for row in R]
    fig = Figure(figsize=(1.0 * len(names) + 3, 0.5 * len(rows) + 2))
    ax = fig.add_subplot()
    im = ax.imshow(data, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for k, row in enumerate(data):
        for i, v in enumerate(row):
            if not math.isnan(v):
                ax.text(i, k, f"{v:.1f}", ha="center", va="center", fontsize=8, color="white" if v < 60 else "black")
    ax.set_xlabel("task")
    ax.set_ylabel("after round")
    ax.set_title(f"Scores x100: {run.label}")
    fig.colorbar(im, ax=ax, fraction=0.04)
    return _save(fig, path)


def _curriculum_runs(runs: list[Run]) -> list[Run]:
    out = []
    for r in runs:
        K = len(r.results["matrix"]) - 1
        if K >= 1 and C.is_curriculum(r.task_names, r.results["rows"], K):
            out.append(r)
    return out


def _by_task(runs: list[Run], values: dict[str, list[float | None]]) -> tuple[list[str], dict[str, list[float | None]]]:
    """Align per-task lists of several runs on the union of their task names."""
    tasks: list[str] = []
    for r in runs:
        tasks += [t for t in r.task_names if t not in tasks]
    aligned = {r.label: [dict(zip(r.task_names, values[r.label])).get(t) for t in tasks] for r in runs}
    return tasks, aligned


def acquisition_plot(runs: list[Run], path: Path) -> Path | None:
    """Paper Fig. 5: each task's score right after its own round, bars per method."""
    seq = [r for r in runs if r.one_round or r in _curriculum_runs([r])]
    if not seq:
        return None

    def acq(results: dict, r: Run) -> list[float | None]:
        vals = final_new(results, r.spec) if r.one_round else C.acquisition(results["matrix"])
        return [None if v is None else 100 * v for v in vals]

    vals, errs = _seed_stats(seq, acq)
    tasks, aligned = _by_task(seq, vals)
    _, aligned_err = _by_task(seq, errs)
    return _grouped_bars(tasks, aligned, "score x100", "Acquisition: score right after the task's own round "
                         "(one-round: the task's own model)", path, errors=aligned_err)


def _seed_stats(runs: list[Run], fn) -> tuple[dict[str, list], dict[str, list]]:
    """Per run, the mean over seeds of ``fn(results, run)`` (a per-task list) and its sd."""
    means, sds = {}, {}
    for r in runs:
        per = [fn(x.results, r) for x in r.replicas]
        stats = [mean_sd([p[i] for p in per]) for i in range(len(per[0]))]
        means[r.label] = [m for m, _, _ in stats]
        sds[r.label] = [sd for _, sd, _ in stats]
    return means, sds


def bwt_plot(runs: list[Run], path: Path) -> Path | None:
    """Paper Fig. 6: per-task BWT (percent change from right-after-learning to the end)."""
    seq = [r for r in _curriculum_runs(runs) if len(r.results["matrix"]) > 2]
    if not seq:
        return None
    vals, errs = _seed_stats(seq, lambda res, r: C.bwt_paper(res["matrix"]))
    tasks, aligned = _by_task(seq, vals)
    _, aligned_err = _by_task(seq, errs)
    return _grouped_bars(tasks, aligned, "BWT (%)", "Backward transfer per task after the last round", path, True,
                         errors=aligned_err)


def _gain_series(mats: dict[str, list[tuple[list[str], list[list[float | None]]]]]):
    """Per-method gains from base (percent) with an AVE group, or change in points when some
    relative gain is undefined (a base score of 0), so that no bar silently goes missing.
    ``mats[label]`` holds one (names, [base row, final row]) per seed; bars are the mean over seeds."""
    use_pct = all(g is not None for reps in mats.values() for _, M in reps for g in C.gain_from_base(M))
    tasks: list[str] = []
    for reps in mats.values():
        tasks += [t for t in reps[0][0] if t not in tasks]
    aligned, errors = {}, {}
    for lab, reps in mats.items():
        per_seed = []
        for names, M in reps:
            v = C.gain_from_base(M) if use_pct else C.gain_from_base_points(M)
            row = [dict(zip(names, v)).get(t) for t in tasks]
            defined = [x for x in row if x is not None]
            per_seed.append(row + [sum(defined) / len(defined) if defined else None])
        stats = [mean_sd([p[i] for p in per_seed]) for i in range(len(tasks) + 1)]
        aligned[lab] = [m for m, _, _ in stats]
        errors[lab] = [sd for _, sd, _ in stats]
    return tasks + ["AVE"], aligned, use_pct, errors


def gain_plot(runs: list[Run], path: Path, which: str) -> Path | None:
    """Paper Figs. 7-10: final gain from base per task and method, for 'new' or 'old' knowledge."""
    mats: dict[str, list[tuple[list[str], list[list[float | None]]]]] = {}
    for r in runs:
        reps = []
        for x in r.replicas:
            res = x.results
            if which == "new":
                if len(res["matrix"]) >= 2:
                    reps.append((r.task_names, gain_matrix(res, r.spec)))
            else:
                o, fo = old_knowledge_matrix(res), final_old(res, r.spec)
                if o is not None and fo[1] is not None and len(o[2]) > 1:
                    reps.append((fo[0], [fo[1], fo[2]]))
        if reps:
            mats[r.label] = reps
    if not mats:
        return None
    groups, series, pct, errors = _gain_series(mats)
    what = "New knowledge" if which == "new" else "Old knowledge"
    if pct:
        return _grouped_bars(groups, series, "gain from base (%)", f"{what}: final gain from base", path, True,
                             errors=errors)
    return _grouped_bars(groups, series, "change from base (points)",
                         f"{what}: final change from base (points; some base scores are 0)", path, errors=errors)


def one_round_old_plot(runs: list[Run], path: Path) -> Path | None:
    """Paper Fig. 2: old-knowledge scores averaged over each one-round method's models, with the base."""
    items = []
    for r in runs:
        if not r.one_round:
            continue
        per = [final_old(x.results, r.spec) for x in r.replicas]
        per = [p for p in per if p is not None and p[1] is not None and any(v is not None for v in p[2])]
        if per:
            items.append((r, per))
    if not items:
        return None
    names = items[0][1][0][0]
    base = items[0][1][0][1]

    def with_ave(row):
        d = [v for v in row if v is not None]
        return [None if v is None else 100 * v for v in row] + [100 * sum(d) / len(d) if d else None]

    series = {"base": with_ave(base)}
    errors: dict[str, list[float | None]] = {"base": [None] * (len(names) + 1)}
    for r, per in items:
        rows = [with_ave([dict(zip(p[0], p[2])).get(t) for t in names]) for p in per]
        stats = [mean_sd([row[i] for row in rows]) for i in range(len(names) + 1)]
        series[r.label] = [m for m, _, _ in stats]
        errors[r.label] = [sd for _, sd, _ in stats]
    return _grouped_bars(names + ["AVE"], series, "score x100",
                         "Old knowledge averaged over the one-round models (paper Fig. 2)", path, errors=errors)


def old_average_plot(runs: list[Run], path: Path) -> Path | None:
    """Average old-knowledge score after each evaluated round, one line per method (x = round)."""
    fig = Figure(figsize=(7.5, 4.0))
    ax = fig.add_subplot()
    drawn = 0
    for r in runs:
        old = r.results.get("old_knowledge") or {}
        pts = []
        for k, row in enumerate(old.get("matrix") or []):
            vals = [v for v in (row or []) if v is not None]
            if vals:
                pts.append((k, 100 * sum(vals) / len(vals)))
        if pts:
            ax.plot([k for k, _ in pts], [v for _, v in pts], marker="o", label=r.label)
            drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("round (0 = base model)")
    ax.set_ylabel("old-knowledge average x100")
    ax.set_title("Old-knowledge retention per round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def old_retention_plot(runs: list[Run], path: Path) -> Path | None:
    """Old-knowledge scores per evaluated round: one panel per method, a line per task plus the
    average in bold (error bars where the run saved standard errors)."""
    items = [(r, old_knowledge_matrix(r.results)) for r in runs]
    items = [(r, o) for r, o in items if o is not None]
    if not items:
        return None
    fig = Figure(figsize=(7.5, 3.6 * len(items)))
    for j, (r, (names, labels, M)) in enumerate(items):
        ax = fig.add_subplot(len(items), 1, j + 1)
        old = r.results["old_knowledge"]
        ks = [k for k, row in enumerate(old["matrix"]) if row and any(v is not None for v in row)]
        stderr = old.get("stderr")
        xs = list(range(len(labels)))
        for i, name in enumerate(names):
            ys = [_nan(row[i]) * 100 for row in M]
            err = None
            if stderr and all(stderr[k] is not None for k in ks):
                err = [_nan(stderr[k][i]) * 100 for k in ks]
            ax.errorbar(xs, ys, yerr=err, marker="o", markersize=3, linewidth=1, capsize=2, label=name, alpha=0.85)
        avg = []
        for row in M:
            d = [v for v in row if v is not None]
            avg.append(100 * sum(d) / len(d) if d else math.nan)
        ax.plot(xs, avg, color="black", linewidth=2.5, marker="s", label="AVE")
        ax.set_xticks(xs, labels, rotation=20, ha="right")
        ax.set_ylabel("score x100")
        ax.set_title(f"Old knowledge per round: {r.label}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncols=4, loc="best")
    return _save(fig, path)
