"""A full-fine-tuning round of a run directory as the whole model it stands for, whatever its storage.

A full-fine-tuning (FFT) round of the seed paper's sequential FFT (Lee & Wynter 2024, arXiv
2410.13699) keeps its weights in ``rounds/NN-<task>/model/`` either as a transformers checkpoint
(``storage.fft_format: full``) or as ``model.delta``: the bit-exact XOR delta against a parent
round's weights (:mod:`cairn.io.delta`). The parent is the round before, the base (round 0) for
round 1 and one-round methods, or, after ``storage.keep_models`` removed rounds, the nearest kept
earlier round. The delta file's header names its parent (``meta.parent_round``; files written before
that carry it in ``cairn_parent.json`` only), so the file alone says what it needs.

This module is the one definition of "restore round k": :func:`load_round` walks the parent chain
(delta -> its parent's delta -> ... -> a full checkpoint or the base) and applies the deltas from the
oldest, each checked by its CRCs (a corrupt file or a wrong parent is a :class:`CairnError` naming
the file). The runner's resume, ``cairn eval`` and ``cairn export`` of a round folder, the ledger
importer, combine ingredients and the re-basing done before a round is pruned all call it.
:func:`write_round_folder` writes any round as a plain transformers folder (:func:`full_folders`
does it in a temporary folder for ``cairn merge``/``cairn mix``/``cairn contribute --model``);
:func:`prune_models` removes round models under ``keep_models`` without breaking the deltas of the
kept ones.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from cairn.errors import CairnError
from cairn.io.delta import DELTA_FILE, read_delta, read_delta_meta, write_delta

#: The file in a round's ``model/`` that says what it applies to (same name as cairn.rundir.PARENT_FILE).
PARENT_FILE = "cairn_parent.json"


# -- tied weights ------------------------------------------------------------------------------------

def tied_names(model) -> dict[str, str]:
    """{output embedding weight: input embedding weight} when the config ties them (SmolLM2, Llama-3.2...)."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return {}
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    if out_emb is None or in_emb is None or id(out_emb) not in names or id(in_emb) not in names:
        return {}
    return {f"{names[id(out_emb)]}.weight": f"{names[id(in_emb)]}.weight"}


def untied(state: dict, tied: dict[str, str]) -> dict:
    """The state without tied copies that equal their source (a copy that differs is kept): the delta of
    the copy would double the file."""
    import torch

    def same(a, b):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)

    return {n: t for n, t in state.items() if not (n in tied and tied[n] in state and same(t, state[tied[n]]))}


def load_untied(model, state: dict, where: Path) -> None:
    """Load a state dict stored with tied weights once; a tied copy left out gets its source's values."""
    for name, source in tied_names(model).items():
        if name not in state and source in state:
            state[name] = state[source]
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or result.missing_keys:
        raise CairnError(f"{where}: the stored delta does not match the model (missing {result.missing_keys[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}); was the base model changed?")


def cpu_state(model) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


# -- where a round's parent is -------------------------------------------------------------------------

def is_delta(model_dir: Path) -> bool:
    return (Path(model_dir) / DELTA_FILE).is_file()


def require_kept(path: Path) -> None:
    if not Path(path).is_dir():
        raise CairnError(f"{path} is missing: its round finished, but the model was removed (storage.keep_models "
                         "policy, or deleted by hand); rerun with storage.keep_models: all to keep every round")


def round_number(model_dir: Path) -> int | None:
    """k of ``rounds/NN-<task>/model`` (None when the folder is not named so)."""
    head = Path(model_dir).parent.name.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def delta_info(model_dir: Path) -> dict:
    """What a delta round was made against: ``parent_round``, ``dtype``, ``base_path`` (the file's own
    header wins over ``cairn_parent.json``: a re-base rewrites the file first)."""
    import json

    model_dir = Path(model_dir)
    info: dict = {}
    parent_file = model_dir / PARENT_FILE
    if parent_file.is_file():
        try:
            info.update(json.loads(parent_file.read_text(encoding="utf-8")).get("delta") or {})
        except (ValueError, AttributeError):
            pass  # the header below is the authority; a missing parent round is reported there
    info.update(read_delta_meta(model_dir / DELTA_FILE) or {})
    parent, k = info.get("parent_round"), round_number(model_dir)
    if not isinstance(parent, int) or parent < 0 or (k is not None and parent >= k):
        raise CairnError(f"{model_dir / DELTA_FILE}: no valid parent round recorded (got {parent!r}; in the file's "
                         f"header or {PARENT_FILE}); the round's records are corrupt: rerun the round")
    return info


