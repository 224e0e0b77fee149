"""One writer per run directory: an OS file lock on ``<run>/.lock``.

Two ``cairn run`` processes on the same run directory would train the same rounds side by side and
interleave their artifacts. The runner takes this lock before it writes anything; a second process
refuses with a message naming the holder (pid, host, start time). The lock is ``fcntl.flock`` taken
non-blocking, so the operating system drops it when the holder exits *or is killed* (SIGKILL, OOM,
power loss on a local disk): a crashed run never leaves a stale lock behind, and the holder record in
the file is informational only. The standard library has no portable advisory lock, so this small
module is hand-written; where ``fcntl`` is missing (Windows) the lock is skipped with a warning.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from cairn.errors import CairnError

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

LOCK_NAME = ".lock"


class RunLocked(CairnError):
    """Another process holds the run directory."""


class RunLock:
    """Holds ``<run_dir>/.lock`` until :meth:`release` (or process exit); use as a context manager."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        if fcntl is None:
            print(f"[cairn] warning: no fcntl on this platform; {self.run_dir} is not protected against a second "
                  "concurrent `cairn run`", file=sys.stderr)
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CairnError(f"cannot create the run lock {self.path}: {exc.strerror}; check that the run "
                             "directory is writable") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLocked(f"run directory {self.run_dir} is in use by another cairn process ({holder}); wait "
                            "for it to finish or stop it, or pass another --out") from None
        except OSError as exc:  # e.g. a filesystem without lock support
            os.close(fd)
            raise CairnError(f"cannot lock {self.path}: {exc.strerror}; put the run directory on a local "
                             "filesystem") from None
        # The holder record is rewritten in place (the lock lives on the inode, so no atomic rename).
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"


def lock_run_dir(run_dir: str | os.PathLike) -> RunLock:
    """Take the run directory's lock for the rest of this process (the OS drops it at exit)."""
    return RunLock(run_dir).acquire()
