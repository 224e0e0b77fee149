"""Read saved runs back for reporting: single-method run directories and multi-method experiments.

A run directory holds ``results.json`` (and usually ``config.yaml``); an experiment directory holds
``experiment.json`` listing its methods, one run directory per method. The schema is the one the
experiment runner writes; this module only reads it and checks the keys a report needs.

Seeds: a method run with several seeds has ``<method>/seed-<s>/`` directories, each a run directory
with the single-seed layout. Such a method becomes one :class:`Run` whose ``results`` hold the
element-wise *mean* over seeds (so every table and plot works unchanged) and whose ``seed_runs`` hold
the per-seed runs (for ± sd and per-item tests). A method's *spec* (strategy, trainable, replay,
O-LoRA / N-LoRA, combiner kind and source) comes from ``results.json`` when the runner wrote it, else
from the experiment's or the method's ``config.yaml``; the findings page uses it to find the methods
a claim is about. A one-round method is recognised by ``strategy: one-round`` or, in older runs, by
its rows ``only-<task>`` in task order.

Paths and records come from :mod:`cairn.rundir` (the one definition of the run directory): results
through :func:`cairn.rundir.read_results` (older schemas upgraded), an experiment's methods and statuses
through :meth:`cairn.rundir.RunDir.read_status`, a method's seeds through
:meth:`cairn.rundir.RunDir.method_dirs`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cairn import rundir
from cairn.errors import CairnError
from cairn.rundir import ExperimentStatus, MethodDir, RunDir


@dataclass
class Run:
    """One method's saved results (the mean over seeds when ``seed_runs`` is not empty)."""

    label: str
    path: Path
    results: dict
    config_text: str | None = None
    seed_runs: list["Run"] = field(default_factory=list)
    spec: dict = field(default_factory=dict)

    @property
    def task_names(self) -> list[str]:
        return task_names(self.results)

    @property
    def seeded(self) -> bool:
        """Several seeds: tables show mean ± sd over ``seed_runs``."""
        return len(self.seed_runs) > 1

    @property
    def replicas(self) -> list["Run"]:
        """The per-seed runs, or this run alone."""
        return self.seed_runs or [self]

    @property
    def strategy(self) -> str:
        return strategy_of(self.results, self.spec)

    @property
    def one_round(self) -> bool:
        return self.strategy == "one-round"


def strategy_of(results: dict, spec: dict | None = None) -> str:
    """'one-round', 'joint', 'sequential' or 'combined' (a merge or mixture) for a results dict."""
    if results.get("strategy"):
        return str(results["strategy"])
    spec = spec or {}
    if spec.get("kind"):
        return "combined"
    if spec.get("strategy"):
        return str(spec["strategy"])
    names, rows = task_names(results), list(results.get("rows") or [])
    if len(rows) > 1 and rows[1:] == [f"only-{t}" for t in names[: len(rows) - 1]]:
        return "one-round"
    if rows[1:] == ["joint"]:
        return "joint"
    return "sequential"


@dataclass
class Loaded:
    """Everything a report is built from."""

    runs: list[Run]
    # (method, status) for methods of an experiment that have no usable results
    skipped: list[tuple[str, str]] = field(default_factory=list)


def task_names(results: dict) -> list[str]:
    """Task names of a results dict; ``tasks`` entries may be ``{"name": ...}`` dicts or strings."""
    return [t["name"] if isinstance(t, dict) else str(t) for t in results["tasks"]]


def validate_results(results: dict, where: str) -> dict:
    """Check the keys and shapes a report relies on; raise a CairnError naming ``where``."""
    for key in ("tasks", "rows", "matrix"):
        if key not in results:
            raise CairnError(f"{where}: missing key {key!r}; results.json needs 'tasks', 'rows' and 'matrix'.")
    for i, t in enumerate(results["tasks"]):
        if isinstance(t, dict) and "name" not in t:
            raise CairnError(f"{where}: tasks[{i}] has no 'name'.")
    n, rows, matrix = len(results["tasks"]), results["rows"], results["matrix"]
    if len(matrix) != len(rows):
        raise CairnError(f"{where}: 'matrix' has {len(matrix)} rows but 'rows' names {len(rows)}.")
    for k, row in enumerate(matrix):
        if len(row) != n:
            raise CairnError(f"{where}: matrix row {k} ({rows[k]!r}) has {len(row)} scores for {n} tasks.")
    old = results.get("old_knowledge")
    if old:
        for key in ("tasks", "matrix"):
            if key not in old:
                raise CairnError(f"{where}: old_knowledge is missing {key!r}.")
        if len(old["matrix"]) != len(rows):
            raise CairnError(
                f"{where}: old_knowledge.matrix has {len(old['matrix'])} rows but 'rows' names {len(rows)} "
                "(use one row per entry of 'rows', null where not evaluated)."
            )
        for k, row in enumerate(old["matrix"]):
            if row is not None and len(row) != len(old["tasks"]):
                raise CairnError(f"{where}: old_knowledge.matrix row {k} has {len(row)} scores for {len(old['tasks'])} tasks.")
    return results


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CairnError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}.") from None
    except UnicodeDecodeError as exc:  # robust guard
        raise CairnError(f"{path}: not UTF-8 text (byte {exc.start}); it is not a file cairn wrote.") from None
    if not isinstance(data, dict):  # robust guard
        raise CairnError(f"{path}: expected a JSON object, got {type(data).__name__}.")
    return data


