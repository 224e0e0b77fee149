"""Streamed merging of full models stored as safetensors: memory of a few tensors, not K models.

The merge functions are those of :mod:`cairn.combine.merge_fns` (linear, task arithmetic, TIES,
DARE, DARE+TIES; papers cited there). This module only moves bytes:

- **Reading.** Safetensors headers are parsed directly and each tensor is read with ``preadv`` into
  a buffer, in flat chunks of ``chunk_elems`` entries. Nothing is memory-mapped, so the process's
  resident memory holds only the chunks in flight (page cache is the kernel's, not ours); merging K
  models costs about the memory of the largest tensor, whatever K is.
- **Trimming.** TIES trims per tensor, so each model's threshold needs the whole tensor's
  magnitudes: they are gathered chunk by chunk into one float32 buffer and the k-th largest is found
  in place with ``np.partition`` (O(n), no copy). A second pass over the chunks applies the
  threshold, DARE's masks, the sign election and the disjoint mean, and writes the result.
- **Writing.** The output's shapes and dtypes are the base's, known before any data is read, so
  each shard's header is written first and tensors are then streamed into it; shards are named
  like ``save_pretrained`` does (``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` with
  ``model.safetensors.index.json``). The base's config, generation config and tokenizer files are
  copied, and ``cairn_merge.json`` records the method, its parameters, the inputs and the statistics.
  Everything is built in a temporary directory renamed into place at the end (cairn.atomic).
- **Checks before any work:** every model has the base's architecture keys in config.json, the same
  tensor names and shapes. During the merge, a model whose delta to the base is large relative to
  the base (‖θ_t − θ0‖ / ‖θ0‖ above ``max_relative_delta`` for a tensor) stops the merge: the base
  is very likely not the models' base, and task vectors against a wrong base are meaningless.

DARE draws its mask per tensor and model from a generator seeded by (seed, tensor name, model
index), so a merge is reproducible and does not depend on the chunk size or the tensor order.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from cairn import atomic
from cairn.io.architecture import architecture_differences
from cairn.io.same_base import check_same_base, relative_distance
from cairn.io.safetensors import (ST_CODES, ST_DTYPES, ShardedWriter, TensorReader,  # noqa: F401
                                  TensorRef, list_tensors, read_header)
from cairn.io.support import copy_support_files
from cairn.combine.merge_fns import MergeSpec, MergeStats, combine_deltas, keep_count, random_mask, threshold_mask, trim_threshold
from cairn.errors import CairnError

DEFAULT_CHUNK_ELEMS = 1 << 20  # 1M entries: 4 MiB per model per chunk in float32; keeps the working set small
DEFAULT_SHARD_BYTES = 5 * 1024**3  # what save_pretrained uses

# ---------------------------------------------------------------- inputs and checks


@dataclass
class ModelInput:
    spec: str
    path: Path
    tensors: dict[str, TensorRef]
    config: dict

    @property
    def label(self) -> str:
        """The spec as the user wrote it, plus the directory when that differs."""
        return self.spec if Path(self.spec) == self.path else f"{self.spec} ({self.path})"


def open_model(spec: str | os.PathLike, role: str) -> ModelInput:
    """Resolve a cairn model spec to a local directory and read its config and tensor list."""
    from cairn.models import resolve_model_path

    resolved = resolve_model_path(str(spec))
    path = Path(resolved)
    if not path.is_dir():
        raise CairnError(
            f"{role} {spec!r} is not a local model directory; merge reads safetensors files from disk "
            f"(download it first, e.g. `hf download {spec} --local-dir DIR`)"
        )
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise CairnError(f"cannot read {config_file} ({role} {spec}): {exc}") from None
    return ModelInput(str(spec), path, list_tensors(path), config)


def check_compatible(reference: ModelInput, models: Sequence[ModelInput], reference_role: str = "base") -> None:
    """Same architecture keys, tensor names and shapes as ``reference``; a CairnError naming the difference."""
    for m in models:
        diffs = architecture_differences(reference.config, m.config)
        if diffs:
            key, a, b = diffs[0]
            raise CairnError(
                f"model {m.spec} has {key}={b!r} in {m.path / 'config.json'} but the {reference_role} "
                f"{reference.spec} has {key}={a!r}: models of different architectures cannot be merged"
            )
        missing = [n for n in reference.tensors if n not in m.tensors]
        if missing:
            raise CairnError(
                f"tensor {missing[0]} of the {reference_role} ({reference.tensors[missing[0]].file}) is missing "
                f"from model {m.label}" + (f", and {len(missing) - 1} more" if len(missing) > 1 else "")
            )
        extra = [n for n in m.tensors if n not in reference.tensors]
        if extra:
            raise CairnError(
                f"tensor {extra[0]} of model {m.spec} ({m.tensors[extra[0]].file}) is not in the {reference_role} "
                f"{reference.spec}" + (f", and {len(extra) - 1} more" if len(extra) > 1 else "")
            )
        for name, ref in reference.tensors.items():
            other = m.tensors[name]
            if other.shape != ref.shape:
                raise CairnError(
                    f"tensor {name} has shape {list(other.shape)} in model {m.spec} ({other.file}) but "
                    f"{list(ref.shape)} in the {reference_role} {reference.spec} ({ref.file})"
                )


def check_output(out: Path, overwrite: bool, inputs: Iterable[Path]) -> None:
    out = Path(out).resolve()
    for p in inputs:
        p = Path(p).resolve()
        if out == p or p.is_relative_to(out) or out.is_relative_to(p):
            raise CairnError(f"output directory {out} overlaps the input {p}; choose another --out")
    if out.exists() and not overwrite:
        raise CairnError(f"output directory {out} already exists; pass --overwrite to replace it")


def tensor_generators(seed: int, name: str, k: int) -> list[torch.Generator]:
    """DARE's per-model generators for one tensor, seeded from (seed, tensor name, model index)."""
    gens = []
    for t in range(k):
        digest = hashlib.sha256(f"{seed}:{name}:{t}".encode()).digest()
        gens.append(torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1)))
    return gens


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace("IB", "B")
    for unit, mult in (("KB", 1024), ("MB", 1024**2), ("GB", 1024**3), ("TB", 1024**4), ("B", 1)):
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise CairnError(f"cannot read size {text!r}; write it like 5GB, 500MB or a number of bytes") from None


