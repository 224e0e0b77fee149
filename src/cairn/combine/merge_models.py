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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from cairn import atomic
from cairn.combine.merge_fns import MergeSpec, MergeStats, combine_deltas, keep_count, random_mask, threshold_mask, trim_threshold
from cairn.errors import CairnError

DEFAULT_CHUNK_ELEMS = 1 << 20  # 1M entries: 4 MiB per model per chunk in float32; keeps the working set small
DEFAULT_SHARD_BYTES = 5 * 1024**3  # what save_pretrained uses

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_CODES = {v: k for k, v in ST_DTYPES.items()}
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".gguf",
                   ".msgpack", ".h5", ".ckpt")
# config.json keys that define the tensor layout; a model whose values differ is another architecture.
ARCH_KEYS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
             "n_embd", "n_layer", "n_head", "d_model")


# ---------------------------------------------------------------- safetensors reading


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes lie: file, absolute byte offset, dtype code and shape."""

    name: str
    file: Path
    code: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def dtype(self) -> torch.dtype:
        return ST_DTYPES[self.code]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the absolute offset where its data starts."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CairnError(f"{path} is not a safetensors file (shorter than 8 bytes)")
            size = int.from_bytes(head, "little")
            if size > 100 * 1024**2:
                raise CairnError(f"{path} is not a safetensors file (header length {size} is implausible)")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as exc:
        raise CairnError(f"cannot read safetensors header of {path}: {exc}") from None
    return header, 8 + size


def list_tensors(model_dir: Path) -> dict[str, TensorRef]:
    """All tensors of a model directory (single file or sharded with an index), by name."""
    files: list[Path]
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({model_dir / f for f in weight_map.values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        hint = " (it has PyTorch .bin weights; re-save with save_pretrained(..., safe_serialization=True))" \
            if any(model_dir.glob("*.bin")) else ""
        raise CairnError(f"no safetensors weights in {model_dir}{hint}")
    refs: dict[str, TensorRef] = {}
    for file in files:
        if not file.is_file():
            raise CairnError(f"{index} names shard {file.name}, which is missing from {model_dir}")
        header, start = read_header(file)
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if meta["dtype"] not in ST_DTYPES:
                raise CairnError(f"tensor {name} in {file} has dtype {meta['dtype']}, which cairn cannot merge")
            begin, end = meta["data_offsets"]
            refs[name] = TensorRef(name, file, meta["dtype"], tuple(meta["shape"]), start + begin, end - begin)
    return refs


class TensorReader:
    """Reads flat ranges of tensors with ``preadv`` into fresh buffers; keeps one fd per file."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def read(self, ref: TensorRef, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Entries [start, start + count) of ``ref`` as a 1-D tensor of its dtype."""
        count = ref.numel - start if count is None else count
        fd = self._fds.get(ref.file)
        if fd is None:
            fd = self._fds[ref.file] = os.open(ref.file, os.O_RDONLY)
        itemsize = ref.dtype.itemsize
        buf = torch.empty(count * itemsize, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        done = 0
        while done < len(view):  # preadv may return short counts on large reads
            n = os.preadv(fd, [view[done:]], ref.offset + start * itemsize + done)
            if n <= 0:
                raise CairnError(f"{ref.file} ends early while reading tensor {ref.name}: the file is truncated")
            done += n
        return buf.view(ref.dtype)

    def read_full(self, ref: TensorRef) -> torch.Tensor:
        return self.read(ref).reshape(ref.shape)


# ---------------------------------------------------------------- safetensors writing


class ShardedWriter:
    """Writes tensors in a fixed planned order into safetensors shards, streaming their bytes.

    ``plan`` lists (name, dtype code, shape) in write order; shard boundaries are fixed up front
    from the sizes, so each shard's header is written before its data. Call :meth:`write` with
    consecutive chunks of each tensor in plan order, then :meth:`close`.
    """

    def __init__(self, out_dir: Path, plan: Sequence[tuple[str, str, tuple[int, ...]]], max_shard_bytes: int,
                 prefix: str = "model") -> None:
        self.out_dir = out_dir
        self.prefix = prefix
        shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
        size = 0
        for item in plan:
            nbytes = math.prod(item[2]) * ST_DTYPES[item[1]].itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(item)
            size += nbytes
        n = len(shards)
        self.names = [f"{prefix}.safetensors"] if n == 1 else \
            [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shards = shards
        self.total_size = sum(math.prod(s) * ST_DTYPES[c].itemsize for _, c, s in plan)
        self._queue = [(i, item) for i, shard in enumerate(shards) for item in shard]
        self._pos = 0  # index into _queue of the tensor being written
        self._written = 0  # bytes of the current tensor written so far
        self._file = None
        self._shard = -1

    def _open_shard(self, i: int) -> None:
        if self._file is not None:
            self._file.close()
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, code, shape in self.shards[i]:
            nbytes = math.prod(shape) * ST_DTYPES[code].itemsize
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
        self._file = open(self.out_dir / self.names[i], "wb")
        self._file.write(len(raw).to_bytes(8, "little"))
        self._file.write(raw)
        self._shard = i

    def write(self, name: str, chunk: torch.Tensor) -> None:
        shard, (expected, code, shape) = self._queue[self._pos]
        if name != expected:
            raise RuntimeError(f"writer expected tensor {expected}, got {name}")
        if chunk.dtype != ST_DTYPES[code]:
            raise RuntimeError(f"tensor {name}: writer expected dtype {code}, got {chunk.dtype}")
        if shard != self._shard:
            self._open_shard(shard)
        data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._written += data.nbytes
        total = math.prod(shape) * ST_DTYPES[code].itemsize
        if self._written > total:
            raise RuntimeError(f"tensor {name}: wrote {self._written} bytes, expected {total}")
        if self._written == total:
            self._pos += 1
            self._written = 0

    def close(self) -> None:
        if self._pos != len(self._queue):
            raise RuntimeError(f"writer closed after {self._pos} of {len(self._queue)} tensors")
        if self._file is not None:
            self._file.close()
            self._file = None
        if len(self.names) > 1:
            weight_map = {name: self.names[i] for i, item in self._queue for name in [item[0]]}
            atomic.write_json(self.out_dir / f"{self.prefix}.safetensors.index.json",
                              {"metadata": {"total_size": self.total_size}, "weight_map": weight_map})


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
        for key in ARCH_KEYS:
            a, b = reference.config.get(key), m.config.get(key)
            if a is not None and b is not None and a != b:
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


def copy_support_files(src: Path, dst: Path) -> list[str]:
    """Copy config, generation config, tokenizer and other non-weight top-level files."""
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name != "cairn_merge.json" \
                and not f.name.startswith("."):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


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
        base_norm = math.sqrt(self.base_sq_tensor)
        for m, sq in zip(self.models, self.delta_sq_tensor):
            rel = math.sqrt(sq) / base_norm
            if rel > self.max_rel:
                raise CairnError(
                    f"tensor {name}: model {m.spec} differs from the base {self.base.spec} by "
                    f"{rel:.2f}x the base tensor's norm (limit {self.max_rel}); the base is probably not the "
                    f"model's base (task vectors would be meaningless). Give the model's actual base, or "
                    f"raise the limit with --max-relative-delta if the deltas are really this large"
                )

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
        copied = copy_support_files(reference.path, tmp)
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
