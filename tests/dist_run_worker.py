"""Worker for the end-to-end multi-process test of ``cairn run`` (tests/test_dist.py).

Runs a 2-round curriculum on a tiny model with one method, in whatever world it is launched in,
and records every run-file write (which process wrote which path) to ``writes-<rank>.txt`` beside
the run directory, by wrapping cairn.atomic's writers and the run log.

Usage: python dist_run_worker.py METHOD BATCH_SIZE MODEL_DIR OUT_DIR
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch


def main() -> None:
    from cairn import atomic, dist
    from cairn.config import config_from_dict
    import cairn.experiment as experiment

    torch.set_num_threads(1)
    method, batch_size, model_dir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    if dist.world_size() > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    record = out.parent / f"writes-{dist.rank()}.txt"
    record.parent.mkdir(parents=True, exist_ok=True)

    def note(path) -> None:
        with record.open("a") as f:
            f.write(f"{Path(path).resolve()}\n")

    def wrap(fn):
        def inner(path, *a, **k):
            note(path)
            return fn(path, *a, **k)
        return inner

    atomic_dir = atomic.atomic_dir

    @contextlib.contextmanager
    def noting_dir(final, *a, **k):
        note(final)
        with atomic_dir(final, *a, **k) as tmp:
            yield tmp

    for mod in (atomic, experiment.atomic):
        mod.write_json, mod.write_text, mod.atomic_dir = wrap(atomic.write_json), wrap(atomic.write_text), noting_dir
    log_call = experiment.RunLog.__call__

    def noting_log(self, line):
        note(self.path)
        return log_call(self, line)

    experiment.RunLog.__call__ = noting_log

    methods = {
        "lora": {"name": "m", "trainable": "lora", "lora": {"r": 2, "alpha": 4, "dropout": 0.0}},
        "olora": {"name": "m", "trainable": "lora", "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
                  "olora": {"lambda1": 0.5}},
        "replay": {"name": "m", "trainable": "lora", "lora": {"r": 2, "alpha": 4, "dropout": 0.0}, "replay": 0.5},
    }
    cfg = config_from_dict({
        "name": "t", "model": model_dir,
        "tasks": [{"name": t, "format": "demo", "path": t, "entities": 2, "max_new_tokens": 4}
                  for t in ("zoology", "geography")],
        "methods": [methods[method]],
        "training": {"epochs": 1, "batch_size": batch_size, "lr": 1e-3, "log_every": 1, "max_length": 64,
                     "warmup_ratio": 0.0},
        "evaluation": {"batch_size": 8},
    })
    experiment.run_experiment(cfg, out, progress=False)


if __name__ == "__main__":
    main()
