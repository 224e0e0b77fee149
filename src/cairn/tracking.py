"""Experiment tracking: TensorBoard, MLflow, Weights & Biases and Trackio through Accelerate's trackers.

Accelerate already wraps every tracker an HF user knows (``accelerate.tracking``: one ``start`` /
``log(values, step)`` / ``finish`` API, main-process only); cairn uses those classes unchanged and adds
only what a curriculum needs on top:

- one tracker run per method (and seed), named ``<method>`` or ``<method>-seed-<s>``, grouped by
  experiment (TensorBoard: ``<log_dir>/<experiment>/<run>``; MLflow: experiment ``<experiment>`` in the
  local SQLite store ``<log_dir>/mlflow.db`` unless ``MLFLOW_TRACKING_URI`` says otherwise; W&B / Trackio:
  project ``<experiment>``, run name ``<run>``);
- one global step axis across rounds (round k's steps continue after round k-1's), so a loss curve
  shows the whole curriculum;
- each round's task scores (``round/<task>`` at the round's last step and ``scores/<task>`` by round
  index) and the results matrix as text;
- ``train_log.jsonl`` in each round directory: the same metrics, one JSON object per logged step, which
  the HTML report reads for its loss curves whatever trackers are configured (an interrupted round
  that resumes from a checkpoint appends the replayed steps again: readers keep the last entry of a
  step, see :func:`read_train_log`).

The Accelerator itself is not involved: the training loop builds its own, and a tracker run spans
several rounds (several loops), so the tracker objects are held here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from cairn.errors import CairnError

# tracker name -> (importable module that it needs, pip requirement)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
}
EXTRA = "pip install 'cairn-lm[tracking]'"

LogFn = Callable[[dict, int], None]


def check_trackers(report_to: Iterable[str], where: str = "tracking.report_to") -> list[str]:
    """The requested trackers, validated: an unknown name or a missing package is a CairnError."""
    names = list(report_to or [])
    for name in names:
        if name not in TRACKERS:
            raise CairnError(f"{where}: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
        module, req = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise CairnError(f"{where}: tracker {name!r} needs the {req!r} package, which is not installed; "
                             f"install it with `{EXTRA}` (or `pip install {req}`)")
    return names


def mlflow_uri(log_dir: str | os.PathLike) -> str:
    """The MLflow tracking URI cairn uses under ``log_dir`` when ``MLFLOW_TRACKING_URI`` is not set."""
    return f"sqlite:///{(Path(log_dir) / 'mlflow.db').resolve()}"


def run_name(method: str, seed: int | None = None) -> str:
    return method if seed is None else f"{method}-seed-{seed}"


def _scalars(metrics: dict) -> dict[str, float]:
    """Finite numbers only (trackers reject tensors/None; a NaN would poison MLflow's charts)."""
    out = {}
    for k, v in metrics.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        out[k] = float(v)
    return out


class Tracking:
    """One tracker run for one method (and seed) of an experiment.

    ``round_log_fn(k, label, rdir, step_offset)`` gives the ``log_fn(metrics, step)`` the training loop
    calls; ``log_round`` records a round's scores; ``log_results`` the final matrix; ``finish`` closes.
    With ``report_to=[]`` nothing is sent anywhere but ``train_log.jsonl`` is still written.
    """

    def __init__(self, report_to: Iterable[str], log_dir: str | os.PathLike, experiment: str, run: str,
                 config: dict | None = None):
        self.names = check_trackers(report_to)
        self.log_dir = Path(log_dir)
        self.experiment = experiment
        self.run = run
        # One writer per run: only the main process creates trackers and writes train_log.jsonl (W&B and
        # Trackio are not main-process-only in Accelerate, which leaves that choice to Accelerator).
        self.main = _is_main()
        self.trackers = [self._make(name) for name in self.names] if self.main else []
        for tracker in self.trackers:
            tracker.start()
            if config:
                tracker.store_init_configuration(_flat_params(config))

    def _make(self, name: str):
        from accelerate import tracking as acc

        if name == "tensorboard":
            return acc.TensorBoardTracker(self.run, self.log_dir / self.experiment)
        if name == "mlflow":
            artifacts = None
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                # A local SQLite store (MLflow 3 keeps the ./mlruns file store in maintenance mode and
                # refuses it by default); artifacts beside it instead of MLflow's default ./mlruns.
                import mlflow

                self.log_dir.mkdir(parents=True, exist_ok=True)
                mlflow.set_tracking_uri(mlflow_uri(self.log_dir))
                artifacts = (self.log_dir / "mlartifacts").resolve().as_uri()
            return acc.MLflowTracker(experiment_name=self.experiment, logging_dir=artifacts, run_name=self.run,
                                     tags={"cairn.experiment": self.experiment})
        if name == "wandb":
            return acc.WandBTracker(self.experiment, name=self.run, group=self.experiment, dir=str(self.log_dir))
        return acc.TrackioTracker(self.experiment, name=self.run)

    # -- logging -------------------------------------------------------------------------------
    def log(self, metrics: dict, step: int) -> None:
        values = _scalars(metrics)
        if values:
            for tracker in self.trackers:
                tracker.log(values, step=step)

    __call__ = log

    def round_log_fn(self, k: int, label: str, rdir: str | os.PathLike | None, step_offset: int = 0) -> LogFn:
        """The training loop's ``log_fn`` for round ``k``: metrics under ``train/``, steps after ``step_offset``;
        each call is also appended to ``rdir/train_log.jsonl`` (with the round-local step)."""
        log_file = Path(rdir) / "train_log.jsonl" if rdir is not None else None

        def log_fn(metrics: dict, step: int) -> None:
            values = _scalars(metrics)
            if log_file is not None and self.main:
                log_file.parent.mkdir(parents=True, exist_ok=True)
                with log_file.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": int(step), "global_step": int(step) + step_offset, **values}) + "\n")
            self.log({f"train/{key}": v for key, v in values.items()} | {"train/round": float(k)},
                     int(step) + step_offset)

        return log_fn

    def log_round(self, k: int, label: str, scores: dict[str, float], step: int,
                  old_knowledge: dict[str, float] | None = None) -> None:
        """A round's scores: ``round/<task>`` at the round's last global step, ``scores/<task>`` by round."""
        values = {f"round/{t}": s for t, s in scores.items()}
        values |= {f"old_knowledge/{t}": s for t, s in (old_knowledge or {}).items()}
        self.log(values, step)
        self.log({f"scores/{t}": s for t, s in scores.items()}, k)
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                tracker.log({"rounds": f"round {k}: {label}"}, step=k)

    def log_results(self, results: dict) -> None:
        """The results matrix (as Markdown text where the tracker takes text) and the summary figures."""
        rows, tasks = results.get("rows", []), [t["name"] for t in results.get("tasks", [])]
        table = "| after | " + " | ".join(tasks) + " |\n|---|" + "---|" * len(tasks) + "\n"
        table += "".join(f"| {r} | " + " | ".join(f"{v:.4f}" for v in row) + " |\n"
                         for r, row in zip(rows, results.get("matrix", [])))
        figures = {f"figures/{k}": v for k, v in (results.get("figures") or {}).items()}
        self.log(figures, len(rows) - 1)
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                tracker.log({"results_matrix": table}, step=len(rows) - 1)
            elif tracker.name == "mlflow":
                import mlflow

                mlflow.log_text(table, "results_matrix.md")
                mlflow.log_dict(results, "results.json")
            elif tracker.name in ("wandb", "trackio"):
                tracker.log({"results_matrix": table}, step=len(rows) - 1)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.finish()


def _is_main() -> bool:
    try:
        from cairn.dist import is_main  # the process-world helpers, where present
    except ImportError:
        from accelerate import PartialState

        return PartialState().is_main_process
    return is_main()


def _flat_params(config: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config flattened to ``a.b.c`` keys of str/int/float/bool (what trackers accept as params)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= _flat_params(value, f"{name}.")
        elif isinstance(value, (str, int, float, bool)):
            out[name] = value
        elif value is None:
            out[name] = "null"
        else:
            out[name] = json.dumps(value, default=str)[:250]
    return out


def open_tracking(cfg, out_dir: str | os.PathLike, method: str, seed: int | None = None) -> Tracking:
    """The tracker run of ``method`` (and ``seed``) for experiment config ``cfg`` run into ``out_dir``.

    ``cfg.tracking.log_dir`` defaults to ``<out_dir>/tracking``; the method's resolved settings are
    stored as the run's parameters.
    """
    import dataclasses

    tcfg = getattr(cfg, "tracking", None)
    report_to = list(getattr(tcfg, "report_to", []) or [])
    log_dir = Path(tcfg.log_dir) if tcfg is not None and tcfg.log_dir else Path(out_dir) / "tracking"
    params = None
    if report_to:
        m = next((m for m in cfg.methods if m.name == method), None)
        params = {"experiment": cfg.name, "model": cfg.model, "seed": cfg.seed if seed is None else seed,
                  "tasks": [t.name for t in cfg.tasks]}
        if m is not None:
            params |= {"method": dataclasses.asdict(m), "training": dataclasses.asdict(cfg.training_for(m))}
    return Tracking(report_to, log_dir, cfg.name, run_name(method, seed), params)


def read_train_log(path: str | os.PathLike) -> list[dict]:
    """A round's ``train_log.jsonl``, one entry per step (the last one where a resumed round replayed a
    step), sorted by step; an absent file gives []. A torn last line (a crash mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        by_step[int(entry["step"])] = entry
    return [by_step[s] for s in sorted(by_step)]
