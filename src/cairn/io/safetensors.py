"""One streaming safetensors reader and writer for model directories (single file or sharded).

- **Reading** (:func:`list_tensors`, :class:`TensorReader`, :class:`Checkpoint`): headers are parsed
  directly and each tensor (or a flat range of it) is read with ``preadv`` into a fresh buffer.
  Nothing is memory-mapped, so resident memory holds only what is in flight.
- **Writing** (:class:`ShardedWriter`): the output's names, dtypes and shapes are planned first, so
  each shard's header is written before its data and tensors are streamed into it in chunks; shards
  are named as ``save_pretrained`` names them (``model.safetensors`` or
  ``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json``).

Hand-written because the ``safetensors`` package reads whole tensors through mmap and writes whole
dicts; merging K large models needs chunked reads and streamed writes. Used by merging
(:mod:`cairn.combine.merge_models`, :mod:`cairn.combine.merge_lora`), FFT MoE mixing
(:mod:`cairn.combine.moe_fft`) and the round diagnostics (:mod:`cairn.eval.round_updates`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from cairn import atomic
from cairn.errors import CairnError

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_CODES = {v: k for k, v in ST_DTYPES.items()}

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


class Checkpoint:
    """Whole tensors by name from a model directory, read one at a time (see :class:`TensorReader`)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.refs = list_tensors(self.path)
        self._reader = TensorReader()

    def __contains__(self, name: str) -> bool:
        return name in self.refs

    def keys(self) -> list[str]:
        return list(self.refs)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.refs[name].shape

    def get(self, name: str) -> torch.Tensor:
        if name not in self.refs:
            raise CairnError(f"{self.path}: tensor {name} is missing from the checkpoint")
        return self._reader.read_full(self.refs[name])

    def close(self) -> None:
        self._reader.__exit__()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_tensors(out_dir: Path, tensors: Sequence[tuple[str, torch.Tensor]], max_shard_bytes: int) -> None:
    """Write already-computed tensors, in order, as shards (a plan from their own dtypes and shapes)."""
    plan = [(name, ST_CODES[t.dtype], tuple(t.shape)) for name, t in tensors]
    writer = ShardedWriter(Path(out_dir), plan, max_shard_bytes)
    for name, t in tensors:
        writer.write(name, t)
    writer.close()
