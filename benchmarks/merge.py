"""Benchmark: cairn's streamed TIES merge against mergekit on K perturbed copies of the built-in model.

Builds K (default 4) copies of the built-in SmolLM2-135M with small Gaussian perturbations (each
tensor + N(0, (rel · std(tensor))²), seeded), merges them with TIES (density 0.2, weights 1, λ 1)
with cairn and with mergekit, each in its own subprocess so that each side's peak RSS
(``VmHWM``) is its own, and prints wall time and peak RSS as ratios, peak RSS against the size
of one model, and the largest absolute difference between the two merged models.

With weights 1 and λ 1 the two define TIES the same way (per-tensor trim to k = int(density·n),
sign of the summed mass with 0 → +, disjoint mean); the only possible differences are which entry
is kept when magnitudes tie exactly at the trim threshold (mergekit: argsort order; cairn: lowest
index) and float summation order.

    pip install mergekit          # optional benchmark dependency
    python benchmarks/merge.py [--k 4] [--density 0.2] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CAIRN_SIDE = """
import json, sys, time

def peak_rss_kb():
    # VmHWM is this process's own high-water mark; ru_maxrss would also count the parent's
    # memory at fork time, which Linux carries across exec.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
t0 = time.perf_counter()
from cairn.combine.merge_models import merge_models
base, out, density, *models = sys.argv[1:]
summary = merge_models(base, models, out, "ties", density=float(density), progress=False)
print(json.dumps({"seconds": time.perf_counter() - t0, "merge_seconds": summary["seconds"],
                  "peak_rss_kb": peak_rss_kb(),
                  "fraction_trimmed": summary["fraction_trimmed"]}))
"""

MERGEKIT_SIDE = """
import json, sys, time

def peak_rss_kb():
    # VmHWM is this process's own high-water mark; ru_maxrss would also count the parent's
    # memory at fork time, which Linux carries across exec.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
t0 = time.perf_counter()
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
config_file, out = sys.argv[1:]
config = MergeConfiguration.model_validate(yaml.safe_load(open(config_file)))
run_merge(config, out_path=out, options=MergeOptions(copy_tokenizer=True, lazy_unpickle=True, quiet=True,
                                                     write_model_card=False))
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_rss_kb": peak_rss_kb()}))
"""

IMPORT_ONLY = """
import json

def peak_rss_kb():
    # VmHWM is this process's own high-water mark; ru_maxrss would also count the parent's
    # memory at fork time, which Linux carries across exec.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
import torch, safetensors, numpy
print(json.dumps({"peak_rss_kb": peak_rss_kb()}))
"""


def make_copies(base: Path, work: Path, k: int, rel: float) -> list[Path]:
    """K perturbed copies of ``base`` (full state in memory here: this parent process is not measured)."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(base / "model.safetensors"))
    copies = []
    for t in range(k):
        out = work / f"copy{t}"
        if not (out / "model.safetensors").is_file():
            out.mkdir(parents=True, exist_ok=True)
            gen = torch.Generator().manual_seed(1000 + t)
            noisy = {}
            for name, tensor in state.items():
                std = float(tensor.float().std()) if tensor.numel() > 1 else 1.0
                noisy[name] = tensor + torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype) * (rel * std)
            save_file(noisy, str(out / "model.safetensors"), metadata={"format": "pt"})
            for f in base.iterdir():
                if f.is_file() and f.suffix != ".safetensors":
                    shutil.copy2(f, out / f.name)
        copies.append(out)
    return copies


