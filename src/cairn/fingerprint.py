"""Fingerprint of a method's effective settings and data, so a resumed run never mixes two configs.

Resume reuses every round whose ``round.json`` exists. That is only right if the rerun asks for the
same thing: same base model, same curriculum and data, same method settings. The runner stores
:func:`method_fingerprint` as ``<method>/fingerprint.json`` when a method starts and, on a rerun,
:func:`check_fingerprint` compares it key by key and refuses with the keys that differ unless the user
passes ``--overwrite`` (then the method's directory is started again).

What is in it, and why:

- ``model``, ``dtype``, ``seed``: the base weights and every seeded choice (data order, init, subsamples).
- ``method``: the method's resolved settings (``lora``, ``replay``, ``olora``, ...), without its name,
  its training overrides (resolved into ``training``) and the diagnostics switches (they only add a
  section to ``results.json``).
- ``training``: the experiment's training settings with the method's overrides applied
  (:meth:`ExperimentConfig.training_for`), without ``log_every``/``save_every`` (logging and
  checkpoint cadence), ``gradient_checkpointing`` (the forward recomputed in the backward: the
  same weights up to float rounding, tested) and ``packing`` (padding-free batches: the same loss to
  float rounding, tested). None changes what is trained, so a run that ran out of memory can be
  resumed with checkpointing switched on.
- ``tasks``: each task's full definition in curriculum order (format, path, fields, subsample sizes...).
- ``data``: for each task whose path is a local file or folder, every file's size and SHA-256.
  Content hashes, not mtimes: a data pack copied to another disk or checked out again keeps its
  fingerprint, and an edited file changes it even if the size is the same. Continual-learning task data
  is small (TRACE's tasks are a few MB), so hashing costs little; files above ``HASH_LIMIT`` bytes are
  fingerprinted by size and mtime instead, said in the entry. Hub datasets are identified by their
  id and revision (in ``tasks``), demo tasks by their settings.
- ``evaluation``: the evaluation settings, without batch sizes (they change speed, not scores), since a
  reused round keeps the scores computed under the old settings.

The cairn version is deliberately left out: upgrading cairn must not block resuming a run.
Hand-written: no library fingerprints an experiment config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cairn.errors import CairnError

FILE_NAME = "fingerprint.json"
HASH_LIMIT = 512 * 1024 * 1024  # bytes; larger files are fingerprinted by size and mtime
_METHOD_SKIP = {"name", "diagnostics", "diagnostics_threshold", "training"}  # training: resolved below
_TRAINING_SKIP = {"log_every", "save_every", "gradient_checkpointing", "packing"}


def _file_entry(path: Path) -> dict:
    size = path.stat().st_size
    if size > HASH_LIMIT:
        return {"size": size, "mtime_ns": path.stat().st_mtime_ns}
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": size, "sha256": h.hexdigest()}


def data_fingerprint(path: str | os.PathLike) -> dict[str, dict] | None:
    """{relative file: {size, sha256}} for a local file or folder (hidden files skipped); None if not local."""
    path = Path(path).expanduser()
    if path.is_file():
        return {path.name: _file_entry(path)}
    if not path.is_dir():
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".")
                                                                          for part in p.relative_to(path).parts))
    return {p.relative_to(path).as_posix(): _file_entry(p) for p in files}


def _task_path(task, data_dir: str | None) -> Path | None:
    if not task.path or task.format == "demo":
        return None
    p = Path(task.path).expanduser()
    if not p.is_absolute() and data_dir:
        p = Path(data_dir).expanduser() / p
    return p


def _method_settings(method) -> dict[str, Any]:
    # report2: registered sections (lora, olora, ewc, ...) under their YAML keys, not under "sections"
    d = {k: v for k, v in dataclasses.asdict(method).items() if k not in _METHOD_SKIP}
    return d | (d.pop("sections", None) or {})


def method_fingerprint(cfg, method, seed: int | None = None) -> dict[str, Any]:
    """The effective settings and data of ``method`` (a MethodConfig of ``cfg``) as a JSON-able dict."""
    training = {k: v for k, v in dataclasses.asdict(cfg.training_for(method)).items() if k not in _TRAINING_SKIP}
    evaluation = dataclasses.asdict(cfg.evaluation)
    evaluation.pop("batch_size", None)
    if isinstance(evaluation.get("old_knowledge"), dict):
        evaluation["old_knowledge"].pop("batch_size", None)
    data = {}
    for task in cfg.tasks:
        path = _task_path(task, cfg.data_dir)
        files = data_fingerprint(path) if path is not None else None
        if files is not None:
            data[task.name] = files
    return {
        "model": cfg.model,
        "dtype": cfg.dtype,
        "seed": cfg.seed if seed is None else seed,
        "method": _method_settings(method),
        "training": training,
        "tasks": [dataclasses.asdict(t) for t in cfg.tasks],
        "data": data,
        "evaluation": evaluation,
    }


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out |= _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out or {prefix: {}}
    if isinstance(obj, list) and obj and all(isinstance(v, dict) and "name" in v for v in obj):
        # tasks: keyed by position and name, so a reordered curriculum reads as what it is
        out = {}
        for i, v in enumerate(obj):
            out |= _flatten({k: x for k, x in v.items()}, f"{prefix}[{i}]")
        out[f"{prefix}.names"] = [v["name"] for v in obj]
        return out
    return {prefix: obj}


def diff(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every key whose value differs (missing -> None)."""
    a, b = _flatten(old), _flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def describe(changes: list[tuple[str, Any, Any]], limit: int = 8) -> str:
    parts = [f"{k}: {_short(a)} -> {_short(b)}" for k, a, b in changes[:limit]]
    if len(changes) > limit:
        parts.append(f"and {len(changes) - limit} more")
    return "; ".join(parts)


def check_fingerprint(method_dir: str | os.PathLike, fingerprint: dict, overwrite: bool = False) -> str:
    """Compare with the fingerprint stored in ``method_dir``; returns "new", "same" or "overwrite".

    - no stored fingerprint (a fresh method, or a run made before fingerprints): store it -> "new"
      (a directory with finished rounds but no fingerprint is trusted, as before);
    - identical: "same" (resume);
    - different and ``overwrite``: the method directory is removed (renamed away, then deleted, so a
      crash leaves no half-deleted method), the new fingerprint stored -> "overwrite";
    - different otherwise: CairnError naming the keys that differ and the two ways out.
    """
    from cairn import atomic

    method_dir = Path(method_dir)
    path = method_dir / FILE_NAME
    if not path.is_file():
        atomic.write_json(path, fingerprint)
        return "new"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        stored = {}
    if isinstance(stored.get("training"), dict):  # fingerprints written before a key joined _TRAINING_SKIP
        stored["training"] = {k: v for k, v in stored["training"].items() if k not in _TRAINING_SKIP}
    changes = diff(stored, json.loads(json.dumps(fingerprint, default=str)))
    if not changes:
        return "same"
    if not overwrite:
        raise CairnError(
            f"{method_dir} was run with different settings ({len(changes)} key(s) differ: {describe(changes)}); "
            f"its finished rounds would be reused under the new settings. Rerun with --overwrite to start "
            f"method {method_dir.name!r} again, or write to another directory with --out")
    import shutil

    trash = method_dir.with_name(f".tmp-{method_dir.name}-overwritten")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(method_dir, trash)
    shutil.rmtree(trash, ignore_errors=True)
    atomic.write_json(path, fingerprint)
    return "overwrite"