# ---------------------------------------------------------------- the streamed merge of one tensor


class _StreamMerge:
    """Merges tensor after tensor from ``reader`` into ``writer`` following ``spec``."""

    def __init__(self, spec: MergeSpec, base: ModelInput | None, models: Sequence[ModelInput], reader: TensorReader,
                 writer: ShardedWriter, out_dtypes: dict[str, torch.dtype], chunk_elems: int,
                 max_relative_delta: float | None) -> None:
        self.spec, self.base, self.models = spec, base, models
        self.reader, self.writer, self.out_dtypes = reader, writer, out_dtypes
        self.chunk = max(1, int(chunk_elems))
        self.max_rel = max_relative_delta
        self.weights = spec.weights_for(len(models))
        self.stats = MergeStats()
        self.delta_sq = [0.0] * len(models)
        self.base_sq = 0.0
        self.copied = 0

    def _ranges(self, n: int) -> Iterable[tuple[int, int]]:
        for start in range(0, n, self.chunk):
            yield start, min(self.chunk, n - start)

    def merge(self, name: str) -> None:
        refs = [m.tensors[name] for m in self.models]
        base_ref = self.base.tensors[name] if self.base is not None else None
        template = base_ref or refs[0]
        out_dtype = self.out_dtypes[name]
        if not template.dtype.is_floating_point:  # integer buffers (position ids...) are copied
            for start, count in self._ranges(template.numel):
                self.writer.write(name, self.reader.read(template, start, count))
            self.copied += 1
            return
        if self.spec.method == "linear":
            self._linear(name, refs, out_dtype)
        else:
            self._generalized(name, base_ref, refs, out_dtype)

    def _linear(self, name: str, refs: list[TensorRef], out_dtype: torch.dtype) -> None:
        w = torch.tensor(self.weights, dtype=torch.float32).reshape(-1, 1)
        for start, count in self._ranges(refs[0].numel):
            stacked = torch.stack([self.reader.read(r, start, count).to(torch.float32) for r in refs])
            self.writer.write(name, ((stacked * w).sum(dim=0) / w.sum()).to(out_dtype))
        self.stats.positions += refs[0].numel
        self.stats.entries += refs[0].numel * len(refs)

    def _thresholds(self, base_ref: TensorRef, refs: list[TensorRef]) -> list[tuple[float, int, bool]]:
        """Pass 1 of TIES trimming: per model, the k-th largest |τ_t| and the ties it may keep."""
        n = base_ref.numel
        k = keep_count(n, self.spec.density)
        magnitudes = np.empty(n, dtype=np.float32)
        out = []
        for t, ref in enumerate(refs):
            sq = 0.0
            for start, count in self._ranges(n):
                base_c = self.reader.read(base_ref, start, count).to(torch.float32)
                delta = self.reader.read(ref, start, count).to(torch.float32) - base_c
                sq += float(torch.dot(delta, delta))
                if t == 0:
                    self.base_sq_tensor += float(torch.dot(base_c, base_c))
                torch.from_numpy(magnitudes[start:start + count]).copy_(delta.abs_())
            self.delta_sq_tensor[t] = sq
            threshold, n_above = trim_threshold(magnitudes, k)
            # When every entry equal to the threshold is kept (the usual case), `>=` alone is exact.
            all_ties_kept = k >= n or int(np.count_nonzero(magnitudes == threshold)) <= k - n_above
            out.append((threshold, k - n_above, all_ties_kept))
        return out

    def _generalized(self, name: str, base_ref: TensorRef, refs: list[TensorRef], out_dtype: torch.dtype) -> None:
        spec, n, k = self.spec, base_ref.numel, len(refs)
        self.delta_sq_tensor = [0.0] * k
        self.base_sq_tensor = 0.0
        magnitude = spec.sparsify == "magnitude"
        if magnitude:
            thresholds = self._thresholds(base_ref, refs)
            ties_left = [t[1] for t in thresholds]
            self._check_distance(name)  # fail before writing this tensor when the base is wrong
        gens = tensor_generators(spec.seed, name, k) if spec.sparsify == "random" else None
        for start, count in self._ranges(n):
            base_c = self.reader.read(base_ref, start, count).to(torch.float32)
            deltas = torch.stack([self.reader.read(r, start, count).to(torch.float32) for r in refs])
            deltas -= base_c
            if not magnitude:
                self.delta_sq_tensor = [a + float(torch.dot(d, d)) for a, d in zip(self.delta_sq_tensor, deltas)]
                self.base_sq_tensor += float(torch.dot(base_c, base_c))
            for t in range(k):
                if magnitude:
                    if thresholds[t][2]:
                        mask = deltas[t].abs() >= thresholds[t][0]
                    else:
                        mask, ties_left[t] = threshold_mask(deltas[t].abs(), thresholds[t][0], ties_left[t])
                    self.stats.trimmed += count - int(torch.count_nonzero(mask))
                    deltas[t] *= mask
                elif spec.sparsify == "random":
                    mask = random_mask((count,), spec.density, gens[t])
                    self.stats.dropped += count - int(torch.count_nonzero(mask))
                    deltas[t] *= mask
                    deltas[t] /= spec.density
            merged, election = combine_deltas(deltas, self.weights, spec.consensus, spec.weight_order)
            del deltas
            self.stats.add(election)
            if spec.lam != 1.0:
                merged *= spec.lam
            merged += base_c
            self.writer.write(name, merged.to(out_dtype))
        self.stats.positions += n
        self.stats.entries += n * k
        if not magnitude:
            self._check_distance(name)
        self.base_sq += self.base_sq_tensor
        self.delta_sq = [a + b for a, b in zip(self.delta_sq, self.delta_sq_tensor)]

    def _check_distance(self, name: str) -> None:
        if self.max_rel is None or self.base_sq_tensor <= 0 or self.base.tensors[name].numel < 1024:
            return
        for m, sq in zip(self.models, self.delta_sq_tensor):
            check_same_base(relative_distance(sq, self.base_sq_tensor), self.max_rel, model=m.spec,
                            base=self.base.spec, tensor=name, raise_hint="raise the limit with --max-relative-delta")

    def relative_deltas(self) -> dict[str, float]:
        if self.base_sq <= 0:
            return {}
        return {m.spec: math.sqrt(sq / self.base_sq) for m, sq in zip(self.models, self.delta_sq)}


