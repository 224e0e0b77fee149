"""Kill -9 anywhere, short version: two SIGKILLs of a real `cairn run`, rerun, compare with an uninterrupted run.

The full experiment (many trials) is ``scripts/crash_test.py``; this runs one trial of it on the same
3-round config (LoRA, FFT with replay, O-LoRA, LoRAMoE, a one-round method and a TIES combine step).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "crash_test.py"


def test_killed_run_resumes_to_identical_results(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("crash_test", SCRIPT)
    crash = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(crash)
    code = crash.main(["--trials", "1", "--kills", "2", "--steps", "2", "--keep", str(tmp_path)])
    out = capsys.readouterr().out
    assert "identical to the uninterrupted run (results, matrices, predictions, every tensor): 1/1" in out, out
    assert code == 0
    assert not list((tmp_path / "trial-0").rglob(".tmp-*"))  # nothing half-written in the resumed run
