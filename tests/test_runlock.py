"""One writer per run directory: a second process is refused; a killed holder frees the lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cairn.runlock import RunLock, RunLocked

pytest.importorskip("fcntl")
SRC = str(Path(__file__).resolve().parents[1] / "src")

HOLD = """
import sys, time
from cairn.runlock import lock_run_dir
lock_run_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def _holder(run_dir: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_process_is_refused_and_a_killed_holder_frees_the_lock(tmp_path):
    run = tmp_path / "run"
    proc = _holder(run)
    try:
        with pytest.raises(RunLocked) as err:
            RunLock(run).acquire()
        msg = str(err.value)
        assert f"pid {proc.pid}" in msg and str(run) in msg and "started" in msg
    finally:
        proc.send_signal(signal.SIGKILL)  # a crash: the OS drops the flock, no stale lock remains
        proc.wait()
    with RunLock(run) as lock:
        assert lock.path.is_file()
        with pytest.raises(RunLocked):  # a second lock in the same process is refused too (own fd)
            RunLock(run).acquire()
    RunLock(run).acquire().release()  # released on exit of the with-block


def test_lock_released_on_normal_exit(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", "import sys; from cairn.runlock import lock_run_dir; "
                    "lock_run_dir(sys.argv[1])", str(run)], check=True, env=env)
    RunLock(run).acquire().release()