def _config_specs(text: str | None) -> dict[str, dict]:
    """``{name: spec}`` for every method and combiner of a config.yaml text (empty if unreadable)."""
    if not text:
        return {}
    try:
        import yaml

        cfg = yaml.safe_load(text) or {}
    except Exception:  # a report must not fail on a config it only reads for labels
        return {}
    methods = {m.get("name"): m for m in cfg.get("methods") or [] if isinstance(m, dict)}
    specs: dict[str, dict] = {}
    for name, m in methods.items():
        specs[name] = {"strategy": m.get("strategy", "sequential"), "trainable": m.get("trainable", "lora"),
                       "replay": m.get("replay", 0.0), "olora": m.get("olora"), "nlora": m.get("nlora")}
    for c in cfg.get("combine") or []:
        if isinstance(c, dict):
            src = methods.get(c.get("source")) or {}
            specs[c.get("name")] = {"kind": c.get("kind", "merge"), "method": c.get("method"),
                                    "source": c.get("source"), "trainable": src.get("trainable", "lora")}
    return specs


def _spec(results: dict, name: str, specs: dict[str, dict]) -> dict:
    spec = dict(specs.get(name) or {})
    for key in ("strategy", "trainable", "replay", "kind", "source"):
        if results.get(key) is not None:
            spec[key] = results[key]
    return spec


def load_run(path: Path, label: str | None = None, specs: dict[str, dict] | None = None) -> Run:
    mdir = MethodDir(Path(path))
    results = validate_results(rundir.read_results(mdir.results), str(mdir.results))
    text = mdir.config.read_text(encoding="utf-8") if mdir.config.is_file() else None
    name = label or str(results.get("name") or mdir.path.name)
    all_specs = dict(specs or {})
    for k, v in _config_specs(text).items():
        all_specs.setdefault(k, v)
    return Run(label=name, path=mdir.path, results=results, config_text=text,
               spec=_spec(results, str(results.get("name") or name), all_specs))


def _seed_of(mdir: MethodDir) -> int | None:
    """The seed a ``seed-<s>/`` directory name states (None for a single-seed ``<method>/``)."""
    tail = mdir.path.name[len("seed-"):] if mdir.path.name.startswith("seed-") else ""
    return int(tail) if tail.lstrip("-").isdigit() else None


def _seeded_dirs(root: Path, name: str) -> list[MethodDir]:
    """The ``seed-<s>/`` directories of method ``name`` under ``root`` (empty for a single-seed method)."""
    dirs = RunDir(Path(root)).method_dirs(name)
    return [m for m in dirs if _seed_of(m) is not None]


def _mean_rows(rows: list[list | None]) -> list | None:
    rows = [r for r in rows if r is not None]
    if not rows:
        return None
    out = []
    for vals in zip(*rows):
        d = [v for v in vals if v is not None]
        out.append(sum(d) / len(d) if d else None)
    return out


def aggregate_results(per_seed: list[dict], where: str) -> dict:
    """The element-wise mean over seeds of the matrices (tasks and rows must agree)."""
    first = per_seed[0]
    for r in per_seed[1:]:
        if task_names(r) != task_names(first) or list(r["rows"]) != list(first["rows"]):
            raise CairnError(f"{where}: the seeds have different tasks or rounds; a seed may be unfinished "
                             "or from another config. Rerun the missing rounds (cairn resumes per seed).")
    out = {k: v for k, v in first.items() if k not in ("matrix", "old_knowledge", "figures", "diagnostics")}
    out["matrix"] = [_mean_rows([r["matrix"][k] for r in per_seed]) for k in range(len(first["matrix"]))]
    olds = [r.get("old_knowledge") for r in per_seed]
    if all(olds) and all(o["tasks"] == olds[0]["tasks"] for o in olds):
        out["old_knowledge"] = {
            "tasks": olds[0]["tasks"], "metric": olds[0].get("metric", {}),
            "matrix": [_mean_rows([o["matrix"][k] for o in olds]) for k in range(len(olds[0]["matrix"]))],
        }
    out["seeds"] = [r.get("seed") for r in per_seed]
    return out


