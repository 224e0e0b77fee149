"""Run-directory size of sequential full fine-tuning: ``storage.fft_format`` full vs delta, same run.

Runs one small continual experiment (the built-in model by default, 3 demo tasks, sequential full
fine-tuning, a few steps a round) twice in this process, once per storage format, and prints the
size of each method directory and of its round models (the baseline is ``full``: ratio = full bytes
/ delta bytes), whether the two runs' results matrices are identical, and the time to restore the
last round's model from each and read every weight (interleaved, best of ``--repeats``; the delta
walks its parent chain from the base). With ``--out`` an existing pair of runs is reused (a finished
run is not retrained). Usage:

    python benchmarks/delta_run_dir.py [--model smollm2-135m] [--steps 3] [--lr 1e-5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", nargs="+", default=["zoology", "geography", "inventions"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="keep the run directories here (default: temp)")
    args = ap.parse_args()

    import torch

    from cairn.config import config_from_dict
    from cairn.experiment import run_experiment
    from cairn.io.fft_round import load_round

    torch.set_num_threads(args.threads)
    root = args.out or Path(tempfile.mkdtemp(prefix="cairn-delta-rundir-"))
    dirs = {}
    for fmt in ("full", "delta"):
        cfg = config_from_dict({
            "name": fmt, "model": args.model,
            "tasks": [{"name": t, "format": "demo", "path": t, "entities": 2, "max_new_tokens": 4} for t in args.tasks],
            "methods": [{"name": "fft", "trainable": "full", "diagnostics": False}],
            "training": {"max_steps": args.steps, "batch_size": 4, "lr": args.lr, "warmup_ratio": 0.0,
                         "max_length": 96, "log_every": 10**6},
            "evaluation": {"batch_size": 16}, "storage": {"fft_format": fmt}})
        out = run_experiment(cfg, root / fmt, progress=False, echo=False)
        assert out["status"] == {"fft": "ok"}, out["status"]
        dirs[fmt] = root / fmt / "fft"
    sizes = {fmt: (_size(d), sum(_size(m) for m in d.glob("rounds/*/model"))) for fmt, d in dirs.items()}
    n = len(args.tasks)
    print(f"\n{args.model}, {n} rounds of sequential full fine-tuning, {args.steps} steps a round at lr {args.lr:g}")
    print(f"  {'':<6} {'method dir MiB':>15} {'round models MiB':>17}")
    for fmt, (whole, models) in sizes.items():
        print(f"  {fmt:<6} {whole / 2**20:>15.1f} {models / 2**20:>17.1f}")
    print(f"  ratio full/delta: method dir {sizes['full'][0] / sizes['delta'][0]:.2f}x, "
          f"round models {sizes['full'][1] / sizes['delta'][1]:.2f}x")
    same = all(json.loads((d / "results.json").read_text())["matrix"] ==
               json.loads((dirs["full"] / "results.json").read_text())["matrix"] for d in dirs.values())
    print(f"  results matrices identical: {'yes' if same else 'NO'}")
    best = {fmt: float("inf") for fmt in dirs}
    last = sorted(dirs["full"].glob("rounds/*"))[-1].name
    for _ in range(args.repeats):  # interleaved: the machine's noise hits both alike
        for fmt, d in dirs.items():
            t0 = time.perf_counter()
            model = load_round(d / "rounds" / last / "model")
            {k: v.clone() for k, v in model.state_dict().items()}  # from_pretrained maps lazily: read every byte
            best[fmt] = min(best[fmt], time.perf_counter() - t0)
            del model
    print(f"  restore round {n} and read its weights: full {best['full']:.2f}s, delta {best['delta']:.2f}s "
          f"({best['delta'] / best['full']:.2f}x the full load)")


if __name__ == "__main__":
    main()
