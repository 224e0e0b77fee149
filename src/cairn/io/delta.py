"""Full-fine-tuning rounds stored as compressed deltas from their parent, restored bit-exactly.

A full-fine-tuning round of a continual run changes every weight a little; keeping a float32 copy of
the model per round is what makes a demo run directory 1.6 GB. Here a round is stored as the XOR of
its tensors' bit patterns with the parent round's (same name, shape and dtype): a small update leaves
sign, exponent and high mantissa bits equal, so the XOR is mostly zero high bytes. The XOR'd bytes are
split into byte planes (all most-significant bytes first, ...; the "byte shuffle" of Blosc/HDF5) so
those zeros form long runs, then compressed with a standard codec (zstd through the ``zstandard``
package when installed, else zlib from the standard library; lzma is available too). XOR is its own
inverse, so ``child = parent XOR delta`` restores every bit; a CRC32 of each restored tensor and of
the parent it was made against is checked on reading, so a corrupt file or the wrong parent is a
:class:`~cairn.errors.CairnError`, never a silently different model. The codec was chosen by
``benchmarks/delta_storage.py`` (SmolLM2-135M, 2 full-fine-tuning steps: 2.17x smaller than safetensors
at lr 1e-5 and 1.77x at lr 1e-4 with zstd or zlib alike; zstd encodes ~6x faster, so it is the default).

No library stores bit-exact weight deltas (safetensors stores whole tensors; lossy delta
compression such as BitDelta or DARE changes the model), so this format is hand-written. It is one
file: an 8-byte magic, a little-endian u64 header length, a JSON header (codec, per tensor: name,
dtype, shape, mode ``xor``/``raw``, byte range, CRCs; ``meta``: what the caller says the parent is,
e.g. its round, so the file alone names its parent and a re-based delta replaces one file atomically),
then the compressed blobs.

Also here: :func:`bf16_copy_error`, the rounding error of an optional bf16 copy measured against
the round's update (at lr 1e-5 an update is below bf16's resolution and the copy erases it), and
:func:`rounds_to_keep`, the ``keep_models: all | last | needed`` policy as a pure function.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Literal, Mapping

import numpy as np
import torch

from cairn.errors import CairnError

MAGIC = b"CAIRNDL1"
DELTA_FILE = "model.delta"

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}


# -- codecs ------------------------------------------------------------------------------------

def _zstd():
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def available_codecs() -> list[str]:
    return (["zstd"] if _zstd() else []) + ["zlib", "lzma", "none"]


def default_codec() -> str:
    """zstd when installed (measured: same ratio as zlib-6 on byte planes at a fraction of the time), else zlib."""
    return "zstd" if _zstd() else "zlib"


def _compress(codec: str, data: bytes, level: int | None) -> bytes:
    if codec == "zstd":
        zstandard = _zstd()
        if zstandard is None:
            raise CairnError("codec 'zstd' needs the zstandard package: pip install zstandard")
        return zstandard.ZstdCompressor(level=level or 3).compress(data)
    if codec == "zlib":
        return zlib.compress(data, level or 6)
    if codec == "lzma":
        import lzma

        return lzma.compress(data, preset=level if level is not None else 1)
    if codec == "none":
        return data
    raise CairnError(f"unknown delta codec {codec!r}; choose one of {', '.join(available_codecs())}")


def _decompress(codec: str, data: bytes, size: int) -> bytes:
    if codec == "zstd":
        zstandard = _zstd()
        if zstandard is None:
            raise CairnError("this delta was written with zstd; install the zstandard package to read it")
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
    if codec == "zlib":
        return zlib.decompress(data)
    if codec == "lzma":
        import lzma

        return lzma.decompress(data)
    if codec == "none":
        return data
    raise ValueError(f"unknown codec {codec!r}")


# -- tensor bytes --------------------------------------------------------------------------------

def _raw(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a uint8 array (bit patterns, any dtype; bf16 has no numpy dtype)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.numel() == 0:
        return np.zeros(0, dtype=np.uint8)
    return t.view(torch.uint8).numpy()


def _shuffle(raw: np.ndarray, itemsize: int) -> np.ndarray:
    """Byte planes: byte k of every element together (little-endian, so high bytes come last)."""
    return raw if itemsize == 1 else raw.reshape(-1, itemsize).T.copy().reshape(-1)


def _unshuffle(raw: np.ndarray, itemsize: int) -> np.ndarray:
    if itemsize == 1:
        return raw
    planes = raw.reshape(itemsize, -1)
    out = np.empty((planes.shape[1], itemsize), dtype=np.uint8)
    for k in range(itemsize):  # one plane at a time: 3-5x faster than planes.T.copy() (benchmarks/delta_shuffle.py)
        out[:, k] = planes[k]
    return out.reshape(-1)


def _tensor(raw: np.ndarray, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if raw.size == 0:
        return torch.empty(shape, dtype=dtype)
    if not raw.flags.writeable:  # a view of the file's bytes; decoded arrays are fresh and used as they are
        raw = raw.copy()
    return torch.from_numpy(raw).view(dtype).reshape(shape)


def _crc(raw: np.ndarray) -> int:
    return zlib.crc32(memoryview(raw)) & 0xFFFFFFFF


# -- encode / decode -----------------------------------------------------------------------------

def encode_delta(parent: Mapping[str, torch.Tensor], child: Mapping[str, torch.Tensor], codec: str | None = None,
                 level: int | None = None, meta: dict | None = None) -> bytes:
    """The bytes of a delta file that turns ``parent`` into ``child`` exactly (see the module docstring);
    ``meta`` (JSON-able) goes into the header as it is (:func:`read_delta_meta` reads it back)."""
    codec = codec or default_codec()
    entries, blobs, offset = [], [], 0
    for name, tensor in child.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise CairnError(f"tensor {name}: dtype {tensor.dtype} cannot be stored as a delta")
        raw = _raw(tensor)
        itemsize = tensor.element_size()
        entry = {"name": name, "dtype": dtype, "shape": list(tensor.shape), "crc": _crc(raw), "size": int(raw.size)}
        base = parent.get(name)
        if base is not None and base.dtype == tensor.dtype and tuple(base.shape) == tuple(tensor.shape):
            praw = _raw(base)
            payload = np.bitwise_xor(praw, raw)
            entry |= {"mode": "xor", "parent_crc": _crc(praw)}
        else:  # a new or reshaped tensor: stored whole
            payload = raw
            entry["mode"] = "raw"
        blob = _compress(codec, _shuffle(payload, itemsize).tobytes(), level)
        entry |= {"offset": offset, "length": len(blob)}
        offset += len(blob)
        entries.append(entry)
        blobs.append(blob)
    header = {"format": "cairn-delta", "version": 1, "codec": codec, "tensors": entries}
    if meta is not None:
        header["meta"] = meta
    header = json.dumps(header).encode()
    return b"".join([MAGIC, struct.pack("<Q", len(header)), header, *blobs])


def _header(data: bytes, where: str) -> tuple[dict, int]:
    """(the JSON header, where the blobs start) of a delta file's bytes (or its first bytes)."""
    if len(data) < 16 or data[:8] != MAGIC:
        raise CairnError(f"{where} is not a cairn delta file (bad magic); it is corrupt or another format")
    (hlen,) = struct.unpack("<Q", data[8:16])
    try:
        header = json.loads(data[16:16 + hlen].decode())
    except (ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict) or "codec" not in header or "tensors" not in header:
        raise CairnError(f"{where}: the header is corrupt (truncated or overwritten file)")
    return header, 16 + hlen


