"""cairn.cpu_allocator: the glibc settings apply once on Linux/glibc and can be turned off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SNIPPET = "from cairn.cpu_allocator import keep_freed_memory as k; print(k(), k())"


def _run(env_value: str | None) -> str:
    env = dict(os.environ)
    env.pop("CAIRN_KEEP_FREED_MEMORY", None)
    if env_value is not None:
        env["CAIRN_KEEP_FREED_MEMORY"] = env_value
    return subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def _glibc() -> bool:
    import platform

    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not _glibc(), reason="the settings are glibc's; elsewhere keep_freed_memory is a no-op")
def test_applies_once_on_glibc():
    assert _run(None) == "True True"


def test_can_be_turned_off():
    assert _run("0") == "False False"