def round_model_dir(model_dir: Path, k: int) -> Path:
    """``model/`` of round ``k`` of the same method as the round folder holding ``model_dir``."""
    rounds = Path(model_dir).parent.parent
    found = [p for p in sorted(rounds.iterdir()) if p.is_dir() and p.name.split("-", 1)[0] == f"{k:02d}"] \
        if rounds.is_dir() else []
    if not found:
        raise CairnError(f"{model_dir} is a delta against round {k}, but {rounds} has no round {k:02d}-* folder; "
                         "the run directory is incomplete")
    return found[0] / "model"


def _base_spec(model_dir: Path, info: dict) -> str:
    """The base model a round chain starts from: the recorded path when it is there, else the run
    config's model (a run directory moved to another machine), else the recorded id (a hub id)."""
    import yaml

    recorded = info.get("base_path")
    if recorded and Path(recorded).is_dir():
        return recorded
    config = Path(model_dir).parent.parent.parent / "config.yaml"
    if config.is_file():
        try:
            spec = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("model")
        except yaml.YAMLError:
            spec = None
        if spec:
            return str(spec)
    if recorded:
        return recorded
    raise CairnError(f"{model_dir}: cannot tell the base model its delta chain starts from (no base_path in "
                     f"{PARENT_FILE}, no config.yaml in the method directory)")


# -- restore ---------------------------------------------------------------------------------------------

def load_round(model_dir: Path, load_base: Callable[[], object] | None = None, dtype: str | None = None):
    """The model of a round's ``model/`` folder, bit-exact, whatever its storage (see the module doc).

    ``load_base`` gives the base model (the runner's loader); without it the base comes from the
    recorded base path or the run's config. ``dtype``: of a full checkpoint that starts the chain
    (default: the dtype the deltas were made in, else float32).
    """
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    chain, folder = [], model_dir  # delta folders, newest first
    while True:
        require_kept(folder)
        if not is_delta(folder):
            break
        info = delta_info(folder)
        chain.append(folder)
        if info["parent_round"] == 0:
            folder = None
            break
        folder = round_model_dir(folder, info["parent_round"])
    first = delta_info(chain[-1]) if chain else {}
    # the deltas were made in their recorded dtype: the XOR needs the parent's bits in that dtype
    dtype = first.get("dtype") or dtype or "float32"
    if folder is not None:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    elif load_base is not None:
        model = load_base()
    else:
        from cairn.models import load_model

        model = load_model(_base_spec(chain[-1], first), dtype)
    for step in reversed(chain):
        apply_delta(model, step)
    return model


def apply_delta(model, model_dir: Path):
    """Turn ``model`` (holding the parent round's weights) into the delta round ``model_dir``, in place."""
    parent = untied(cpu_state(model), tied_names(model))
    load_untied(model, read_delta(Path(model_dir) / DELTA_FILE, parent), Path(model_dir))
    return model