def load_seeded(dirs: list[MethodDir], label: str, specs: dict[str, dict] | None = None,
                where: Path | None = None) -> tuple[Run | None, list[str]]:
    """A method's ``seed-<s>/`` directories as one run (mean results) and the seeds left out."""
    runs, missing = [], []
    for mdir in dirs:
        if mdir.results.is_file():
            r = load_run(mdir.path, specs=specs)
            if r.results.get("seed") is None:  # results.json before schema 2 does not state its seed
                r.results["seed"] = _seed_of(mdir)
            r.label = f"{label} (seed {r.results['seed']})"
            runs.append(r)
        else:
            missing.append(f"seed {_seed_of(mdir)}: no results.json")
    if not runs:
        return None, missing
    path = where or dirs[0].path.parent
    results = aggregate_results([r.results for r in runs], str(path))
    run = Run(label=label, path=Path(path), results=results, config_text=runs[0].config_text,
              seed_runs=runs, spec=runs[0].spec)
    return run, missing


def _read_status(d: Path) -> ExperimentStatus:
    """experiment.json through cairn.rundir; hand-written files may omit ``name`` and ``status``."""
    where = d / "experiment.json"
    try:
        status = RunDir(d).read_status()
    except (KeyError, TypeError, json.JSONDecodeError):
        data = _read_json(where)
        status = ExperimentStatus(name=str(data.get("name") or d.name), methods=data.get("methods"),
                                  status=data.get("status") or {})
    if not isinstance(status.methods, list):
        raise CairnError(f"{where}: needs a 'methods' list naming its run sub-directories.")
    return status


def load_runs(dirs: list[Path]) -> Loaded:
    """Load every run under ``dirs`` (run directories and experiment directories, in order)."""
    if not dirs:
        raise CairnError("no run directory given; pass one or more directories written by `cairn run`.")
    loaded = Loaded(runs=[])
    for d in map(Path, dirs):
        if not d.is_dir():
            raise CairnError(f"{d}: no such directory; pass a run directory written by `cairn run`.")
        run_dir = RunDir(d)
        own_seeds = _seeded_dirs(d.parent, d.name)
        if MethodDir(d).results.is_file():
            loaded.runs.append(load_run(d))
        elif own_seeds and not run_dir.experiment.is_file():  # one method's seed directories
            run, missing = load_seeded(own_seeds, d.name, where=d)
            if run is None:
                raise CairnError(f"{d}: none of its seed directories has results.json ({'; '.join(missing)}).")
            loaded.runs.append(run)
            loaded.skipped += [(d.name, m) for m in missing]
        elif run_dir.experiment.is_file():
            exp = _read_status(d)
            cfg = run_dir.config
            specs = _config_specs(cfg.read_text(encoding="utf-8") if cfg.is_file() else None)
            status = exp.status or {}
            for m in exp.methods:
                sub = run_dir.method(m).path
                seeds = _seeded_dirs(d, m)
                st = status.get(m, "ok")
                if isinstance(st, dict):  # per-seed statuses: report the seeds that finished
                    bad = [f"seed {s}: {v}" for s, v in st.items() if v != "ok"]
                    st = "ok"
                    loaded.skipped += [(m, b) for b in bad]
                st = str(st)
                if MethodDir(sub).results.is_file() and st == "ok":
                    loaded.runs.append(load_run(sub, label=m, specs=specs))
                elif seeds and st == "ok":
                    run, missing = load_seeded(seeds, m, specs, where=sub)
                    loaded.skipped += [(m, x) for x in missing]
                    if run is not None:
                        loaded.runs.append(run)
                else:
                    loaded.skipped.append((m, st if st != "ok" else "no results.json"))
        else:
            raise CairnError(
                f"{d}: no results.json here. A run directory holds results.json (with 'tasks', 'rows' "
                "and 'matrix', written by `cairn run`); an experiment directory holds experiment.json "
                "and one run directory per method."
            )
    if not loaded.runs:
        detail = "; ".join(f"{m}: {s}" for m, s in loaded.skipped)
        raise CairnError(f"no method with results in {', '.join(map(str, dirs))} ({detail}).")
    labels = [r.label for r in loaded.runs]
    for r in loaded.runs:  # two runs with the same name (e.g. two seeds) need distinct labels
        if labels.count(r.label) > 1:
            r.label = f"{r.label} ({r.path.name})" if r.path.name != r.label else f"{r.label} ({r.path.parent.name})"
    return loaded
