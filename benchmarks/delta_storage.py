"""Storage of a full-fine-tuning round: compressed bit-exact delta vs a safetensors copy, same run.

Trains the built-in model with cairn's ``train()`` (full fine-tuning, a few steps of the demo
zoology task) at each learning rate, then stores the round three ways side by side in this process:
the safetensors file a round keeps today (the baseline), a delta from the parent through each codec
(``cairn.io.delta``), and the bf16 copy a user may ask for. Prints per codec the size ratio
(safetensors bytes / delta bytes), encode and decode time relative to safetensors save and load, a
bit-exactness check of the restored tensors, and the bf16 copy's rounding error relative to the
update's norm. Usage:

    python benchmarks/delta_storage.py [--model smollm2-135m] [--steps 3] [--lrs 1e-5 1e-4]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


def _timed(fn, repeats: int = 1):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 1e-4])
    ap.add_argument("--codecs", nargs="+", default=None,
                    help="default: zstd (when installed) and zlib; lzma compresses ~the same and is far slower")
    args = ap.parse_args()

    from safetensors.torch import load_file, save_file

    from cairn.config import TrainingConfig
    from cairn.data.demo import generate_domain
    from cairn.io.delta import available_codecs, bf16_copy_error, read_delta, write_delta
    from cairn.methods.full import make_full_trainable
    from cairn.models import load_model, load_tokenizer
    from cairn.train.loop import train

    tokenizer = load_tokenizer(args.model)
    examples = generate_domain("zoology", entities=8)["train"]
    codecs = args.codecs or [c for c in available_codecs() if c in ("zstd", "zlib")]
    tmp = tempfile.mkdtemp(prefix="cairn-delta-bench-")
    for lr in args.lrs:
        model = load_model(args.model)
        parent = {k: v.detach().clone() for k, v in model.state_dict().items()}
        cfg = TrainingConfig(max_steps=args.steps, batch_size=args.batch_size, lr=lr, warmup_ratio=0.0,
                             log_every=10**9, max_length=96)
        train(make_full_trainable(model), tokenizer, examples, cfg, progress=False, log=lambda s: None)
        child = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        del model
        # tied weights share storage in the model; safetensors refuses shared tensors, so compare like for like
        seen, unique = set(), {}
        for k, v in child.items():
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                unique[k] = v
        child = unique
        parent = {k: parent[k] for k in child}
        st_path = os.path.join(tmp, "model.safetensors")
        _, st_save = _timed(lambda: save_file(child, st_path))
        # load_file maps the file lazily; cloning makes it read every byte, as decoding a delta does
        _, st_load = _timed(lambda: {k: v.clone() for k, v in load_file(st_path).items()})
        st_bytes = os.path.getsize(st_path)
        changed = sum(int((child[k] != parent[k]).sum()) for k in child)
        total = sum(v.numel() for v in child.values())
        print(f"\nlr {lr:g}, {args.steps} steps: {changed / total:.1%} of {total / 1e6:.1f}M weights changed; "
              f"safetensors {st_bytes / 2**20:.1f} MiB, save {st_save:.2f}s, load {st_load:.2f}s")
        print(f"  {'codec':<6} {'MiB':>8} {'size ratio':>10} {'encode/save':>12} {'decode/load':>12}  bit-exact")
        for codec in codecs:
            path = os.path.join(tmp, f"model.{codec}.delta")
            stats, enc = _timed(lambda: write_delta(path, parent, child, codec))
            back, dec = _timed(lambda: read_delta(path, parent))
            exact = all(torch.equal(back[k].view(torch.uint8) if back[k].dim() else back[k], child[k].view(torch.uint8)
                                    if child[k].dim() else child[k]) for k in child)
            print(f"  {codec:<6} {stats['bytes'] / 2**20:>8.1f} {st_bytes / stats['bytes']:>9.2f}x "
                  f"{enc / st_save:>11.2f}x {dec / st_load:>11.2f}x  {'yes' if exact else 'NO'}", flush=True)
            os.unlink(path)
        err = bf16_copy_error(parent, child)
        print(f"  bf16 copy: {st_bytes / 2 / 2**20:.1f} MiB; rounding error / update norm = {err['relative_error']:.2f}; "
              f"updated weights whose bf16 value equals the parent's: {err['erased_fraction']:.1%}")


if __name__ == "__main__":
    main()
