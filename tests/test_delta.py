"""Round deltas: bit-exact round trips for every dtype, atomic writes, corrupt files refused."""

from __future__ import annotations

import pytest
import torch

from cairn.errors import CairnError
from cairn.io.delta import (available_codecs, bf16_copy_error, decode_delta, encode_delta, read_delta,
                            rounds_to_keep, write_delta)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int8, torch.bool]


def _pair(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        p = torch.rand(5, 7, generator=g) > 0.5
        return {"w": p, "b": p[0]}, {"w": ~p, "b": p[0]}
    if not dtype.is_floating_point:
        p = torch.randint(-100, 100, (5, 7), generator=g).to(dtype)
        return {"w": p}, {"w": p + 1}
    p = torch.randn(5, 7, generator=g).to(dtype)
    c = (p.double() + 1e-3 * torch.randn(5, 7, generator=g, dtype=torch.float64)).to(dtype)
    c[0, 0] = float("nan")  # odd bit patterns survive too
    c[0, 1] = float("-inf")
    c[0, 2] = -0.0
    return {"w": p, "scalar": p[1, 1].clone().reshape(())}, {"w": c, "scalar": c[2, 2].clone().reshape(())}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                  b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("codec", available_codecs())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_bit_exact(dtype, codec):
    parent, child = _pair(dtype)
    child = dict(child, new=torch.arange(6, dtype=torch.float32), empty=torch.zeros(0, 3))  # raw-stored tensors
    back = decode_delta(encode_delta(parent, child, codec), parent)
    assert list(back) == list(child)
    for name in child:
        assert _same_bits(back[name], child[name]), name  # XOR is exactly invertible: every bit restored


def test_small_update_compresses_and_write_is_atomic(tmp_path):
    g = torch.Generator().manual_seed(0)
    parent = {"w": torch.randn(256, 256, generator=g)}
    child = {"w": parent["w"] + 1e-5 * torch.randn(256, 256, generator=g)}
    stats = write_delta(tmp_path / "model.delta", parent, child)
    assert stats["ratio"] > 1.5  # equal sign/exponent bits compress; a fixed-seed input, so not flaky
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.delta"]  # no temp file left
    assert _same_bits(read_delta(tmp_path / "model.delta", parent)["w"], child["w"])


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import os

    def boom(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_delta(tmp_path / "model.delta", *_pair(torch.float32))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "flip-body", "magic", "header", "empty"])
def test_corrupt_delta_is_a_cairn_error(damage, tmp_path):
    parent, child = _pair(torch.float32)
    data = bytearray(encode_delta(parent, child, "zlib"))
    if damage == "truncate":
        data = data[: len(data) - 20]
    elif damage == "flip-body":
        data[-10] ^= 0xFF
    elif damage == "magic":
        data[0:8] = b"NOTDELTA"
    elif damage == "header":
        data[20:30] = b"\xff" * 10
    else:
        data = b""
    (tmp_path / "d").write_bytes(bytes(data))
    with pytest.raises(CairnError) as err:
        read_delta(tmp_path / "d", parent)
    assert str(tmp_path / "d") in str(err.value)


def test_wrong_parent_is_refused():
    parent, child = _pair(torch.float32)
    other = {"w": parent["w"] + 1, "scalar": parent["scalar"]}
    with pytest.raises(CairnError, match="parent differs"):
        decode_delta(encode_delta(parent, child), other)
    with pytest.raises(CairnError, match="lacks"):
        decode_delta(encode_delta(parent, child), {})


def test_bf16_copy_error_is_reported_against_the_update():
    g = torch.Generator().manual_seed(0)
    parent = {"w": torch.randn(64, 64, generator=g)}
    tiny = {"w": parent["w"] + 1e-6 * torch.randn(64, 64, generator=g)}  # far below bf16's ~2^-8 resolution
    big = {"w": parent["w"] + 1e-1 * torch.randn(64, 64, generator=g)}
    t, b = bf16_copy_error(parent, tiny), bf16_copy_error(parent, big)
    assert t["relative_error"] > 10 and t["erased_fraction"] > 0.9  # the copy erases a tiny update
    assert b["relative_error"] < 0.1 and b["erased_fraction"] < 0.1


def test_rounds_to_keep_policy():
    r = ["01-a", "02-b", "03-c"]
    assert rounds_to_keep("all", r, trainable="full", strategy="sequential", method_finished=True) == r
    assert rounds_to_keep("last", r, trainable="full", strategy="sequential", method_finished=False) == ["03-c"]
    assert rounds_to_keep("needed", r, trainable="full", strategy="sequential", method_finished=False) == r
    assert rounds_to_keep("needed", r, trainable="full", strategy="sequential", method_finished=True) == ["03-c"]
    assert rounds_to_keep("last", r, trainable="lora", strategy="sequential", method_finished=True) == r
    assert rounds_to_keep("last", r, trainable="full", strategy="one-round", method_finished=True,
                          combine_sources_pending=True) == r
    assert rounds_to_keep("needed", r, trainable="loramoe", strategy="sequential", method_finished=True) == ["03-c"]
    with pytest.raises(CairnError):
        rounds_to_keep("some", r, trainable="full", strategy="sequential", method_finished=True)
