"""Byte-plane unshuffle of round deltas: cairn.io.delta's plane-by-plane copy vs numpy's transposed copy.

A delta groups byte k of every element together before compressing (:mod:`cairn.io.delta`); decoding
puts them back. The baseline is the one-line ``planes.T.copy()`` the codec first used; cairn's
version copies one plane at a time. Both are timed interleaved in this process on float32 tensors of
the sizes of SmolLM2-135M (its embedding and an MLP matrix), best of ``--repeats``, and must give the
same bytes. (Shuffling, the encoding direction, measured the same either way and keeps the one-liner.)
Usage:

    python benchmarks/delta_shuffle.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _baseline_unshuffle(raw, itemsize):
    return raw.reshape(itemsize, -1).T.copy().reshape(-1)


def _best(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from cairn.io.delta import _shuffle, _unshuffle

    rng = np.random.default_rng(0)
    print(f"{'tensor':<22} {'unshuffle time base/cairn':>26}  same bytes")
    for name, shape in (("embedding 49152x576", (49152, 576)), ("mlp 1536x576", (1536, 576))):
        raw = rng.integers(0, 256, size=int(np.prod(shape)) * 4, dtype=np.uint8)
        planes = _shuffle(raw, 4)
        same = np.array_equal(_unshuffle(planes, 4), raw) and np.array_equal(_baseline_unshuffle(planes, 4), raw)
        times = {}
        for _ in range(args.repeats):  # interleaved: the machine's noise hits both alike
            for key, fn in (("base", lambda: _baseline_unshuffle(planes, 4)), ("cairn", lambda: _unshuffle(planes, 4))):
                times[key] = min(times.get(key, float("inf")), _best(fn, 1))
        print(f"{name:<22} {times['base'] / times['cairn']:>25.2f}x  {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