def decode_delta(data: bytes, parent: Mapping[str, torch.Tensor], where: str = "delta") -> dict[str, torch.Tensor]:
    """The child's tensors from a delta's bytes and the parent it was made against."""
    header, start = _header(data, where)
    codec, entries = header["codec"], header["tensors"]
    body = memoryview(data)[start:]
    out = {}
    for e in entries:
        name = e["name"]
        blob = body[e["offset"]:e["offset"] + e["length"]]
        if len(blob) != e["length"]:
            raise CairnError(f"{where}: tensor {name} is cut short; the file is truncated")
        dtype = _DTYPES.get(e["dtype"])
        if dtype is None:
            raise CairnError(f"{where}: tensor {name} has unknown dtype {e['dtype']!r}")
        itemsize = torch.empty(0, dtype=dtype).element_size()
        try:
            payload = np.frombuffer(_decompress(codec, bytes(blob), e["size"]), dtype=np.uint8)
        except CairnError:
            raise
        except Exception as exc:  # zlib.error, lzma.LZMAError, zstd.ZstdError: all mean corrupt bytes
            raise CairnError(f"{where}: tensor {name} does not decompress ({exc}); the file is corrupt") from None
        if payload.size != e["size"]:
            raise CairnError(f"{where}: tensor {name} decompresses to {payload.size} bytes, expected {e['size']}")
        payload = _unshuffle(payload, itemsize)
        if e["mode"] == "xor":
            base = parent.get(name)
            if base is None or str(base.dtype).removeprefix("torch.") != e["dtype"] or list(base.shape) != e["shape"]:
                raise CairnError(f"{where}: tensor {name} is stored relative to a parent tensor that the given parent "
                                 "lacks (or has another shape/dtype); restore it against the round it was made from")
            praw = _raw(base)
            if _crc(praw) != e["parent_crc"]:
                raise CairnError(f"{where}: tensor {name}'s parent differs from the one the delta was made from; "
                                 "restore the parent round first (or the parent artifact changed)")
            raw = np.bitwise_xor(praw, payload)
        else:
            raw = payload
        if _crc(raw) != e["crc"]:
            raise CairnError(f"{where}: tensor {name} fails its checksum after decoding; the file is corrupt")
        out[name] = _tensor(raw, dtype, e["shape"])
    return out


