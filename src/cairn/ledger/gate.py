"""The regression gate: a new release must not forget what earlier contributions added.

For every probe set recorded before the contribution, the release's per-item scores are compared
with its parent's on the same items (a paired design: the same questions, before and after). The
drop in points (100 x score) is bootstrapped over items (Efron & Tibshirani 1993, the paired
percentile bootstrap; the same resampled items for both releases) to get an interval. A probe
*fails* when the drop exceeds the policy's ``max_drop`` AND the interval excludes no change (its
upper end is below 0): a drop beyond the threshold that the items cannot distinguish from noise is
only flagged. One failing probe makes the release ``rejected`` (``action: reject``) or ``flagged``
(``action: flag``).

A row without per-item scores cannot be bootstrapped: an imported run that saved only aggregate
old-knowledge scores gives an ``aggregate`` row (both means and their difference, no interval), and
a check the policy asks for that the run never scored gives an ``unscored`` row. Either flags the
release: it is never silently accepted on a check that could not be made.

Hand-written: the policy and the bootstrap (a few lines of numpy; no library gate exists).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from cairn.errors import CairnError


@dataclass
class Policy:
    max_drop: float = 5.0          # points (100 x metric) a probe may lose against the parent
    action: Literal["reject", "flag"] = "reject"
    confidence: float = 0.95       # two-sided bootstrap interval
    bootstrap: int = 2000          # resamples
    seed: int = 0
    # Optional old-knowledge suite subset in the gate: {tasks: [...], limit: 50, data_dir, seed, batch_size}
    old_knowledge: dict | None = None
    # Fully cooperative contributions (--data) store their training rows in the artifact store, so later
    # contributions can replay them (method replay > 0 needs it). Adapters and models never store data.
    keep_data: bool = False

    def validate(self, where: str) -> "Policy":
        from cairn.ledger.old_knowledge import check_spec

        check_spec(self.old_knowledge, where)
        if not self.max_drop >= 0:
            raise CairnError(f"{where}: max_drop must be >= 0 points, got {self.max_drop}")
        if self.action not in ("reject", "flag"):
            raise CairnError(f"{where}: action must be 'reject' or 'flag', got {self.action!r}")
        if not 0.5 <= self.confidence < 1:
            raise CairnError(f"{where}: confidence must be in [0.5, 1), got {self.confidence}")
        if self.bootstrap < 100:
            raise CairnError(f"{where}: bootstrap must be >= 100 resamples, got {self.bootstrap}")
        if not isinstance(self.keep_data, bool):
            raise CairnError(f"{where}: keep_data must be true or false, got {self.keep_data!r}")
        return self


def read_policy_file(path: str | Path | None) -> dict:
    """The mapping of a policy YAML file (``{}`` without a file): keys of :class:`Policy`, and ``method``
    (the project's training method, read by :mod:`cairn.ledger.method`)."""
    import yaml

    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise CairnError(f"policy file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise CairnError(f"policy file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise CairnError(f"policy file {path} must hold a mapping of {', '.join(Policy.__annotations__)}, method")
    return data


def load_policy(path: str | Path | None, overrides: dict, data: dict | None = None) -> Policy:
    """A policy from a YAML file (keys of :class:`Policy`) with command-line overrides applied.

    ``data``: the file's mapping already read (without its ``method``), instead of reading ``path``.
    """
    where = str(path) if path is not None else "policy"
    data = dict(read_policy_file(path) if data is None else data)
    known = {f.name for f in dataclasses.fields(Policy)}
    unknown = set(data) - known
    if unknown:
        raise CairnError(f"{where}: unknown policy key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Policy(**data).validate(where)
    except TypeError as exc:
        raise CairnError(f"{where}: {exc}") from None


def paired_bootstrap(before: list[float], after: list[float], policy: Policy) -> tuple[float, float, float]:
    """Mean change in points (after - before) and its percentile interval over resampled items."""
    a = np.asarray(before, dtype=float)
    b = np.asarray(after, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise CairnError(f"paired comparison needs the same non-empty items before and after ({a.size} vs {b.size})")
    diff = 100.0 * (b - a)
    rng = np.random.default_rng(policy.seed)
    idx = rng.integers(0, diff.size, size=(policy.bootstrap, diff.size))
    means = diff[idx].mean(axis=1)
    tail = (1 - policy.confidence) / 2
    return float(diff.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def decide(rows: list[dict], policy: Policy) -> dict:
    """Gate decision from rows {probe, metric, parent: [items], release: [items], new: bool}.

    A row may instead carry ``aggregate: {parent, release, n}`` (mean scores in [0, 1], no items) or
    ``unscored: why``. Returns {"status", "policy", "table": [...]}; each table row has parent/release
    scores (points), delta, interval (None without items) and a verdict: ok, new (the contribution's
    own probe, not gated), noisy (beyond the threshold but within noise), fail, aggregate (no items:
    no interval) or unscored. Aggregate and unscored rows flag the release.
    """
    table, failed = [], False
    for row in rows:
        if "unscored" in row:
            table.append({"probe": row["probe"], "metric": row["metric"], "n": 0, "parent": None, "release": None,
                          "delta": None, "lo": None, "hi": None, "verdict": "unscored", "note": row["unscored"]})
            continue
        if "aggregate" in row:
            agg = row["aggregate"]
            table.append({"probe": row["probe"], "metric": row["metric"], "n": agg.get("n") or 0,
                          "parent": 100 * agg["parent"], "release": 100 * agg["release"],
                          "delta": 100 * (agg["release"] - agg["parent"]), "lo": None, "hi": None,
                          "verdict": "aggregate", "note": "only aggregate scores: no interval"})
            continue
        delta, lo, hi = paired_bootstrap(row["parent"], row["release"], policy)
        if row.get("new"):
            verdict = "new"
        elif -delta > policy.max_drop and hi < 0:
            verdict, failed = "fail", True
        elif -delta > policy.max_drop:
            verdict = "noisy"
        else:
            verdict = "ok"
        table.append({"probe": row["probe"], "metric": row["metric"], "n": len(row["parent"]),
                      "parent": 100 * float(np.mean(row["parent"])), "release": 100 * float(np.mean(row["release"])),
                      "delta": delta, "lo": lo, "hi": hi, "verdict": verdict})
    if failed:
        status = "rejected" if policy.action == "reject" else "flagged"
    elif any(r["verdict"] in ("noisy", "aggregate", "unscored") for r in table):
        status = "flagged"
    else:
        status = "accepted"
    return {"status": status, "policy": dataclasses.asdict(policy), "table": table}


def format_table(gate: dict) -> str:
    """The gate's table as aligned text (what the CLI prints)."""
    p = gate["policy"]
    lines = [f"gate: {gate['status'].upper()} (max drop {p['max_drop']:g} points, "
             f"{100 * p['confidence']:g}% paired bootstrap interval, action {p['action']})",
             f"  {'probe':<24} {'metric':<14} {'n':>4} {'parent':>7} {'release':>7} {'delta':>7}  {'interval':<17} verdict"]
    for r in gate["table"]:
        lines.append(f"  {r['probe']:<24} {r['metric']:<14} {r['n']:>4} {_num(r['parent'], '7.1f')} "
                     f"{_num(r['release'], '7.1f')} {_num(r['delta'], '+7.1f')}  {interval_text(r):<17} "
                     f"{r['verdict']}" + (f" ({r['note']})" if r.get("note") else ""))
    return "\n".join(lines)


def _num(v: float | None, fmt: str) -> str:
    width = int(fmt.lstrip("+").split(".")[0])
    return format(v, fmt) if v is not None else f"{'-':>{width}}"


def interval_text(row: dict) -> str:
    """``[lo, hi]`` of a gate row, or why it has none."""
    if row.get("lo") is None:
        return "no items" if row.get("verdict") == "aggregate" else "-"
    return f"[{row['lo']:+6.1f}, {row['hi']:+6.1f}]"
