"""Training-loss curves for the report, read from each round's ``train_log.jsonl``.

Every round directory holds ``train_log.jsonl`` (written by :mod:`cairn.tracking`): one entry per logged
optimizer step with the round-local ``step``, the experiment-wide ``global_step`` (round k's steps
continue after round k-1's), the learning rate, throughput and every loss term (``task``, and e.g.
O-LoRA's or EWC's penalty). This module collects those entries per method and seed and draws one panel
per loss term against the global step, so a spike, a divergence or a penalty that dwarfs the task loss
shows at a glance (the seed paper reports only end-of-round scores; the curves are cairn's addition).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cairn.report.runs import Run
from cairn.rundir import MethodDir
from cairn.tracking import read_train_log

#: Entry keys that are not loss terms (the step axes, the schedule, throughput and timing).
NOT_LOSS = ("step", "global_step", "lr", "epoch", "round")
NOT_LOSS_PARTS = ("tokens", "grad_norm", "seconds", "lr_")

DPI = 110


@dataclass
class Curve:
    """The logged loss terms of one method (one seed) over the global step, and where its rounds begin."""

    label: str
    method: str = ""  # lines of one method's seeds share its colour
    steps: list[int] = field(default_factory=list)
    terms: dict[str, list[float | None]] = field(default_factory=dict)
    round_starts: list[tuple[int, str]] = field(default_factory=list)  # (first global step, round label)


def is_loss_term(key: str) -> bool:
    return key not in NOT_LOSS and not any(p in key for p in NOT_LOSS_PARTS)


def method_curve(path: Path, label: str, method: str | None = None) -> Curve | None:
    """One method directory's curve over its rounds in order; None when no round logged a step."""
    curve = Curve(label, method or label)
    offset = 0  # logs without global_step (older runs): rounds follow each other on the axis
    for rdir in MethodDir(Path(path)).rounds():
        entries = read_train_log(rdir / "train_log.jsonl")
        if not entries:
            continue
        first = entries[0].get("global_step", entries[0]["step"] + offset)
        curve.round_starts.append((int(first) - int(entries[0]["step"]), rdir.name.split("-", 1)[-1]))
        for e in entries:
            g = int(e.get("global_step", e["step"] + offset))
            curve.steps.append(g)
            for key, value in e.items():
                if is_loss_term(key) and isinstance(value, (int, float)):
                    curve.terms.setdefault(key, [None] * (len(curve.steps) - 1)).append(float(value))
            for values in curve.terms.values():  # a term this entry lacks stays a gap
                if len(values) < len(curve.steps):
                    values.append(None)
        offset = curve.steps[-1]
    return curve if curve.steps else None


def run_curves(runs: list[Run]) -> list[Curve]:
    """A curve per method, one per seed for a method run with several seeds."""
    curves = []
    for run in runs:
        for rep in run.replicas:
            seed = rep.results.get("seed")
            label = run.label if not run.seeded else f"{run.label} (seed {seed})"
            c = method_curve(rep.path, label, run.label)
            if c is not None:
                curves.append(c)
    return curves


def _order(terms: set[str]) -> list[str]:
    head = [t for t in ("loss", "task") if t in terms]
    return head + sorted(terms - set(head))


def loss_plot(runs: list[Run], path: Path) -> Path | None:
    """One panel per loss term (total/task loss first), loss against global step, a line per method and
    seed (seeds of a method share its colour); dotted lines mark round starts when one method is drawn."""
    curves = run_curves(runs)
    if not curves:
        return None
    terms = _order({t for c in curves for t in c.terms})
    methods = list(dict.fromkeys(c.method for c in curves))
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    ncols = min(len(terms), 2)
    nrows = math.ceil(len(terms) / ncols)
    fig = Figure(figsize=(6.2 * ncols, 3.6 * nrows))
    for i, term in enumerate(terms):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        shown = set()
        positive = True
        span = []
        for c in curves:
            vals = c.terms.get(term)
            if vals is None:
                continue
            method = c.method
            xs = [s for s, v in zip(c.steps, vals) if v is not None and math.isfinite(v)]
            ys = [v for v in vals if v is not None and math.isfinite(v)]
            positive &= all(v > 0 for v in ys)
            span += ys
            ax.plot(xs, ys, color=colours[method], linewidth=1.2, alpha=0.9 if method not in shown else 0.55,
                    label=method if method not in shown else None)
            shown.add(method)
        if len(methods) == 1:
            for start, label in curves[0].round_starts[1:]:
                ax.axvline(start, color="grey", linestyle=":", linewidth=0.8)
        if positive and span and max(span) / min(span) > 20:  # losses fall by orders of magnitude
            ax.set_yscale("log")
        ax.set_title(term if term not in ("task", "loss") else f"{term} loss")
        ax.set_xlabel("global step (rounds follow each other)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(methods) > 1 and i == 0:
            ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path