def write_round_folder(model_dir: Path, folder: Path, load_base: Callable[[], object] | None = None) -> Path:
    """Write round ``model_dir`` into ``folder`` as a transformers checkpoint (weights, config, tokenizer,
    ``cairn_parent.json`` without the delta part): a full round is copied, a delta round restored.
    ``folder`` is the caller's (temporary) directory: wrap it in :func:`cairn.atomic.atomic_dir`."""
    import json

    model_dir, folder = Path(model_dir), Path(folder)
    require_kept(model_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if not is_delta(model_dir):
        for item in model_dir.iterdir():
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, folder / item.name)
        return folder
    model = load_round(model_dir, load_base)
    model.save_pretrained(folder, safe_serialization=True)
    for item in model_dir.iterdir():  # tokenizer files; config.json comes from save_pretrained, as a full round's
        if item.name in (DELTA_FILE, PARENT_FILE, "config.json", "generation_config.json"):
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, folder / item.name)
    if (model_dir / PARENT_FILE).is_file():
        record = json.loads((model_dir / PARENT_FILE).read_text(encoding="utf-8"))
        record.pop("delta", None)
        (folder / PARENT_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return folder


@contextlib.contextmanager
def full_folders(paths) -> Iterator[list[Path]]:
    """``paths`` (model folders given to ``cairn merge``/``mix``), each delta-stored round replaced by a
    full copy in a temporary folder that lives as long as the ``with`` block."""
    paths = [Path(p) for p in paths]
    if not any(p.is_dir() and is_delta(p) for p in paths):
        yield paths
        return
    with tempfile.TemporaryDirectory(prefix="cairn-rounds-") as tmp:
        yield [write_round_folder(p, Path(tmp) / str(i)) if p.is_dir() and is_delta(p) else p
               for i, p in enumerate(paths)]


def record_sources(manifest: Path, key: str, given) -> None:
    """Make an output's manifest (``cairn_merge.json``, ``moe_manifest.json``) name the folders the user
    gave rather than the temporary full copies :func:`full_folders` made of delta rounds."""
    import json

    from cairn import atomic

    manifest = Path(manifest)
    if manifest.is_file():
        data = json.loads(manifest.read_text(encoding="utf-8"))
        data[key] = [str(p) for p in given]
        atomic.write_json(manifest, data)


# -- write -----------------------------------------------------------------------------------------------

def write_round_delta(path: Path, model, parent_state: dict, child_state: dict, parent_round: int, dtype: str,
                      base_path: str) -> dict:
    """Write ``model.delta`` (atomically) turning ``parent_state`` into ``child_state``, naming its parent
    in the header; returns the record's ``delta`` entry (parent, dtype, base, sizes)."""
    tied = tied_names(model)
    meta = {"parent_round": parent_round, "dtype": dtype, "base_path": base_path}
    sizes = write_delta(path, untied(parent_state, tied), untied(child_state, tied), meta=meta)
    return {"file": DELTA_FILE, **meta, **sizes}


def rebase(model_dir: Path, parent_round: int, load_base: Callable[[], object] | None = None) -> dict:
    """Rewrite a delta round as a delta against ``parent_round`` (0: the base), crash-safe.

    The new ``model.delta`` replaces the old one in one rename (fsynced), and names its new parent
    in its header, so at every moment the folder restores: before the rename through the old parent
    (which the caller deletes only after this returns), after it through the new one.
    ``cairn_parent.json`` is updated afterwards for readers of the record.
    """
    model_dir = Path(model_dir)
    info = delta_info(model_dir)
    child = load_round(model_dir, load_base)
    if parent_round == 0:
        parent = load_base() if load_base is not None else None
        if parent is None:
            from cairn.models import load_model

            parent = load_model(_base_spec(model_dir, info), info.get("dtype") or "float32")
    else:
        parent = load_round(round_model_dir(model_dir, parent_round), load_base)
    entry = write_round_delta(model_dir / DELTA_FILE, child, cpu_state(parent), cpu_state(child), parent_round,
                              info.get("dtype") or "float32", info.get("base_path") or "")
    _write_record(model_dir, entry)
    return entry


def _write_record(model_dir: Path, entry: dict) -> None:
    import json

    from cairn import atomic

    record_file = model_dir / PARENT_FILE
    record = json.loads(record_file.read_text(encoding="utf-8")) if record_file.is_file() else {}
    record["delta"] = {**(record.get("delta") or {}), **entry}
    atomic.write_json(record_file, record)


def sync_record(model_dir: Path) -> bool:
    """Make ``cairn_parent.json`` name the parent the delta file names (a run killed between a re-base's
    two writes left the record behind); True when it had to."""
    import json

    model_dir = Path(model_dir)
    meta = read_delta_meta(model_dir / DELTA_FILE) or {}
    record_file = model_dir / PARENT_FILE
    if "parent_round" not in meta or not record_file.is_file():
        return False
    delta = json.loads(record_file.read_text(encoding="utf-8")).get("delta") or {}
    if delta.get("parent_round") == meta["parent_round"]:
        return False
    size = (model_dir / DELTA_FILE).stat().st_size
    raw = delta.get("raw_bytes")
    _write_record(model_dir, {**meta, "bytes": size, **({"ratio": raw / max(size, 1)} if raw else {})})
    return True


# -- keep_models --------------------------------------------------------------------------------------------

def prune_models(round_dirs: dict[int, Path], keep: set[int], load_base: Callable[[], object] | None = None,
                 log: Callable[[str], None] | None = None) -> list[Path]:
    """Remove ``model/`` of every round in ``round_dirs`` ({k: round folder}) not in ``keep``.

    First every kept delta round whose parent is about to go is re-based (:func:`rebase`) onto the
    nearest kept earlier round, or the base: still a delta (the policy keeps the run small), made
    against the closest model left, so it stays small. Only then are the parents removed, each by one
    rename to a ``.tmp-`` name and a delete, so a kill at any moment leaves every kept round
    restorable and no half-deleted ``model/``. Returns the removed folders.
    """
    log = log or (lambda line: None)
    doomed = {k for k, d in round_dirs.items() if k not in keep
              and ((d / "model").is_dir() or any(d.glob(".tmp-model-*")))}
    for k in sorted(keep & round_dirs.keys()):
        model = round_dirs[k] / "model"
        if not is_delta(model):
            continue
        sync_record(model)
        parent = delta_info(model)["parent_round"]
        if parent in doomed:
            target = max((i for i in keep if i < k and (round_dirs[i] / "model").is_dir()), default=0)
            entry = rebase(model, target, load_base)
            log(f"re-based {model} onto {'the base' if target == 0 else f'round {target}'} before removing "
                f"round {parent}'s model: {entry['bytes'] / 1e6:.1f} MB")
    removed = []
    for k in sorted(doomed):
        model = round_dirs[k] / "model"
        if model.is_dir():
            gone = model.with_name(f".tmp-model-pruned-{os.getpid()}")
            os.replace(model, gone)
            removed.append(model)
        for leftover in round_dirs[k].glob(".tmp-model-*"):  # this rename, or one a killed run left
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
    return removed