def run_side(code: str, args: list[str], threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(a: Path, b: Path) -> tuple[float, int, int, list[str]]:
    """Max |a - b| over shared tensors, entries that differ, entries compared, tensors in one only."""
    from cairn.combine.merge_models import TensorReader, list_tensors

    ta, tb = list_tensors(a), list_tensors(b)
    worst, differ, total = 0.0, 0, 0
    only = sorted(set(ta) ^ set(tb))
    with TensorReader() as reader:
        for name in sorted(set(ta) & set(tb)):
            d = (reader.read_full(ta[name]).float() - reader.read_full(tb[name]).float()).abs()
            worst = max(worst, float(d.max()))
            differ += int(d.count_nonzero())
            total += d.numel()
    return worst, differ, total, only


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=4, help="number of models merged")
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--rel", type=float, default=0.01, help="perturbation std relative to each tensor's std")
    parser.add_argument("--threads", type=int, default=2, help="OMP threads for both sides")
    parser.add_argument("--workdir", type=Path, help="where copies and outputs go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    from cairn.models import ensure_builtin

    base = ensure_builtin("smollm2-135m")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cairn-merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        copies = make_copies(base, work, args.k, args.rel)
        model_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        baseline = run_side(IMPORT_ONLY, [], args.threads)
        print(f"K={args.k} copies of {base.name} ({model_bytes / 2**20:.0f} MiB each), TIES density {args.density}")
        print(f"python + torch import alone: peak RSS {baseline['peak_rss_kb'] / 1024:.0f} MiB")

        for out in ("out_cairn", "out_mergekit"):
            shutil.rmtree(work / out, ignore_errors=True)
        ours = run_side(CAIRN_SIDE, [str(base), str(work / "out_cairn"), str(args.density)] + [str(c) for c in copies],
                        args.threads)
        theirs = None
        try:
            import mergekit  # noqa: F401
        except ImportError:
            print("mergekit is not installed (pip install mergekit); reporting cairn alone")
        else:
            config = {
                "merge_method": "ties",
                "base_model": str(base),
                "models": [{"model": str(c), "parameters": {"density": args.density, "weight": 1.0}} for c in copies],
                "parameters": {"normalize": True, "int8_mask": False},
                "dtype": "float32",
            }
            (work / "mergekit.yaml").write_text(json.dumps(config))  # JSON is valid YAML
            theirs = run_side(MERGEKIT_SIDE, [str(work / "mergekit.yaml"), str(work / "out_mergekit")], args.threads)

        mib = lambda kb: kb / 1024  # noqa: E731
        print(f"\n{'':24}{'cairn':>12}{'mergekit':>12}{'ratio':>10}")
        t_their = f"{theirs['seconds']:.1f}" if theirs else "-"
        ratio_t = f"{ours['seconds'] / theirs['seconds']:.2f}" if theirs else "-"
        print(f"{'wall time (s)':24}{ours['seconds']:>12.1f}{t_their:>12}{ratio_t:>10}")
        r_their = f"{mib(theirs['peak_rss_kb']):.0f}" if theirs else "-"
        ratio_r = f"{ours['peak_rss_kb'] / theirs['peak_rss_kb']:.2f}" if theirs else "-"
        print(f"{'peak RSS (MiB)':24}{mib(ours['peak_rss_kb']):>12.0f}{r_their:>12}{ratio_r:>10}")
        one = model_bytes / 1024
        line = f"{'peak RSS / one model':24}{ours['peak_rss_kb'] / one:>12.2f}"
        if theirs:
            line += f"{theirs['peak_rss_kb'] / one:>12.2f}"
        print(line)
        print(f"cairn merge step alone: {ours['merge_seconds']:.1f} s; fraction trimmed {ours['fraction_trimmed']:.4f}")
        if theirs:
            diff, differ, total, only = compare(work / "out_cairn", work / "out_mergekit")
            print(f"max |cairn - mergekit| over all tensors: {diff:.3g}; entries that differ: {differ} of {total} "
                  f"({differ / total:.2g}) -- expected only where magnitudes tie at a trim threshold")
            if only:
                print(f"tensors in only one output: {only}")
        goal_rss = ours["peak_rss_kb"] <= 1.5 * one
        goal_time = theirs is None or ours["seconds"] <= theirs["seconds"]
        print(f"goals: peak RSS <= 1.5x one model: {'met' if goal_rss else 'NOT met'}; "
              f"time <= mergekit: {'met' if goal_time else 'NOT met'}")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
