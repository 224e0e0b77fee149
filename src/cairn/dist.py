"""Process-world helpers for runs launched with ``torchrun`` / ``accelerate launch``.

Thin wrappers over ``torch.distributed`` (and the launcher's environment variables before the
process group exists) so any module can ask "am I the main process?" without holding an
Accelerator. A run launched without a launcher is a world of one, where every helper is a no-op.
Hand-written because Accelerate exposes these only through an ``Accelerator``/``PartialState``,
whose construction has side effects (device choice, process-group init) a writer should not cause.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator

import torch


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Number of processes in the run (the process group's, else the launcher's ``WORLD_SIZE``)."""
    if _initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0 on the main process)."""
    if _initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True on the process that writes run files, logs and progress bars."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process gets here (no-op in a world of one)."""
    if _initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


@contextlib.contextmanager
def main_process_writes() -> Iterator[bool]:
    """``with main_process_writes() as write: if write: ...`` — only rank 0 writes; all wait after.

    The barrier on exit means no process reads a file before the main process has finished
    writing it (e.g. the next round loading the adapter this round saved).
    """
    try:
        yield is_main()
    finally:
        barrier()


def gather_objects(items: list) -> list[list]:
    """Every process's ``items`` (picklable), in rank order; ``[items]`` in a world of one."""
    if not _initialized() or torch.distributed.get_world_size() == 1:
        return [items]
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, items)
    return out


def shard_indices(n: int) -> list[int]:
    """The indices of ``range(n)`` this process handles: a strided split (rank, rank + world, ...)."""
    return list(range(rank(), n, world_size())) if _initialized() else list(range(n))


def _launcher_argv_processes(argv: list[str]) -> int | None:
    # `accelerate launch --num_processes 2` / `--num-processes=2` / `torchrun --nproc_per_node 2`
    keys = ("--num_processes", "--num-processes", "--nproc_per_node", "--nproc-per-node")
    for i, arg in enumerate(argv):
        for key in keys:
            if arg == key and i + 1 < len(argv) and argv[i + 1].isdigit():
                return int(argv[i + 1])
            if arg.startswith(key + "=") and arg.split("=", 1)[1].isdigit():
                return int(arg.split("=", 1)[1])
    return None


def requested_processes() -> int:
    """How many processes a launcher asked for (1 when none says).

    torchrun says so in ``WORLD_SIZE``; Accelerate's single-process fallback sets no such variable,
    so when ``accelerate launch`` started us (it sets ``ACCELERATE_USE_CPU``/``ACCELERATE_MIXED_PRECISION``)
    the launcher's own command line is read from the parent process.
    """
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        value = os.environ.get(key)
        if value and value.isdigit():
            return int(value)
    if any(k in os.environ for k in ("ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION")):
        try:
            import psutil  # an Accelerate dependency

            asked = _launcher_argv_processes(psutil.Process(os.getppid()).cmdline())
            if asked:
                return asked
        except Exception:  # no such process / no permission: nothing to compare against
            pass
    return 1


def warn_if_world_mismatch(running: int) -> str | None:
    """A message when the launcher asked for more processes than are running, else None.

    ``accelerate launch --cpu --num_processes 2`` on some setups starts ONE process without saying
    so; a user would otherwise believe the run used two.
    """
    asked = requested_processes()
    if asked > running:
        message = (f"the launcher asked for {asked} processes but {running} is running: this run is NOT "
                   f"distributed (on CPU use `torchrun --nproc_per_node {asked}` or an accelerate config "
                   f"with `distributed_type: MULTI_CPU`)")
        warnings.warn(message, stacklevel=2)
        return message
    return None