def write_delta(path: str | os.PathLike, parent: Mapping[str, torch.Tensor], child: Mapping[str, torch.Tensor],
                codec: str | None = None, level: int | None = None, meta: dict | None = None) -> dict:
    """Write the delta atomically (temp file + fsync + rename, then fsync of the folder so the rename
    itself survives a power cut before anything that relies on it, such as deleting the old parent);
    returns sizes."""
    from cairn import atomic

    path = Path(path)
    data = encode_delta(parent, child, codec, level, meta)
    with atomic.atomic_file(path) as tmp:  # also removes a killed writer's temp file
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    _fsync_dir(path.parent)
    raw = sum(t.numel() * t.element_size() for t in child.values())
    return {"bytes": len(data), "raw_bytes": raw, "ratio": raw / max(len(data), 1)}


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its renames are durable without it
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_delta_meta(path: str | os.PathLike) -> dict | None:
    """The ``meta`` a delta file was written with (None when written without), reading only its header."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) == 16 and head[:8] == MAGIC:
                head += f.read(struct.unpack("<Q", head[8:16])[0])
    except OSError as exc:
        raise CairnError(f"cannot read delta {path}: {exc.strerror}") from None
    meta = _header(head, str(path))[0].get("meta")
    return meta if isinstance(meta, dict) else None


def read_delta(path: str | os.PathLike, parent: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The child state dict, bit-exact, from a delta file and its parent state dict."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CairnError(f"cannot read delta {path}: {exc.strerror}") from None
    return decode_delta(data, parent, str(path))


# -- bf16 copy ------------------------------------------------------------------------------------

def bf16_copy_error(parent: Mapping[str, torch.Tensor], child: Mapping[str, torch.Tensor]) -> dict:
    """What a bf16 copy of ``child`` loses, measured against the round's update ``child - parent``.

    ``relative_error`` = ||bf16(child) - child|| / ||child - parent|| (over all floating tensors):
    near or above 1 the rounding is as large as the update itself. ``erased_fraction`` is the
    fraction of updated entries whose bf16 value equals the parent's bf16 value (the update vanished).
    """
    err_sq = upd_sq = 0.0
    updated = erased = 0
    for name, c in child.items():
        p = parent.get(name)
        if not c.is_floating_point() or p is None or p.shape != c.shape:
            continue
        c64, p64 = c.double(), p.double()
        err_sq += float(((c.to(torch.bfloat16).double() - c64) ** 2).sum())
        upd_sq += float(((c64 - p64) ** 2).sum())
        changed = c != p
        updated += int(changed.sum())
        erased += int((changed & (c.to(torch.bfloat16) == p.to(torch.bfloat16))).sum())
    return {"relative_error": (err_sq ** 0.5) / (upd_sq ** 0.5) if upd_sq else float("inf"),
            "update_norm": upd_sq ** 0.5, "rounding_error_norm": err_sq ** 0.5,
            "erased_fraction": erased / updated if updated else 0.0}


# -- keep_models policy -----------------------------------------------------------------------------

KeepPolicy = Literal["all", "last", "needed"]


def rounds_to_keep(policy: KeepPolicy, rounds: list[str], *, trainable: str, strategy: str,
                   method_finished: bool, combine_sources_pending: bool = False) -> list[str]:
    """Which of a method's finished rounds (round directory names, in order) keep their model artifact.

    - ``all``: every round.
    - ``last``: only the latest finished round (the resume point, and the final model at the end);
      earlier rounds go as soon as a later one is saved, so full-fine-tuning update diagnostics
      need ``needed`` or ``all``.
    - ``needed``: what a later step of this run still reads: every round until the method finishes
      (the update diagnostics compare all rounds), then the final model only.
    Both keep every round of a one-round method whose combine step has not finished (the
    ingredients), and LoRA adapters are always kept: restoring round k re-applies adapters 1..k,
    and they are small.
    """
    if policy not in ("all", "last", "needed"):
        raise CairnError(f"keep_models must be all, last or needed, got {policy!r}")
    if policy == "all" or not rounds or trainable == "lora" or combine_sources_pending:
        return list(rounds)
    if policy == "needed" and not method_finished:
        return list(rounds)
    return [rounds[-1]]