# ---------------------------------------------------------------- public API


def merge_models(
    base: str | os.PathLike | None,
    models: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    method: str | MergeSpec = "ties",
    *,
    overwrite: bool = False,
    dtype: str | None = None,
    max_shard_size: str | int = DEFAULT_SHARD_BYTES,
    max_relative_delta: float | None = 0.5,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    progress: bool = True,
    **params,
) -> dict:
    """Merge full models relative to ``base`` and write a loadable checkpoint to ``out``.

    ``method`` is a :class:`MergeSpec` or a method name with its parameters in ``params``
    (weights, density, lam, sign_method, weight_order, seed). ``models`` and ``base`` are cairn
    model specs (a built-in name or a local directory). ``base`` may be None only for ``linear``
    (the first model's config and tokenizer are then copied). ``dtype`` forces the output dtype of
    floating tensors (default: the base's). Returns the statistics, also written to
    ``out/cairn_merge.json``.
    """
    spec = method if isinstance(method, MergeSpec) else MergeSpec(method=method, **params)
    if len(models) < 2:
        raise CairnError(f"merging needs at least two models, got {len(models)}")
    spec.weights_for(len(models))
    if spec.needs_base and base is None:
        raise CairnError(f"method {spec.method} works on deltas to a base model; give --base")
    out = Path(out)
    out_dtype = None
    if dtype not in (None, "auto"):
        out_dtype = getattr(torch, str(dtype), None)
        if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
            raise CairnError(f"--dtype {dtype} is not a floating dtype (use float32, bfloat16 or float16)")

    base_in = open_model(base, "base") if base is not None else None
    model_ins = [open_model(m, f"model {i + 1}") for i, m in enumerate(models)]
    reference = base_in or model_ins[0]
    check_compatible(reference, model_ins if base_in else model_ins[1:], "base" if base_in else "first model")
    check_output(out, overwrite, [m.path for m in model_ins] + ([base_in.path] if base_in else []))

    # Output order: the reference's file and byte order, so the base is read sequentially.
    names = sorted(reference.tensors, key=lambda n: (str(reference.tensors[n].file), reference.tensors[n].offset))
    out_dtypes = {n: (out_dtype if out_dtype is not None and reference.tensors[n].dtype.is_floating_point
                      else reference.tensors[n].dtype) for n in names}
    plan = [(n, ST_CODES[out_dtypes[n]], reference.tensors[n].shape) for n in names]

    started = time.perf_counter()
    with atomic.atomic_dir(out, overwrite=overwrite) as tmp, TensorReader() as reader:
        writer = ShardedWriter(tmp, plan, parse_size(max_shard_size))
        stream = _StreamMerge(spec, base_in, model_ins, reader, writer, out_dtypes, chunk_elems, max_relative_delta)
        bar = _progress(len(names), f"merge {spec.method}", progress)
        try:
            for name in names:
                stream.merge(name)
                bar.update(1)
        finally:
            bar.close()
        writer.close()
        copied = copy_support_files(reference.path, tmp, skip=("cairn_merge.json",))
        if out_dtype is not None and "config.json" in copied:
            config = json.loads((tmp / "config.json").read_text())
            config["dtype"] = str(out_dtype).removeprefix("torch.")
            config.pop("torch_dtype", None)
            atomic.write_json(tmp / "config.json", config)
        summary = {
            "kind": "full_model_merge",
            **spec.as_dict(),
            "base": str(base) if base is not None else None,
            "models": [str(m) for m in models],
            "tensors": len(names),
            "tensors_copied_unmerged": stream.copied,
            "shards": len(writer.names),
            "relative_delta_norm": stream.relative_deltas(),
            **stream.stats.summary(spec),
            "seconds": round(time.perf_counter() - started, 3),
        }
        atomic.write_json(tmp / "cairn_merge.json", summary)
    summary["out"] = str(out)
    return summary


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, leave=False)
